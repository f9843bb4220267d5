"""Gates on real task results (a tiny model that learned its answers, an 8-bit copy of it and a copy damaged so that
it cannot read the question), gate arithmetic and name checks, and report.html rendered in headless Chromium."""

import json
import shutil
import subprocess

import pytest
import torch
from pydantic import ValidationError
from tiny import make_tiny_llama

from calq import models
from calq.calib.base import identity
from calq.calib.temperature import Temperature
from calq.errors import CalqError
from calq.evaluation import answers, harness, tokens
from calq.pipeline import versions
from calq.report import render, sections
from calq.report.gates import Gates, check_gates, evaluate_gates, gates_section

COLORS = ["red", "green", "blue", "yellow"]
# distinct first letters: easy to learn
THINGS = ["apple", "brick", "cloud", "daisy", "ember", "frost", "grape", "heron"]


temperature_2 = Temperature(2.0)


def learn_answers(folder, questions):
    """Train the tiny random model on the answers (the baseline needs accuracy to lose)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompts = [f"{q['query']}\nAnswer:" for q in questions]  # the calq_arc_easy prompt
    batch = tok([f"{p} {q['choices'][q['gold']]}" for p, q in zip(prompts, questions)], padding=True,
                return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i, prompt in enumerate(prompts):
        labels[i, :len(tok(prompt)["input_ids"])] = -100  # learn the answer, not the question
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)


def w8_copy(source, folder):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from calq.quant import llmc

    llmc.quiet_logs(str(folder.parent / "llmcompressor.log"))  # not into the working directory
    model, tok = models.load(models.ModelSource(str(source), kind="folder"))
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    llmc.run_oneshot(model, [QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])], None)
    model.save_pretrained(folder, save_compressed=True)
    tok.save_pretrained(folder)
    return folder


def damaged_copy(source, folder):
    """The model with every layer's output projections (attention o_proj, MLP down_proj) zeroed: no layer adds anything
    to the residual stream, so the logits at a position depend on that position's token alone. Every question ends in
    the same "Answer:" and has the same choices, so the model gives all of them one answer, whatever it learned: it
    is right on exactly the questions whose gold that answer is (each colour is gold for two of the eight)."""
    model, tok = models.load(models.ModelSource(str(source), kind="folder"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory, texts):
    """report.json's content for baseline, w8 (8-bit channel weights) and damaged (damaged_copy): real task and
    token-level numbers; recipe, stages and outliers made up."""
    root = tmp_path_factory.mktemp("gated")
    questions = [{"query": f"Question: {t}?", "choices": COLORS, "gold": i % 4} for i, t in enumerate(THINGS)]
    (root / "data" / "mc").mkdir(parents=True)
    (root / "data" / "mc" / "arc_easy.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    baseline = make_tiny_llama(root / "baseline")
    learn_answers(baseline, questions)
    folders = {"baseline": baseline, "w8": w8_copy(baseline, root / "w8"),
               "damaged": damaged_copy(baseline, root / "damaged")}
    calibrators = {"none": identity, "temperature": temperature_2}
    per_variant = {name: harness.run_tasks(folder, calibrators, ["arc_easy"], None, root / "data", 8)
                   for name, folder in folders.items()}
    rows = []
    for name, folder in folders.items():
        model, tok = models.load(models.ModelSource(str(folder), kind="folder"))
        stream = torch.tensor(tok(texts["heldout"].read_text()[:4000])["input_ids"])
        result = tokens.evaluate(model, stream, 64, 4)["calibrators"]["none"]
        rows.append({"variant": name, "method": "minmax" if name == "w8" else "none", "scheme": name,
                     "group_size": None, "size_bytes": 1000, "calibration_seconds": None, **result})
    rep = {"recipe": "tiny", "created": "2026-01-01T00:00:00",
           "model": {"id": "tiny", "source": str(baseline), "dtype": "float32", "note": None},
           "calibration": {"source": "calib.txt", "num_samples": 8, "seq_len": 32, "seed": 0, "note": None},
           "evaluation": {"tokens": {"source": str(texts["heldout"]), "tokens": rows[0]["tokens"], "seq_len": 64,
                                     "bins": 15, "note": None}},
           "variants": rows, "tasks": answers.tasks_section(per_variant, 15, 200, 0, "0.4.13"),
           "outliers": [{"layer": "model.layers.0.mlp.down_proj", "ratio": 9.5, "absmax": 1.2, "median_absmax": 0.13,
                         "channel": 7, "tokens": 256}],
           "smoothing": {"w8": [{"layer": "model.layers.0.mlp.up_proj", "spread_before": 9.0, "spread_after": 3.0,
                                 "reduction": 3.0}]},
           "skipped": {"awq-w4a16": "autoawq is not installed"},
           "stages": {"samples": {"seconds": 0.1, "peak_rss_mb": 500.0}}, "versions": versions(),
           "machine": {"platform": "test", "cpus": 2},
           "recipe_content": {"name": "tiny", "variants": [{"method": "minmax", "scheme": "w8a8"}]}}
    rep["gates"] = gates_section(Gates(max_accuracy_drop=0.1), rep)
    return rep


def test_damaged_variant_fails_an_accuracy_gate_and_a_mild_one_passes(report):
    acc = {(r["variant"], r["calibrator"]): r["accuracy"] for r in report["tasks"]["results"]}
    assert acc["baseline", "none"] == 1.0 and acc["w8", "none"] == 1.0 and acc["damaged", "none"] == 0.25
    results = {(r["variant"], r["calibrator"]): r for r in report["gates"]["results"]}
    assert set(results) == {(v, c) for v in ("w8", "damaged") for c in ("none", "temperature")}
    assert results["w8", "none"]["passed"] and results["w8", "none"]["value"] == 0.0
    damaged = results["damaged", "none"]
    assert not damaged["passed"] and damaged["value"] == pytest.approx(0.75)
    assert damaged["margin"] == pytest.approx(0.1 - damaged["value"]) and damaged["margin"] < 0
    assert report["gates"]["passed"] is False
    assert all(r.passed for r in evaluate_gates(Gates(variant="w8", max_accuracy_drop=0.0), report))


def test_answer_level_rows_and_intervals(report):
    row = next(r for r in report["tasks"]["results"] if r["variant"] == "damaged" and r["calibrator"] == "temperature")
    assert row["n"] == 8 and row["metric"] == "acc" and row["top1_accuracy"] == row["accuracy"]
    for key in ("accuracy", "ece", "brier"):
        low, high = row[f"{key}_ci"]
        assert low <= row[key] + 1e-12 and row[key] <= high + 1e-12
    assert sum(b["count"] for b in row["reliability"]) == 8
    none = next(r for r in report["tasks"]["results"] if r["variant"] == "damaged" and r["calibrator"] == "none")
    assert row["confidence"] < none["confidence"]  # T = 2 flattens the choice distribution


def test_bootstrap_ece_is_the_metrics_ece_formula():
    from calq.metrics import ece

    conf = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    correct = (torch.rand(300, generator=torch.Generator().manual_seed(2)) < conf).double()
    intervals = answers.calibration_intervals(conf, correct, n_boot=400)
    assert intervals["ece_ci"][0] < ece(conf, correct) < intervals["ece_ci"][1]
    assert answers.calibration_intervals(conf, correct, n_boot=400) == intervals  # seeded


def row(variant, calibrator, task, accuracy, ece):
    return {"variant": variant, "calibrator": calibrator, "task": task, "accuracy": accuracy, "ece": ece}


SYNTHETIC = {
    "variants": [{"variant": "baseline", "ece": 0.02}, {"variant": "q4", "ece": 0.06}],
    "tasks": {"results": [row("baseline", "none", "mmlu", 0.50, 0.10), row("baseline", "ats", "mmlu", 0.51, 0.03),
                          row("q4", "none", "mmlu", 0.45, 0.15), row("q4", "ats", "mmlu", 0.47, 0.04),
                          row("baseline", "none", "triviaqa", 0.30, None), row("q4", "none", "triviaqa", 0.31, None)]},
}


def test_gate_values_thresholds_and_margins():
    results = {(r.gate, r.variant, r.calibrator, r.task): r for r in evaluate_gates(
        Gates(max_accuracy_drop=0.045, max_ece=0.1, max_ece_increase=0.0, max_token_ece=0.05), SYNTHETIC)}
    drop = results["max_accuracy_drop", "q4", "none", "mmlu"]
    assert drop.value == pytest.approx(0.05) and not drop.passed and drop.margin == pytest.approx(-0.005)
    assert results["max_accuracy_drop", "q4", "ats", "mmlu"].passed  # vs the baseline with the same calibrator
    assert results["max_accuracy_drop", "q4", "none", "triviaqa"].value == pytest.approx(-0.01)
    assert not results["max_ece", "q4", "none", "mmlu"].passed and results["max_ece", "q4", "ats", "mmlu"].passed
    assert ("max_ece", "q4", "none", "triviaqa") not in results  # generative: no answer-level ECE
    increase = results["max_ece_increase", "q4", "ats", "mmlu"]  # vs the baseline's uncalibrated ECE
    assert increase.value == pytest.approx(0.04 - 0.10) and increase.passed
    token = results["max_token_ece", "q4", "none", None]  # a variant row without calibrated results is uncalibrated
    assert not token.passed and token.name == "max_token_ece [q4/none]"

    at_threshold = evaluate_gates(Gates(variant="q4", calibrator="none", tasks=("mmlu",), max_accuracy_drop=0.05),
                                  SYNTHETIC)
    assert at_threshold[0].passed  # 0.50 - 0.45 is a hair above 0.05 in floats

    only = evaluate_gates(Gates(calibrator="ats", tasks=("mmlu",), max_accuracy_drop=0.05), SYNTHETIC)
    assert [(r.variant, r.calibrator, r.task, r.passed) for r in only] == [("q4", "ats", "mmlu", True)]
    nothing = evaluate_gates(Gates(tasks=("triviaqa",), max_ece=0.5), SYNTHETIC)
    # a gate never passes by matching nothing
    assert len(nothing) == 1 and nothing[0].value is None and not nothing[0].passed


def test_an_answer_ece_check_on_a_collapsed_calibrator_fails_unless_allowed_and_says_why(capsys):
    def answer_row(task, collapsed):
        return {"variant": "q4", "calibrator": "answer_temperature", "task": task, "selected": True, "ece": 0.05,
                "auroc": 0.5, "collapsed": collapsed, "coverage": {}}

    from calq import cli
    from calq.api import Report

    report = {"variants": [], "answers": {"settings": {}, "results": [answer_row("arc", True),
                                                                      answer_row("piqa", False)]}}
    # by default the ECE under the threshold does not pass: it is |accuracy - 1/choices| of a constant predictor
    strict = Gates(max_answer_ece=0.1)
    results = {r.task: r for r in evaluate_gates(strict, report)}
    assert not results["arc"].passed and results["arc"].note == "constant predictor" and results["arc"].margin > 0
    assert results["piqa"].passed and results["piqa"].note is None
    section = gates_section(strict, report)
    table = sections.gates({"gates": section})
    assert [row[-1] for row in table.blocks[0].rows] == ["**FAIL** (constant predictor)", "pass"]
    assert "fails unless the gates set allow_constant_answers" in table.blocks[1].text
    verdict = sections.verdict(section)
    assert verdict.kind == "fail" and verdict.items == [
        "max_answer_ece [q4/answer_temperature/arc]: 0.0500, a constant predictor (answer confidence collapsed to "
        "uniform)"]
    with pytest.raises(cli.typer.Exit):
        cli._exit_on_gates(Report({"gates": section}, None))
    assert "max_answer_ece [q4/answer_temperature/arc] (constant predictor)" in capsys.readouterr().out

    # allowed: it passes, labelled, and every summary says what the pass rests on
    allowed = Gates(max_answer_ece=0.1, allow_constant_answers=True)
    results = {r.task: r for r in evaluate_gates(allowed, report)}
    assert results["arc"].passed and results["arc"].note == "constant predictor"
    section = gates_section(allowed, report)
    assert [row[-1] for row in sections.gates({"gates": section}).blocks[0].rows] == ["pass (constant predictor)",
                                                                                      "pass"]
    verdict = sections.verdict(section)
    assert verdict.kind == "pass" and "1 of them rest on a constant predictor" in verdict.text
    cli._exit_on_gates(Report({"gates": section}, None))
    assert "all gates passed (1 rest on a constant predictor" in capsys.readouterr().out
    # a collapsed calibrator over the threshold fails either way
    report["answers"]["results"][0]["ece"] = 0.3
    assert not evaluate_gates(allowed, report)[0].passed


def test_gate_names_are_checked_before_a_run():
    check_gates(Gates(variant="q4", calibrator="ats", tasks=("mmlu",), max_ece=0.1), ["baseline", "q4"],
                ["none", "ats"], ["mmlu"])
    cases = [(Gates(variant="q8"), "unknown variant 'q8'"), (Gates(calibrator="platt"), "unknown calibrator 'platt'"),
             (Gates(tasks=("piqa",)), "task 'piqa' is not evaluated"), (Gates(max_ece=0.1), None)]
    for gates, message in cases:
        with pytest.raises(CalqError, match=message or "needs evaluation tasks") as err:
            check_gates(gates, ["baseline", "q4"], ["none", "ats"], [] if message is None else ["mmlu"])
        assert "\n" not in str(err.value)


def test_gates_schema_forbids_unknown_keys_and_documents_every_key():
    with pytest.raises(ValidationError):
        Gates.model_validate({"max_acc_drop": 0.1})
    assert all(field.description for field in Gates.model_fields.values())


PROBE = """<script>addEventListener("load", () => { const images = [...document.images];
document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length + "/" + \
images.length; });</script>"""


def test_html_report_is_self_contained_and_renders_in_chromium(report, tmp_path):
    text = render.html("calq report: tiny", sections.build(report))
    page = tmp_path / "report.html"
    page.write_text(text)
    images = text.count("<img ")
    assert images >= 4 and text.count('src="data:image/png;base64,') == images
    assert "http://" not in text and "https://" not in text
    assert (text.index("FAIL") < text.index("Summary") < text.index("Token-level calibration")
            < text.index("Tasks (lm-eval)"))
    for part in ("max_accuracy_drop [damaged/none/arc_easy]", "Skipped variant awq-w4a16", "Activation outliers",
                 "SmoothQuant", "Versions"):
        assert part in text

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert f'data-images-loaded="{images}/{images}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280) and pixels[..., :3].std() > 0.05  # not a blank page
