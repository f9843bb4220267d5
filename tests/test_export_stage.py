"""Edge export as stages of a run: the recipe's `export:` section and `calq export RUN` write artifacts, re-verify
them on their runtimes, and put a Deployed table and the deployed gates in the report."""

import json

import pytest
from typer.testing import CliRunner

import calq
from calq.cli import app

pytest.importorskip("onnxruntime")
runner = CliRunner()


def test_export_stage_report_and_gates(tiny_recipe, tmp_path):
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]  # w4a16 g32 only
    tiny_recipe["evaluation"]["tokens"]["max_tokens"] = 512
    tiny_recipe["export"] = {"formats": ["onnx"], "variants": ["minmax-w4a16-g32"], "max_tokens": 256}
    tiny_recipe["gates"] = {"min_deployed_top1_agreement": 0.99, "max_deployed_ece_drift": 0.01}
    out = tmp_path / "run"
    report = calq.run(tiny_recipe, out=out)
    rows = report.data["deployed"]
    assert [(r["variant"], r["format"], r["calibrator"]) for r in rows] == [("minmax-w4a16-g32", "onnx", "none")]
    assert rows[0]["top1"] == 1.0 and abs(rows[0]["ece_drift"]) < 1e-4  # ONNX holds calq's own int4 values
    assert rows[0]["divergence"]["same_top1"] == 1.0 and rows[0]["divergence"]["mean_kld"] < 1e-4
    assert (out / "export" / "minmax-w4a16-g32" / "onnx" / "model.onnx").is_file()
    assert {r["gate"] for r in report.data["gates"]["results"]} == {"min_deployed_top1_agreement",
                                                                    "max_deployed_ece_drift"}
    assert rows[0]["load_seconds"] > 0  # the runtime's load, shown in the Deployed table
    assert report.passed and "| load (s) |" in (out / "report.md").read_text()

    result = runner.invoke(app, ["export", str(out), "--format", "gguf", "--variant", "minmax-w4a16-g32"])
    assert result.exit_code in (0, 1), result.output  # llama.cpp's int8 activations may drift past 0.01
    rows = json.loads((out / "report.json").read_text())["deployed"]
    assert {r["format"] for r in rows} == {"gguf"} and 0.9 <= rows[0]["top1"] <= 1.0


def test_export_refuses_bad_input_before_long_work(tiny_recipe, write_recipe, tmp_path):
    for spec, text in (({"formats": ["tflite"]}, "unknown export format 'tflite'"),
                       ({"variants": ["nope"]}, "unknown variant 'nope'"),
                       ({"calibrator": "ats"}, "the ats calibrator is not fitted")):
        tiny_recipe["export"] = spec
        result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
        assert result.exit_code == 2 and text in result.output, result.output
    calq.run({**tiny_recipe, "export": None}, out=tmp_path / "run", until="ranges")
    result = runner.invoke(app, ["export", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has not finished" in result.output
