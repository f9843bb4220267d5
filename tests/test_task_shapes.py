"""Every multiple-choice shape lm-eval has, from the user's own task YAMLs (include_path), through run_tasks on the
tiny model: gold indices, log-likelihoods and prompt-end hidden states per question, and fast errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from calq.calib import answer_temperature
from calq.calib.answer_features import AnswerSet
from calq.calib.base import identity
from calq.calib.temperature import Temperature
from calq.errors import CalqError
from calq.evaluation import harness

SENTENCES = [("The trophy does not fit in the suitcase because _ is too big.", ["the trophy", "the suitcase"], 0),
             ("Anna gave Maria her book because _ was leaving.", ["Anna", "Maria"], 1),
             ("The cup sat on the table until _ fell.", ["the cup", "the table"], 0)]


def yaml_task(name: str, data, body: str) -> str:
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """) + textwrap.dedent(body)


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory):
    """A folder of task YAMLs as a user would write them, reading local JSON lines through lm-eval's `json`."""
    folder = tmp_path_factory.mktemp("user-tasks")
    one = folder / "one.jsonl"
    one.write_text("".join(json.dumps({"question": f"What goes with {w}?", "options": ["red", "green", "blue"],
                                       "label": i % 3}) + "\n" for i, w in enumerate(["sky", "grass", "sun", "snow"])))
    partial = folder / "partial.jsonl"
    partial.write_text("".join(json.dumps({"sentence": s, "options": o, "answer": a}) + "\n" for s, o, a in SENTENCES))
    multi = folder / "multi.jsonl"
    options = ["red", "stone", "blue", "wood"]
    multi.write_text("".join(json.dumps({"question": f"Name a colour, {k}:", "golds": [0, 2], "options": options})
                             + "\n"
                             for k in ("please", "now")))
    (folder / "shape_one_context.yaml").write_text(yaml_task("shape_one_context", one, """\
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: options
        doc_to_target: label
        """))
    # lm-eval's winogrande: the choices are contexts, the gold is doc_to_text's index, the target is the text after "_"
    (folder / "utils.py").write_text(textwrap.dedent("""\
        def doc_to_text(doc):
            return doc["answer"]

        def doc_to_target(doc):
            return doc["sentence"][doc["sentence"].index("_") + 1:].strip()

        def doc_to_choice(doc):
            cut = doc["sentence"].index("_")
            return [doc["sentence"][:cut] + option for option in doc["options"]]
        """))
    (folder / "shape_partial.yaml").write_text(yaml_task("shape_partial", partial, """\
        doc_to_text: !function utils.doc_to_text
        doc_to_target: !function utils.doc_to_target
        doc_to_choice: !function utils.doc_to_choice
        """))
    (folder / "shape_several_gold.yaml").write_text(yaml_task("shape_several_gold", multi, """\
        doc_to_text: "{{question}}"
        doc_to_choice: options
        doc_to_target: golds
        """))
    return folder


