"""The whole run on the tiny model: report contents, resume, partial reruns, interruption, kill -9."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import data_dir
from typer.testing import CliRunner

from calq.cli import app

runner = CliRunner()
STAGES = ["samples", "ranges", "quantize/minmax-w8a8", "quantize/minmax-w4a16-g32", "eval_tokens",
          "evaluate/baseline", "evaluate/minmax-w8a8", "evaluate/minmax-w4a16-g32"]


def run(recipe_path, out):
    result = runner.invoke(app, ["run", str(recipe_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def markers(out) -> dict[str, float]:
    return {s: (out / ".calq" / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES}


def numbers(report) -> list:
    return [{k: v[k] for k in ("variant", "ppl", "accuracy", "confidence", "ece", "adaptive_ece", "brier", "tokens",
                               "size_bytes")}
            for v in report["variants"]]


def test_run_writes_checkpoints_and_report(tiny_recipe, write_recipe, tmp_path):
    out = tmp_path / "run"
    report = run(write_recipe(tiny_recipe), out)
    names = [v["variant"] for v in report["variants"]]
    assert names == ["baseline", "minmax-w8a8", "minmax-w4a16-g32"]
    for v in report["variants"]:
        assert v["tokens"] == 2048 // 64 * 63
        assert 0 <= v["ece"] <= 1 and 0 <= v["brier"] <= 1 and v["ppl"] > 1
    sizes = {v["variant"]: v["size_bytes"] for v in report["variants"]}
    assert sizes["minmax-w4a16-g32"] < sizes["minmax-w8a8"] < sizes["baseline"]
    assert report["calibration"]["num_samples"] == 8 and report["calibration"]["seed"] == 0
    assert report["versions"]["llmcompressor"] == "0.14.0.1"
    assert len(report["outliers"]) == 10 and report["outliers"][0]["ratio"] >= report["outliers"][-1]["ratio"]
    md = (out / "report.md").read_text()
    assert "| minmax-w4a16-g32 |" in md and "## Activation outliers" in md
    # each variant against the baseline loaded alongside; the baseline against itself
    divergence = {v["variant"]: v["divergence"]["none"] for v in report["variants"]}
    assert divergence["baseline"]["max_kld"] < 1e-6 and divergence["baseline"]["same_top1"] == 1.0
    assert all(d["tokens"] == 2048 // 64 * 63 and d["mean_kld"] > 0 for n, d in divergence.items() if n != "baseline")
    assert "## Divergence from the baseline" in md

    # compressed-tensors checkpoints that plain transformers reloads, in the format that was asked for
    config = json.loads((out / "variants" / "minmax-w4a16-g32" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    w8 = json.loads((out / "variants" / "minmax-w8a8" / "config.json").read_text())["quantization_config"]
    acts = w8["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is False and acts["strategy"] == "tensor"

    # `calq report` rebuilds the same numbers from stored results
    (out / "report.json").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert numbers(json.loads((out / "report.json").read_text())) == numbers(report)


def test_rerun_reuses_and_edits_rerun_only_dependents(tiny_recipe, write_recipe, tmp_path):
    out = tmp_path / "run"
    first = run(write_recipe(tiny_recipe), out)
    before = markers(out)
    again = run(write_recipe(tiny_recipe), out)
    assert markers(out) == before
    assert numbers(again) == numbers(first)

    tiny_recipe["variants"][1]["group_size"] = 16  # a new w4a16 variant; nothing else changes
    run(write_recipe(tiny_recipe), out)
    after = {s: (out / ".calq" / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES if "w4a16" not in s}
    assert after == {s: t for s, t in before.items() if "w4a16" not in s}
    assert (out / ".calq" / "stages" / "quantize" / "minmax-w4a16-g16.json").is_file()

    tiny_recipe["evaluation"]["tokens"]["bins"] = 10  # evaluation only
    run(write_recipe(tiny_recipe), out)
    now = markers_for(out, ["samples", "ranges", "quantize/minmax-w8a8", "eval_tokens", "evaluate/baseline"])
    assert now["samples"] == before["samples"] and now["quantize/minmax-w8a8"] == before["quantize/minmax-w8a8"]
    assert now["evaluate/baseline"] != before["evaluate/baseline"]


def markers_for(out, stages):
    return {s: (out / ".calq" / "stages" / f"{s}.json").stat().st_mtime_ns for s in stages}


def test_a_moved_run_with_moved_and_touched_inputs_reuses_every_stage(tiny_recipe, working_model, texts, alpaca,
                                                                       tmp_path):
    """Keys name content, not places: a finished run copied elsewhere, its model and data copied to other paths with
    new mtimes (the old copies deleted), recomputes nothing."""
    first = tmp_path / "first"
    shutil.copytree(working_model, first / "model")
    (first / "data" / "mc").mkdir(parents=True)
    for name, path in (("calib.txt", texts["calib"]), ("heldout.txt", texts["heldout"]), ("alpaca.json", alpaca)):
        shutil.copy(path, first / "data" / name)
    questions = [{"query": f"Question: {word}?", "choices": ["yes", "no"], "gold": i % 2}
                 for i, word in enumerate(["sky", "sea", "sun", "snow"])]
    (first / "data" / "mc" / "arc_easy.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    tiny_recipe["calibrators"] = {"data": {"source": "@data/alpaca.json"}, "use": ["temperature"], "fit_records": 30,
                                  "heldout_records": 10, "max_len": 128, "validation_text": {"tokens": 256}}
    tiny_recipe["evaluation"]["tokens"]["data"]["source"] = "@data/heldout.txt"  # under --data-dir
    tiny_recipe["evaluation"]["tasks"] = {"names": ["arc_easy"], "limit": 4, "bootstrap": 10}

    def run_at(root):
        tiny_recipe["model"]["id"] = str(root / "model")
        tiny_recipe["calibration"]["data"]["source"] = str(root / "data" / "calib.txt")  # a plain path
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe))
        result = runner.invoke(app, ["run", str(path), "--out", str(root / "run"), "--data-dir", str(root / "data")])
        assert result.exit_code == 0, result.output

    run_at(first)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(first, moved)  # markers keep their mtimes: a stage done again rewrites its marker
    shutil.rmtree(first)
    for path in [*(moved / "model").iterdir(), *(moved / "data").rglob("*")]:
        os.utime(path)
    done = {p: p.stat().st_mtime_ns for p in (moved / "run" / ".calq" / "stages").rglob("*.json")}
    stages = json.loads((moved / "run" / ".calq" / "manifest.json").read_text())["stages"]
    assert len(done) == len(stages) and any(s["name"] == "tasks/baseline" for s in stages)

    run_at(moved)
    assert {p: p.stat().st_mtime_ns for p in done} == done

    result = runner.invoke(app, ["export", str(moved / "run"), "--format", "gguf", "--data-dir", str(moved / "data"),
                                 "--model", str(moved / "model")])
    assert result.exit_code in (0, 1), result.output  # 1: a deployed gate, if the recipe had one
    assert {p: p.stat().st_mtime_ns for p in done} == done  # only the export stage ran
    assert (moved / "run" / "export" / "minmax-w4a16-g32" / "gguf" / "model.gguf").is_file()


def test_interrupted_stage_leaves_nothing_half_written(tiny_recipe, write_recipe, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    reference = run(write_recipe(tiny_recipe, "a.yaml"), tmp_path / "reference")
    original = PreTrainedModel.save_pretrained

    def dies_half_way(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        raise KeyboardInterrupt  # after the files are written, before the rename

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_half_way)
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 130
    assert not (out / "variants").exists() or not any((out / "variants").iterdir())
    assert not (out / ".calq" / "stages" / "quantize").exists()
    assert (out / ".calq" / "stages" / "ranges.json").is_file()  # finished stages are kept

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original)
    assert numbers(run(write_recipe(tiny_recipe), out)) == numbers(reference)


def test_kill_9_then_rerun_gives_the_same_report(tiny_recipe, write_recipe, tmp_path):
    path = write_recipe(tiny_recipe)
    reference = run(path, tmp_path / "reference")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "calq.cli", "run", str(path), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".calq" / "stages" / "quantize").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere inside quantization or the first evaluations
    proc.wait()
    assert numbers(run(path, out)) == numbers(reference)
    assert list(out.rglob(".*.tmp-*")) == []  # temporary files of the killed run were swept


def test_calibrators_are_fitted_and_evaluated_per_variant(tiny_recipe, write_recipe, alpaca, tmp_path):
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]  # w4a16 only: keeps the test short
    tiny_recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10,
                                  "max_len": 128, "ats": {"epochs": 2, "min_response_tokens": 100}}
    tiny_recipe["evaluation"]["tokens"]["bins"] = 10
    out = tmp_path / "run"
    report = run(write_recipe(tiny_recipe), out)
    for v in report["variants"]:
        stored = json.loads((out / "eval" / f"{v['variant']}.json").read_text())
        assert len(stored["responses"]["calibrators"]["none"]["reliability"]) == 10  # the recipe's bins, as tokens'
        assert len(stored["tokens"]["calibrators"]["none"]["reliability"]) == 10
        assert v["selected"] in ("none", "temperature", "ats") and v["temperature"] > 0
        for part in ("tokens", "responses"):
            cal = v["calibrated"][part]
            assert set(cal) == {"none", "temperature", "ats"}
            # one positive scale per position: accuracy is identical across calibrators
            assert cal["ats"]["accuracy"] == cal["temperature"]["accuracy"] == cal["none"]["accuracy"]
        assert (out / "calibrators" / v["variant"] / "ats" / "head.safetensors").is_file()
    assert report["calibrators"]["fit_records"] == 30 and report["calibrators"]["source"] == str(alpaca)
    assert {g["set"] for g in report["goals"]} == {"tokens", "responses"}
    assert "### Held-out instruction responses" in (out / "report.md").read_text()

    before = markers_for(out, ["calibrate/baseline", "evaluate/baseline"])
    tiny_recipe["calibrators"]["ats"]["epochs"] = 1  # refit only: samples and quantization are reused
    run(write_recipe(tiny_recipe), out)
    after = markers_for(out, ["samples", "calibrate/baseline", "evaluate/baseline"])
    assert after["calibrate/baseline"] != before["calibrate/baseline"]


def test_too_few_instruction_records_is_a_clear_error_before_long_work(tiny_recipe, write_recipe, alpaca, tmp_path):
    tiny_recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 100, "heldout_records": 10}
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert result.exit_code == 2
    assert "fewer than fit_records + heldout_records = 110" in result.output


@pytest.mark.skipif(data_dir() is None, reason="needs CALQ_DATA_DIR (../shared/data)")
def test_tasks_html_and_gates_set_the_exit_code(tiny_recipe, write_recipe, alpaca, tmp_path):
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    tiny_recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10,
                                  "max_len": 128, "ats": {"epochs": 1, "min_response_tokens": 100}}
    tiny_recipe["evaluation"]["tasks"] = {"names": ["arc_easy", "boolq"], "limit": 8, "batch_size": 8, "bootstrap": 50}
    tiny_recipe["gates"] = {"max_token_ece": 1.0, "max_accuracy_drop": 1.0}
    out = tmp_path / "run"
    args = ["run", str(write_recipe(tiny_recipe)), "--out", str(out), "--data-dir", str(data_dir())]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = report["tasks"]["results"]
    assert {(r["variant"], r["calibrator"], r["task"]) for r in rows} == {
        (v, c, t) for v in ("baseline", "minmax-w4a16-g32") for c in ("none", "temperature", "ats")
        for t in ("arc_easy", "boolq")}
    assert all(r["n"] == 8 and r["ece"] is not None for r in rows)
    assert report["gates"]["passed"] is True
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    assert html.index("Token-level calibration") < html.index("<h2>Calibrators</h2>") < html.index("Tasks (lm-eval)")
    selected = report["variants"][1]["selected"]
    assert f"<td>{selected} *</td>" in html and "Held-out instruction responses" in html and "<h3>Goals</h3>" in html

    # an impossible threshold fails the release: exit code 1, with the failing gate named; nothing recomputed
    tiny_recipe["gates"] = {"max_token_ece": 0.0}
    before = markers_for(out, ["tasks/baseline", "evaluate/baseline"])
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out),
                                 "--data-dir", str(data_dir())])
    assert result.exit_code == 1, result.output
    assert "gates failed" in result.output and "max_token_ece" in result.output
    assert markers_for(out, ["tasks/baseline", "evaluate/baseline"]) == before
    assert json.loads((out / "report.json").read_text())["gates"]["passed"] is False


def test_unknown_task_and_gate_names_are_refused_before_any_model_loads(tiny_recipe, write_recipe, tmp_path):
    tiny_recipe["evaluation"]["tasks"] = {"names": ["arc_hard"]}
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert result.exit_code == 2 and "arc_hard" in result.output
    del tiny_recipe["evaluation"]["tasks"]
    tiny_recipe["gates"] = {"variant": "awq-w4a16", "max_token_ece": 0.1}
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert result.exit_code == 2 and "unknown variant 'awq-w4a16'" in result.output


@pytest.mark.parametrize("ignore,error", [
    (["lm_head", "down_proj"], "model.layers.0.mlp.down_proj (160)"),  # a plain name is exact, not a suffix
    (["lm_head", r"re:model\.layers\.\d+\.mlp\.down_proj"], None),
    (["lm_head", "re:model"], "ignore leaves no Linear layer"),  # a regex matches from the start, not in full
    (["Linear"], "ignore leaves no Linear layer"),  # a class name
])
def test_ignore_is_checked_at_plan_time_as_llm_compressor_matches_it(ignore, error, tiny_recipe, write_recipe):
    tiny_recipe["variants"] = [{"method": "minmax", "scheme": "w4a16", "group_size": 64, "ignore": ignore}]
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert (result.exit_code, error is None or error in result.output) == (0 if error is None else 2, True), \
        result.output


def test_without_a_data_folder_the_sections_that_need_one_are_left_out(tiny_recipe, write_recipe, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("CALQ_DATA_DIR", raising=False)
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    tiny_recipe["calibrators"] = {"data": {"source": "@data/llamafactory/alpaca_en_demo.json"}}
    tiny_recipe["evaluation"]["tasks"] = {"names": ["arc_easy"]}
    tiny_recipe["gates"] = {"max_accuracy_drop": 0.1, "max_token_ece": 1.0}
    out = tmp_path / "run"
    report = run(write_recipe(tiny_recipe), out)
    assert "tasks" not in report and report["calibrators"] is None
    assert [r["gate"] for r in report["gates"]["results"]] == ["max_token_ece"]
    assert (any("calibrators skipped" in n for n in report["notes"])
            and any("tasks skipped" in n for n in report["notes"]))


def test_fit_ats_stops_after_the_calibrators(tiny_recipe, write_recipe, alpaca, tmp_path):
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    out = tmp_path / "run"
    result = runner.invoke(app, ["fit-ats", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 2 and "no `calibrators` section" in result.output
    tiny_recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10,
                                  "max_len": 128, "ats": {"epochs": 1, "min_response_tokens": 100}}
    result = runner.invoke(app, ["fit-ats", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "calibrators" / "minmax-w4a16-g32" / "ats" / "config.json").is_file()
    assert not (out / "eval").exists() and not (out / "report.json").exists()
    fitted = markers_for(out, ["calibrate/baseline", "calibrate/minmax-w4a16-g32"])
    assert run(write_recipe(tiny_recipe), out)["variants"][1]["selected"]
    # the full run reuses the fit
    assert markers_for(out, ["calibrate/baseline", "calibrate/minmax-w4a16-g32"]) == fitted


def test_a_method_version_bump_redoes_only_its_variants(tiny_recipe, write_recipe, monkeypatch):
    from calq.pipeline import plan
    from calq.quant.minmax import MinMax
    from calq.recipe import load_recipe

    tiny_recipe["variants"].append({"method": "smoothquant", "scheme": "w8a8"})
    recipe = load_recipe(write_recipe(tiny_recipe))
    before = plan(recipe, None).keys
    monkeypatch.setattr(MinMax, "version", 2)
    after = plan(recipe, None).keys
    changed = {stage for stage in before if before[stage] != after[stage]}
    assert changed == {f"{stage}/{v}" for stage in ("quantize", "evaluate")
                       for v in ("minmax-w8a8", "minmax-w4a16-g32")}
