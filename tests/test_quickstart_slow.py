"""End to end on the real bundled SmolLM2-135M (minutes): the quickstart recipe with a smaller evaluation."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from calq.cli import app
from conftest import data_dir

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


def test_quickstart_on_the_bundled_model(tmp_path):
    import os

    import torch

    torch.set_num_threads(os.cpu_count())
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["evaluation"]["tokens"]["max_tokens"] = 8192
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["run", str(path), "--out", str(tmp_path / "run")]
    if data_dir():
        args += ["--data-dir", str(data_dir())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    by = {v["variant"]: v for v in report["variants"]}
    base, w8, w4 = by["baseline"], by["minmax-w8a8"], by["minmax-w4a16-g64"]
    # a working 135M model on English prose: perplexity in the tens, top-1 accuracy around a third
    assert 10 < base["ppl"] < 60 and 0.25 < base["accuracy"] < 0.5
    # int8 costs little; round-to-nearest int4 costs clearly more
    assert w8["ppl"] < base["ppl"] * 1.1
    assert w4["ppl"] > w8["ppl"]
    assert w4["size_bytes"] < w8["size_bytes"] < base["size_bytes"]
    assert "GGUF" in report["model"]["note"]
    assert all(v["tokens"] == 8192 // 512 * 511 for v in report["variants"])
