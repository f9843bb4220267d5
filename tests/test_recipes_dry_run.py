"""Every recipe in recipes/ passes `calq run --dry-run`: the bundled model's as they are, and those for hub models
against the model's config.json in tests/configs/ (no weights; the tokenizer is tests/tiny.py's byte-level one, since
the plan only asks it for its BOS policy). Needs the data folder (CALQ_DATA_DIR) for the recipes that read it."""

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import data_dir
from tiny import save_byte_tokenizer
from typer.testing import CliRunner

from calq.cli import app

ROOT = Path(__file__).parent.parent
CONFIGS = {  # hub id -> config folder under tests/configs
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b-instruct",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b-instruct",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b-instruct",
}
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_dry_run(name, tmp_path, monkeypatch):
    if data_dir() is None:
        pytest.skip("CALQ_DATA_DIR is not set (the recipes read the data folder)")
    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
    model_id = recipe["model"]["id"]
    if "/" in model_id:
        assert model_id in CONFIGS, f"add {model_id}'s config.json under tests/configs/"
        folder = tmp_path / "model"
        folder.mkdir()
        shutil.copy(ROOT / "tests" / "configs" / CONFIGS[model_id] / "config.json", folder)
        save_byte_tokenizer(folder)
        recipe["model"]["id"] = str(folder)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.chdir(ROOT)  # recipes name task folders relative to the repository
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
