"""The Python API: one call runs a recipe, the README's example runs, a calibrator is a one-file addition, and a
report is rebuilt from the run folder alone."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import data_dir
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

import calq
from calq.calib import base
from calq.calib.base import Calibrator, FitData
from calq.calib.hidden import CachedLogits
from calq.calib.temperature import fit_temperature
from calq.cli import app
from calq.evaluation import harness

README = Path(__file__).parent.parent / "README.md"


def with_calibrators(recipe: dict, alpaca: Path, **extra) -> dict:
    recipe["variants"] = recipe["variants"][1:]  # w4a16 only: keeps the test short
    recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10, "max_len": 128,
                             "ats": {"epochs": 1, "min_response_tokens": 100}, **extra}
    return recipe


# ---- a calibrator added from this file alone ---------------------------------------------------------

class ToySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_iter: int = 50


class Toy(Calibrator):
    """A global temperature fitted on the validation records themselves: it has the best validation NLL by
    construction, so selection by NLL must pick it."""

    name = "toy"
    Config = ToySettings
    needs_hidden = False

    def __init__(self, t: float):
        self.t, self.fit_info = t, {"t": t}

    @classmethod
    def fit(cls, data: FitData, config: ToySettings) -> "Toy":
        return cls(fit_temperature(CachedLogits(data.cached, data.val, data.logits, data.chunk), config.max_iter))

    def scale(self, hidden, attention_mask=None):
        return hidden.new_full(hidden.shape[:2], 1 / self.t, dtype=torch.float32)

    def save(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "toy.json").write_text(json.dumps({"t": self.t}))

    @classmethod
    def load(cls, folder, model_config) -> "Toy":
        return cls(json.loads((Path(folder) / "toy.json").read_text())["t"])


def test_a_calibrator_is_one_file(tiny_recipe, alpaca, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(base.TOKEN._classes, "toy", Toy)  # what `@register` does, undone after the test
    # validated on the instruction records alone, where toy is the NLL optimum by construction (with plain text
    # too, selection takes the worst domain: tests/test_token_validation.py)
    recipe = with_calibrators(tiny_recipe, alpaca, use=["temperature", "ats", "toy"], select_by="nll",
                              toy={"max_iter": 30}, validation_text=None)
    report = calq.run(recipe, out=tmp_path / "run")
    for v in report.data["variants"]:
        assert v["selected"] == "toy"  # fitted, validated and selected
        for part in ("tokens", "responses"):  # evaluated on both held-out sets
            assert set(v["calibrated"][part]) == {"none", "temperature", "ats", "toy"}
            assert v["calibrated"][part]["toy"]["accuracy"] == v["calibrated"][part]["none"]["accuracy"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| baseline | toy * |" in md and "toy (max_iter 30)" in md

    folder = tmp_path / "run" / "calibrators" / "baseline" / "toy"
    lm = harness.CalqLM(pretrained=str(tiny_model), calibrator=f"toy:{folder}")
    assert isinstance(lm.calibrators["toy"], Toy) and lm.calibrators["toy"].t == Toy.load(folder, None).t
    plain = harness.CalqLM(pretrained=str(tiny_model))
    request = [(("a", "b"), [5, 6, 7, 8], [9, 10])]
    assert lm._loglikelihood_tokens(request)[0][0] != plain._loglikelihood_tokens(request)[0][0]


def test_recipe_settings_for_an_unknown_or_unused_calibrator_are_refused(tiny_recipe, alpaca):
    from calq.errors import CalqError
    from calq.recipe import parse_recipe

    for extra, text in (({"use": ["temperature", "atss"]}, "unknown calibrator 'atss'"),
                        ({"temprature": {}}, "did you mean 'temperature'"),
                        ({"use": ["temperature"], "ats": {"lr": 0.1}}, "settings for 'ats', which `use` does not list"),
                        ({"ats": {"lr": -1}}, "ats.lr")):
        with pytest.raises(CalqError, match=re.escape(text)):
            parse_recipe(with_calibrators(dict(tiny_recipe), alpaca, **extra))


# ---- the report from the run folder alone -------------------------------------------------------------

def test_report_is_rebuilt_without_model_or_data(tiny_recipe, working_model, alpaca, tmp_path, monkeypatch):
    monkeypatch.delenv("CALQ_DATA_DIR", raising=False)
    model = shutil.copytree(working_model, tmp_path / "model")
    data = tmp_path / "data"
    (data / "mc").mkdir(parents=True)
    questions = [{"query": f"Question: Which colour goes with {i}?", "choices": ["red", "green", "blue"], "gold": i % 3}
                 for i in range(6)]
    (data / "mc" / "arc_easy.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    shutil.copy(alpaca, data / "alpaca.json")
    recipe = with_calibrators(tiny_recipe, alpaca)
    recipe["model"]["id"] = str(model)
    recipe["calibrators"]["data"]["source"] = "@data/alpaca.json"
    recipe["evaluation"]["tasks"] = {"names": ["arc_easy"], "limit": 6, "bootstrap": 50}
    recipe["gates"] = {"max_token_ece": 0.0, "max_accuracy_drop": 1.0}  # one gate fails: exit code 1
    out = tmp_path / "run"
    first = calq.run(recipe, out=out, data_dir=data)
    assert first.exit_code == 1 and first.data["tasks"]["results"]

    shutil.rmtree(model)
    shutil.rmtree(data)
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == first.exit_code == 1, result.output
    rebuilt = json.loads((out / "report.json").read_text())
    assert {**rebuilt, "created": None} == json.loads(json.dumps({**first.data, "created": None}))


def test_report_of_an_unfinished_run_is_a_clear_error(tiny_recipe, tmp_path):
    calq.run(tiny_recipe, out=tmp_path / "run", until="ranges")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has not finished its evaluation" in result.output


# ---- the README's example -------------------------------------------------------------------------------

@pytest.mark.skipif(data_dir() is None, reason="needs CALQ_DATA_DIR (the shared offline data)")
def test_readme_python_example_runs(tiny_model, monkeypatch, capsys):
    text = README.read_text()
    code = re.search(r"```python\n(# The stages on your own model.*?)```", text, re.S).group(1)
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tiny_model)))
    code = code.replace("../shared/data", str(data_dir()))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    selected, eces = re.match(r"(\w+) (\{.*\})", printed.strip().splitlines()[-1]).groups()
    assert selected in ("none", "temperature", "ats") and set(eval(eces)) == {"none", "temperature", "ats"}


def test_revision_reaches_config_tokenizer_and_weights(monkeypatch):
    import transformers

    from calq import models
    from calq.errors import CalqError

    seen = {}

    def recorder(kind, result=None):
        def from_pretrained(location, **kwargs):
            seen[kind] = (location, kwargs.get("revision"))
            if result is None:
                raise OSError("offline")
            return result
        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder("config"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        recorder("tokenizer", type("Tok", (), {"pad_token": "x"})()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder("weights"))
    source = models.resolve("org/model", revision="v2")
    with pytest.raises(CalqError):
        models.load_config(source)
    models.load_tokenizer(source)
    with pytest.raises(CalqError):
        models.load(source)
    assert seen == {kind: ("org/model", "v2") for kind in ("config", "tokenizer", "weights")}
