"""End to end on the real bundled SmolLM2-135M (about 10 minutes on 2 cores): the quickstart recipe as `make demo`
runs it."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import data_dir
from typer.testing import CliRunner

from calq.cli import app

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


@pytest.mark.skipif(data_dir() is None, reason="needs CALQ_DATA_DIR (../shared/data) for the calibrators and tasks")
def test_quickstart_on_the_bundled_model(tmp_path):
    torch.set_num_threads(os.cpu_count())
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "--out", str(out), "--data-dir", str(data_dir())])
    assert result.exit_code == 0, result.output  # the recipe's gates pass
    report = json.loads((out / "report.json").read_text())
    by = {v["variant"]: v for v in report["variants"]}
    base, gptq = by["baseline"], by["gptq-w4a16-g64"]
    # a working 135M model on English prose: perplexity in the tens, top-1 accuracy around a third
    assert 10 < base["ppl"] < 60 and 0.25 < base["accuracy"] < 0.5
    # the 4-bit variant stays usable: within 1.5x the baseline's perplexity, at under half its size
    assert gptq["ppl"] < 1.5 * base["ppl"] and gptq["size_bytes"] < 0.5 * base["size_bytes"]
    assert "GGUF" in report["model"]["note"]
    for v in report["variants"]:
        assert v["selected"] in ("none", "temperature", "ats")
        for part in ("tokens", "responses"):
            accuracies = {m["accuracy"] for m in v["calibrated"][part].values()}
            assert len(accuracies) == 1  # calibrators rescale; they never change the argmax
    rows = report["tasks"]["results"]
    assert len(rows) == 2 * 3 and all(r["task"] == "arc_easy" and r["n"] == 50 for r in rows)
    answers = report["answers"]["results"]
    for variant in by:  # the selected answer calibrator, fitted on other tasks, repairs ARC-Easy's answer ECE
        mine = {r["calibrator"]: r for r in answers if r["variant"] == variant and r["task"] == "arc_easy"}
        chosen = next(r for r in mine.values() if r["selected"])
        assert chosen["ece"] < mine["none"]["ece"] and chosen["accuracy"] == mine["none"]["accuracy"]
    assert report["gates"]["passed"] is True
    assert (out / "report.html").stat().st_size > 10_000
