"""Bad input: one line saying what, where and how to fix; exit code 2; nothing already written is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from calq.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def calq(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, *fragments):
    assert code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(*calq("run", tmp_path / "nope.yaml", "--dry-run"), "recipe file not found", "nope.yaml")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel:\n  id: [unclosed\n")
    assert_one_line_error(*calq("run", path, "--dry-run"), "malformed YAML", "bad.yaml:")


def test_misspelled_key_suggests_the_closest(tiny_recipe, write_recipe):
    tiny_recipe["calibration"]["num_sample"] = tiny_recipe["calibration"].pop("num_samples")
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"),
                          "unknown key 'calibration.num_sample'", "did you mean 'num_samples'")


def test_a_bad_recipe_is_reported_before_torch_is_imported(tmp_path):
    """The recipe is checked before torch, transformers, llm-compressor and lm-eval load (seconds): in a fresh
    process, `calq run` on a recipe with a typo exits 2 with one line and none of them imported."""
    recipe = {"name": "typo", "calibration": {"data": {"source": "calib.txt"}},
              "variants": [{"method": "minmax", "scheme": "w8a8"}],
              "evaluation": {"tokens": {"data": {"source": "heldout.txt"}}},
              "calibrators": {"data": {"source": "alpaca.json"}, "ats": {"alpah": 0.3}}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = ("import sys\n"
              "from typer.testing import CliRunner\n"
              "from calq.cli import app\n"
              "result = CliRunner().invoke(app, ['run', sys.argv[1]])\n"
              "heavy = {'torch', 'transformers', 'llmcompressor', 'lm_eval'} & set(sys.modules)\n"
              "assert not heavy, heavy\n"
              "print(result.output, end='')\n"
              "sys.exit(result.exit_code)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert not proc.stderr, proc.stderr
    assert_one_line_error(proc.returncode, proc.stdout, "unknown key 'ats.alpah'", "did you mean 'alpha'")


def test_calqs_own_calibrators_are_declared_for_the_recipe():
    """calq.calib.registry.OWN lets a recipe be checked without importing the calibrators (they import torch)."""
    from calq.calib import calibrators, registry

    own = {level: {name: cls.Config for name, cls in reg.items() if cls.__module__.startswith("calq.")}
           for level, reg in (("token", calibrators.TOKEN), ("answer", calibrators.ANSWER))}
    assert own == registry.OWN


def test_wrong_type(tiny_recipe, write_recipe):
    tiny_recipe["calibration"]["seq_len"] = "long"
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "calibration.seq_len", "'long'")


def test_sample_count_outside_range(tiny_recipe, write_recipe):
    del tiny_recipe["calibration"]["allow_any_size"]
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "128-512", "allow_any_size")


def test_missing_model_folder(tiny_recipe, write_recipe, tmp_path):
    tiny_recipe["model"]["id"] = str(tmp_path / "no-model")
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "model.id", "no model folder")


def test_missing_data_file(tiny_recipe, write_recipe, tmp_path):
    tiny_recipe["calibration"]["data"]["source"] = str(tmp_path / "missing.txt")
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "calibration.data", "missing.txt")


def test_data_dir_source_without_data_dir_or_fallback(tiny_recipe, write_recipe, monkeypatch):
    monkeypatch.delenv("CALQ_DATA_DIR", raising=False)
    tiny_recipe["calibration"]["data"]["source"] = "@data/wikitext2/wiki.test.raw"
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "needs a data folder", "--data-dir")


def test_unknown_method_and_scheme(tiny_recipe, write_recipe):
    tiny_recipe["variants"][0]["method"] = "gptq9"
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "variants[0].method",
                          "unknown method 'gptq9'")
    tiny_recipe["variants"][0] = {"method": "minmax", "scheme": "w3a3"}
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"), "unknown scheme 'w3a3'")


def test_impossible_group_size_names_layers_and_a_size_that_works(tiny_recipe, write_recipe):
    # the tiny model's MLP is 160 wide: 64 does not divide it, 32 does
    tiny_recipe["variants"][1]["group_size"] = 64
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"),
                          "group_size 64 does not divide", "mlp.down_proj (160)", "set group_size: 32")


def test_evaluating_on_the_calibration_text(tiny_recipe, write_recipe):
    tiny_recipe["evaluation"]["tokens"]["data"] = tiny_recipe["calibration"]["data"]
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--dry-run"),
                          "evaluation text is the calibration text")


def test_empty_data(tiny_recipe, write_recipe, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    tiny_recipe["calibration"]["data"]["source"] = str(empty)
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--out", tmp_path / "run"), "no records in",
                          "empty.jsonl", "calibration.data")


def test_fewer_tokens_than_samples_times_length(tiny_recipe, write_recipe, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("only a few words here")
    tiny_recipe["calibration"]["data"]["source"] = str(small)
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--out", tmp_path / "run"),
                          "fewer than num_samples × seq_len = 8 × 32", "lower num_samples")


def test_output_folder_of_another_recipe_is_left_alone(tiny_recipe, write_recipe, tmp_path):
    out = tmp_path / "run"
    (out / ".calq").mkdir(parents=True)
    (out / ".calq" / "run.json").write_text(json.dumps({"recipe": "someone-else"}))
    (out / "report.md").write_text("precious")
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--out", out), "belongs to recipe 'someone-else'")
    assert (out / "report.md").read_text() == "precious"


def test_foreign_non_empty_folder_is_refused(tiny_recipe, write_recipe, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_one_line_error(*calq("run", write_recipe(tiny_recipe), "--out", out), "not made by calq")
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("debug", [True])
def test_debug_shows_the_traceback(tmp_path, debug):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml"), "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_dry_run_lists_stages(tiny_recipe, write_recipe):
    code, output = calq("run", write_recipe(tiny_recipe), "--dry-run")
    assert code == 0, output
    for stage in ("samples", "ranges", "quantize/minmax-w8a8", "quantize/minmax-w4a16-g32", "evaluate/baseline"):
        assert stage in output