def last_hidden(model, text: str) -> torch.Tensor:
    """Independent reference: the byte-level tiny tokenizer maps each character to one id (no BOS)."""
    with torch.no_grad():
        out = model(torch.tensor([[ord(c) for c in text]]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1]


def test_every_multiple_choice_shape_through_run_tasks(tiny_model, user_tasks):
    from transformers import AutoModelForCausalLM

    tasks = ["shape_one_context", "shape_partial", "shape_several_gold"]
    result = harness.run_tasks(tiny_model, {"none": identity, "t2": Temperature(2.0)}, tasks, None,
                               None, 4, include_path=[user_tasks], features=True)
    entries = result["tasks"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    one = entries["shape_one_context"]
    assert one["lm_eval_task"] == "shape_one_context" and one["gold"] == [[0], [1], [2], [0]]
    assert [len(row) for row in one["calibrators"]["none"]["loglikelihoods"]] == [3] * 4
    assert one["choice_tokens"][0] == [4, 6, 5]  # " red", " green", " blue": one token per byte
    assert one["prompt_hidden"].dtype == torch.float16 and one["prompt_hidden"].shape == (4, 64)
    expected = last_hidden(model, "Question: What goes with sky?\nAnswer:")
    assert torch.allclose(one["prompt_hidden"][0].float(), expected, atol=2e-2)

    partial = entries["shape_partial"]
    assert partial["gold"] == [[a] for _, _, a in SENTENCES]  # from doc_to_text, not the logged target text
    assert [len(row) for row in partial["calibrators"]["none"]["loglikelihoods"]] == [2] * 3
    sentence, options, _ = SENTENCES[0]
    cut = sentence.index("_")
    expected = torch.stack([last_hidden(model, sentence[:cut] + o) for o in options]).mean(0)
    assert torch.allclose(partial["prompt_hidden"][0].float(), expected, atol=2e-2)

    several = entries["shape_several_gold"]
    assert several["gold"] == [[0, 2], [0, 2]]

    for name, entry in entries.items():
        for calibrator, res in entry["calibrators"].items():
            answers = AnswerSet.from_task(entry, calibrator)
            top = answers.probabilities().argmax(1).tolist()
            # the answer-level correctness agrees with lm-eval's own accuracy on every shape
            assert [float(t in g) for t, g in zip(top, entry["gold"])] == res["scores"], (name, calibrator)
    fitted = answer_temperature.fit([AnswerSet.from_task(e) for e in entries.values()])
    assert fitted.temperature > 0


def test_task_sources_fail_fast_before_the_model_loads(tiny_model, user_tasks, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no tasks here")
    cases = [([tmp_path / "missing"], "shape_one_context", "include_path folder not found"),
             ([empty], "shape_one_context", "holds no task YAML")]
    for include_path, task, message in cases:
        with pytest.raises(CalqError, match=message) as err:
            harness.run_tasks(tmp_path / "no-model", {"none": identity}, [task], None, None, 1,
                              include_path=include_path)
        assert "\n" not in str(err.value)
    assert harness.check_tasks(["shape_partial"], None, 2, include_path=[user_tasks])["shape_partial"]["n"] == 2


@pytest.mark.slow  # indexes lm-eval's whole registry (about 15 s on an idle machine, a minute on a busy one)
def test_registry_names_without_network_are_clear_errors(tmp_path, user_tasks):
    """hellaswag is in lm-eval's registry (listed offline) but its data lives on the hub: a CalqError, no model;
    a name found nowhere is an unknown task."""
    code = ("import sys\nfrom calq.evaluation import harness\nfrom calq.errors import CalqError\n"
            "for name in ('hellaswag', 'shape_nope'):\n"
            "    try:\n        harness.run_tasks('no-model', {}, [name], 5, None, 1, include_path=[sys.argv[1]])\n"
            "    except CalqError as err:\n        print('CALQERROR', err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(user_tasks)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CALQERROR")]
    assert len(lines) == 2, proc.stderr[-2000:]
    assert "task 'hellaswag' could not load its data" in lines[0] and "unknown task 'shape_nope'" in lines[1]


def test_generative_answers_get_their_sequence_probability_as_confidence(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calq.evaluation.answers import task_rows

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Question: {w}?\nAnswer:", "aliases": ["blue", "Blue"]}) + "\n"
                            for w in ("sky", "sea", "ink")))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "shape_generate.yaml").write_text(textwrap.dedent(f"""\
        task: shape_generate
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{q}}}}"
        doc_to_target: aliases
        generation_kwargs: {{until: ["\\n"], do_sample: false, temperature: 0.0, max_gen_toks: 4}}
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    result = harness.run_tasks(tiny_model, {"none": identity, "t2": Temperature(2.0)},
                               ["shape_generate"], None, None, 2, include_path=[tmp_path / "tasks"])
    entry = result["tasks"]["shape_generate"]
    assert len(entry["answer_tokens"]) == 3 and set(entry["answer_logprobs"]) == {"none", "t2"}
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # reference: generate greedily, cut at the stop string, score the answer's tokens after the context by hand
    context = "Question: sky?\nAnswer:"
    ids = tokenizer(context, return_tensors="pt").input_ids
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]
        whole = tokenizer(context + text).input_ids
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1], -1)
    answer = torch.tensor(whole[ids.shape[1]:])
    expected = float(logp[ids.shape[1] - 1:].gather(-1, answer[:, None]).sum()) if text else None
    assert entry["answer_tokens"][0] == len(answer)
    if expected is None:
        assert entry["answer_logprobs"]["none"][0] is None
    else:
        assert entry["answer_logprobs"]["none"][0] == pytest.approx(expected, abs=1e-4)
        assert entry["answer_logprobs"]["t2"][0] != pytest.approx(expected, abs=1e-4)
    rows = task_rows("tiny", result, n_boot=50)
    for row in rows:
        assert 0 <= row["confidence"] <= 1 and row["ece"] is not None
        assert row["per_token"]["confidence"] >= row["confidence"]
