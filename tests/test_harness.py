"""The `calq` lm-eval model and calq's tasks on the tiny random Llama, with a small synthetic data folder."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import data_dir

from calq.calib.base import Calibrator, identity
from calq.calib.temperature import Temperature
from calq.errors import CalqError
from calq.evaluation import harness
from calq.evaluation.tasks import TASKS_DIR, available, sources

COLORS = ["red", "green", "blue", "yellow"]


temperature_2 = Temperature(2.0)


class HiddenScaled(Calibrator):  # ATS-shaped: one positive scale per position, computed from the hidden state
    name = "hidden_scaled"

    def scale(self, hidden, attention_mask=None):
        return torch.exp(hidden.mean(-1)).clamp(max=10)


hidden_scaled = HiddenScaled()


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-data")
    (root / "mc").mkdir()
    questions = [{"query": f"Question: Which colour goes with the {thing}?", "choices": COLORS, "gold": i % 4}
                 for i, thing in enumerate(["sky", "grass", "sun", "snow", "coal", "sea"])]
    (root / "mc" / "arc_easy.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "mc" / "lambada_openai.jsonl").write_text("".join(
        json.dumps({"context": f"The {w} sat on the", "continuation": "mat"}) + "\n"
        for w in ("cat", "dog", "bird")))
    (root / "mc" / "triviaqa_sm_sub.jsonl").write_text("".join(
        json.dumps({"context": f"Question: What colour is {x}?\nAnswer:", "answer": "Blue",
                    "aliases": ["Blue", "blue"]}) + "\n"
        for x in ("the sky", "the sea")))
    for split, counts in (("test", {"alpha": 2, "beta": 1}), ("dev", {"alpha": 6, "beta": 6})):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject, n in counts.items():
            with (root / "mmlu" / split / f"{subject}_{split}.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                writer.writerows([f"{subject} {split} question {i}?", *COLORS, i % 4] for i in range(n))
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps([
        {"question": "Is the sky green?", "mc1_targets": {"No.": 1, "Yes.": 0},
         "mc2_targets": {"No.": 1, "Not at all.": 1, "Yes.": 0}}]))
    return root


def ll(model, context: str, continuation: str, temperature: float = 1.0) -> float:
    """Independent reference: the byte-level tiny tokenizer maps each character to one id."""
    ids = torch.tensor([[ord(c) for c in context + continuation]])
    logp = torch.log_softmax(model(ids[:, :-1]).logits[0] / temperature, dim=-1)
    targets = ids[0, len(context):]
    return float(logp[len(context) - 1:].gather(-1, targets[:, None]).sum())


def test_calibrated_loglikelihoods_match_lm_eval_and_the_calibrator(tiny_model, task_data):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    res = harness.run_tasks(tiny_model, {"none": identity, "temperature": temperature_2}, ["arc_easy"], 3, task_data, 4)
    entry = res["tasks"]["arc_easy"]
    assert entry["n"] == 3 and entry["gold"] == [[0], [1], [2]] and entry["metric"] == "acc"

    # `none` scores exactly what lm-eval's own Hugging Face model scores
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(task_data)})
    hf = simple_evaluate(model="hf", model_args={"pretrained": str(tiny_model), "device": "cpu", "dtype": "float32"},
                         tasks=["calq_arc_easy"], task_manager=manager, limit=3, bootstrap_iters=0)
    hf_lls = [[r[0] for r in s["filtered_resps"]]
              for s in sorted(hf["samples"]["calq_arc_easy"], key=lambda s: s["doc_id"])]
    assert sum(entry["calibrators"]["none"]["loglikelihoods"], []) == pytest.approx(sum(hf_lls, []), abs=1e-4)

    # `temperature` scores log_softmax(logits / 2), checked against a direct computation
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    context = "Question: Which colour goes with the sky?\nAnswer:"
    with torch.no_grad():
        expected = [ll(model, context, " " + c, temperature=2.0) for c in COLORS]
    assert entry["calibrators"]["temperature"]["loglikelihoods"][0] == pytest.approx(expected, abs=1e-4)
    assert entry["calibrators"]["temperature"]["loglikelihoods"] != entry["calibrators"]["none"]["loglikelihoods"]

    # the registered model through lm-eval's string model_args, as on lm-eval's command line
    cli = simple_evaluate(model="calq", model_args=f"pretrained={tiny_model},calibrator=temperature:2.0,device=cpu",
                          tasks=["calq_arc_easy"], task_manager=manager, limit=3, bootstrap_iters=0)
    first = sorted(cli["samples"]["calq_arc_easy"], key=lambda s: s["doc_id"])[0]
    assert [r[0] for r in first["filtered_resps"]] == pytest.approx(expected, abs=1e-4)


def test_one_forward_pass_serves_every_calibrator(tiny_model, task_data, monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []
    forward = LlamaForCausalLM.forward
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))

    def forwards(calibrators, tasks):
        calls.clear()
        result = harness.run_tasks(tiny_model, calibrators, tasks, 3, task_data, 4)
        return len(calls), result

    one, _ = forwards({"none": identity}, ["arc_easy", "lambada"])
    three, result = forwards({"none": identity, "temperature": temperature_2, "ats": hidden_scaled},
                             ["arc_easy", "lambada"])
    assert three == one == 4  # 3 x 4 choices + 3 LAMBADA texts = 15 inputs, batches of 4
    lambada = result["tasks"]["lambada"]["calibrators"]
    assert lambada["none"]["scores"] == lambada["ats"]["scores"]  # is-greedy: a positive scale keeps the argmax
    assert lambada["none"]["metrics"]["perplexity"] != lambada["ats"]["metrics"]["perplexity"]

    mmlu, _ = forwards({"none": identity, "temperature": temperature_2}, ["mmlu"])
    assert mmlu == 1  # 3 questions x 4 one-token answers: one input row per question


def test_generation_runs_once_and_is_the_same_under_every_calibrator(tiny_model, task_data, monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []
    generate = LlamaForCausalLM.generate
    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
    result = harness.run_tasks(tiny_model, {"none": identity, "ats": hidden_scaled}, ["triviaqa"], 2, task_data, 2)
    assert len(calls) == 1  # two questions in one batch, shared by both calibrators
    entry = result["tasks"]["triviaqa"]
    assert entry["metric"] == "exact_match" and entry["gold"] is None
    assert entry["calibrators"]["none"]["scores"] == entry["calibrators"]["ats"]["scores"]


def test_sampling_with_a_calibrator_is_refused(tiny_model):
    from lm_eval.api.instance import Instance

    lm = harness.CalqLM(str(tiny_model), calibrators={"temperature": temperature_2}, device="cpu")
    request = Instance("generate_until", doc={},
                       arguments=("Question: sky?\nAnswer:", {"do_sample": True, "until": ["\n"]}), idx=0)
    with pytest.raises(CalqError, match="sampled generation"):
        lm.generate_until([request])


def test_calibrator_specs(tiny_model, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from calq.calib.ats import AtsHead, save_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert harness.parse_calibrator(None, model) == ("none", identity)
    name, calibrator = harness.parse_calibrator("temperature:2", model)
    assert name == "temperature" and torch.equal(calibrator(torch.ones(1, 1, 3), None), torch.full((1, 1, 3), 0.5))
    head = AtsHead(model.config)
    save_head(head, tmp_path / "ats")
    name, loaded = harness.parse_calibrator(f"ats:{tmp_path / 'ats'}", model)
    logits, hidden = torch.randn(1, 5, model.config.vocab_size), torch.randn(1, 5, model.config.hidden_size)
    assert name == "ats" and torch.allclose(loaded(logits, hidden), head(logits, hidden))
    assert torch.equal(F.softmax(logits, -1).argmax(-1), F.softmax(loaded(logits, hidden), -1).argmax(-1))
    for spec, message in (("temperature:-1", "positive"), ("bogus:1", "unknown calibrator"),
                          ("ats", "needs an argument"), (f"ats:{tmp_path / 'missing'}", "no ATS head")):
        with pytest.raises(CalqError, match=message):
            harness.parse_calibrator(spec, model)


def test_task_checks_fail_fast_with_one_line(task_data, tmp_path, monkeypatch):
    monkeypatch.delenv("CALQ_DATA_DIR", raising=False)
    cases = [(["mmlu", "no_such_task"], task_data, None, "unknown task 'no_such_task'"),
             (["piqa"], task_data, None, "task 'piqa': data file not found"),
             (["arc_easy"], task_data, 0, "task 'arc_easy' has no examples with limit 0"),
             (["arc_easy"], None, None, "none was given"),
             ([], task_data, None, "no tasks listed")]
    for tasks, folder, limit, message in cases:
        with pytest.raises(CalqError, match=message) as err:
            harness.check_tasks(tasks, folder, limit)
        assert "\n" not in str(err.value)
    checked = harness.check_tasks(["arc_easy", "mmlu"], task_data, 5)
    assert {name: task["n"] for name, task in checked.items()} == {"arc_easy": 5, "mmlu": 3}
    copy = shutil.copytree(task_data, tmp_path / "copy")  # resume keys take the sha256: content, not the folder
    assert harness.check_tasks(["arc_easy", "mmlu"], copy, 5) == checked
    questions = (copy / "mc" / "arc_easy.jsonl").read_text()
    (copy / "mc" / "arc_easy.jsonl").write_text(questions.replace("sky", "moon"))
    assert harness.check_tasks(["arc_easy"], copy, 5)["arc_easy"]["sha256"] != checked["arc_easy"]["sha256"]
    # checked before the model loads: the model path does not even exist
    with pytest.raises(CalqError, match="unknown task"):
        harness.run_tasks(tmp_path / "no-model", {"none": identity}, ["nope"], None, task_data, 1)


def test_mmlu_interleaves_subjects_and_takes_shots_from_the_same_subject(task_data):
    docs = sources.mmlu(data_dir=task_data, shots=5)["test"]
    assert [d["subject"] for d in docs] == ["alpha", "beta", "alpha"]
    assert docs[1]["shots"].count("\nAnswer: ") == 5 and "beta dev question 4?" in docs[1]["shots"]
    assert "dev question 5" not in docs[1]["shots"] and "alpha" not in docs[1]["shots"]
    assert [d["question"] for d in sources.mmlu(data_dir=task_data, subject="alpha")["test"]] == [
        "alpha test question 0?", "alpha test question 1?"]  # one subject alone: the task mmlu_<subject>
    mc2 = sources.truthfulqa(data_dir=task_data, targets="mc2_targets")["test"][0]
    assert mc2["choices"] == ["No.", "Not at all.", "Yes."] and mc2["labels"] == [1, 1, 0]


@pytest.mark.skipif(data_dir() is None, reason="needs CALQ_DATA_DIR (the shared offline data)")
def test_every_task_reads_the_shared_data():
    counts = {name: task["n"] for name, task in harness.check_tasks(list(available()), data_dir(), None).items()}
    subjects = {name: n for name, n in counts.items() if name.startswith("mmlu_") and name != "mmlu_5shot"}
    assert len(subjects) == 57 and sum(subjects.values()) == counts["mmlu"]  # the group's tasks, by calq names
    counts = {name: n for name, n in counts.items() if name not in subjects}
    assert counts == {"arc_challenge": 1172, "arc_easy": 2376, "boolq": 3270, "lambada": 5153, "mmlu": 14042,
                      "mmlu_5shot": 14042, "piqa": 1838, "triviaqa": 3000, "truthfulqa_mc1": 817, "truthfulqa_mc2": 817,
                      "openbookqa": 500, "commonsense_qa": 1221, "siqa": 1954, "copa": 100}


def test_lm_eval_command_line(tiny_model, task_data, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "calq.evaluation.harness", "--model", "calq",
                           "--model_args", f"pretrained={tiny_model},calibrator=temperature:1.5", "--device", "cpu",
                           "--tasks", "calq_arc_easy", "--limit", "2",
                           "--metadata", json.dumps({"data_dir": str(task_data)})],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calq_arc_easy" in proc.stdout and "acc" in proc.stdout


def test_calq_lm_eval_takes_batch_size_and_device_in_model_args_or_as_options(tiny_model, task_data, tmp_path,
                                                                              monkeypatch):
    """lm-eval's command line passes --batch_size (1 when not given) and --device beside the model_args: a key in both
    is no TypeError (lm-eval 0.4.13's own `hf` model raises one), and model_args wins."""
    sizes = []
    init = harness.CalqLM.__init__
    monkeypatch.setattr(harness.CalqLM, "__init__", lambda self, *a, **k: init(self, *a, **k) or sizes.append(
        (self.batch_size, str(self.device))))
    monkeypatch.chdir(tmp_path)
    common = ["--tasks", "calq_arc_easy", "--limit", "2", "--metadata", json.dumps({"data_dir": str(task_data)})]
    for model_args, options in ((",batch_size=8,device=cpu", ["--batch_size", "2", "--device", "cpu"]),
                                ("", ["--batch_size", "3", "--device", "cpu"])):
        monkeypatch.setattr(sys, "argv", ["calq-lm-eval", "--model", "calq", "--model_args",
                                          f"pretrained={tiny_model}{model_args}", *options, *common])
        harness.main()  # the calq-lm-eval entry point
    assert sizes == [(8, "cpu"), (3, "cpu")]
