"""Token-level selection on every validation domain (instruction responses and plain text): a calibrator that helps
instruction data but hurts plain text is not selected; the plain-text validation windows never overlap the
evaluation text or the calibration samples; the per-domain numbers reach the stage output and the report."""

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import data_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import calq
from calq import data as data_mod
from calq import models, pipeline
from calq.calib import base
from calq.calib.base import Calibrator, FitData
from calq.calib.hidden import CachedLogits
from calq.calib.select import select, worst_change
from calq.calib.temperature import fit_temperature
from calq.cli import app
from calq.recipe import load_recipe
from calq.runs import RunDir
from calq.stage_kinds import eval_tokens, validation_text

runner = CliRunner()
QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


class InstructionsOnly(Calibrator):
    """Helps instruction responses and hurts everything else: on hidden states it saw while fitting (the fit
    records) it applies the temperature that minimises the validation records' NLL; on any other hidden state it
    sharpens the logits fivefold, the way an adaptive head can extrapolate off its training domain."""

    name = "instructions_only"
    needs_hidden = True

    def __init__(self, t: float, known: torch.Tensor, weights: torch.Tensor):
        self.t, self.known, self.weights, self.fit_info = t, known, weights, {"t": t}

    @staticmethod
    def keys(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (hidden.half().view(torch.int16).long() * weights).sum(-1)  # exact: the cache holds float16

    @classmethod
    def fit(cls, data: FitData, config) -> "InstructionsOnly":
        weights = torch.randint(1, 2**20, (data.cached.hidden.shape[1],), generator=torch.Generator().manual_seed(0))
        t = fit_temperature(CachedLogits(data.cached, data.val, data.logits, data.chunk), 50)
        return cls(t, cls.keys(data.cached.hidden.float(), weights), weights)

    def scale(self, hidden, attention_mask=None):
        seen = torch.isin(self.keys(hidden, self.weights), self.known)
        return torch.where(seen, 1 / self.t, 5.0).float()


@pytest.fixture
def instructions_only(monkeypatch):
    monkeypatch.setitem(base.TOKEN._classes, "instructions_only", InstructionsOnly)  # what @register does, undone after


@pytest.fixture
def tiny(working_model):
    return AutoModelForCausalLM.from_pretrained(working_model), AutoTokenizer.from_pretrained(working_model)


@pytest.mark.parametrize("by", ["ece", "nll"])
def test_a_calibrator_that_helps_instructions_but_hurts_plain_text_is_not_selected(tiny, alpaca, texts, by,
                                                                                   instructions_only):
    model, tokenizer = tiny
    records = json.loads(alpaca.read_text())
    text = data_mod.windows(data_mod.token_stream([texts["calib"].read_text()], tokenizer, 1024), 64)
    use = ("instructions_only",)
    alone = calq.calibrate(model, tokenizer, records, use=use, max_len=128, select_by=by)
    both = calq.calibrate(model, tokenizer, records, use=use, max_len=128, select_by=by, text=text)
    v = both.validation
    assert set(v) == {"instructions", "text"} and set(alone.validation) == {"instructions"}
    # what the calibrator does, measured: better than none on instruction responses, worse on plain text
    assert v["instructions"]["instructions_only"][by] < v["instructions"]["none"][by]
    assert v["text"]["instructions_only"][by] > v["text"]["none"][by]
    assert alone.selected == "instructions_only"  # instruction validation alone would pick it
    assert both.selected == "none" and worst_change(v, "instructions_only", by) > 0


def test_selection_is_by_the_worst_domain():
    def metrics(**ece):
        return {name: {"ece": value, "nll": 1.0} for name, value in ece.items()}

    # ATS helps instruction responses most but hurts plain text; the temperature helps both
    v = {"instructions": metrics(none=0.05, temperature=0.03, ats=0.01),
         "text": metrics(none=0.020, temperature=0.013, ats=0.025)}
    assert select(v) == "temperature"
    assert worst_change(v, "none") == 0 and worst_change(v, "ats") == pytest.approx(0.25)
    assert select({"instructions": v["instructions"]}) == "ats"
    assert select({d: {k: m[k] for k in ("none", "ats")} for d, m in v.items()}) == "none"


def ngrams(ids: torch.Tensor, n: int) -> set[tuple]:
    ids = ids.flatten().tolist()
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def test_run_validates_per_domain_on_text_apart_from_evaluation_and_samples(tiny_recipe, write_recipe, alpaca,
                                                                             tmp_path):
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    tiny_recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10,
                                  "max_len": 128, "ats": {"epochs": 1, "min_response_tokens": 100},
                                  "validation_text": {"tokens": 1024}}
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())

    validation = load_file(str(out / "validation_text.safetensors"))["input_ids"]
    samples = load_file(str(out / "samples.safetensors"))["input_ids"]
    evaluated = load_file(str(out / "eval_tokens.safetensors"))["input_ids"]
    assert validation.shape == (1024 // 32, 32)
    # the default validation text is the calibration text: no sample window, nothing of the evaluation text
    assert not {tuple(w) for w in validation.tolist()} & {tuple(w) for w in samples.tolist()}
    assert not ngrams(validation, 24) & ngrams(evaluated, 24)
    assert report["calibrators"]["validation_text"]["left_out_sample_windows"] == samples.shape[0]

    for v in report["variants"]:
        stage = json.loads((out / ".calq" / "stages" / f"calibrate/{v['variant']}.json").read_text())["info"]
        assert stage["validation"] == v["validation"]
        assert set(v["validation"]) == {"instructions", "text"}
        for domain in v["validation"].values():
            assert set(domain) == {"none", "temperature", "ats"}
            assert all(m["ece"] >= 0 and m["nll"] > 0 for m in domain.values())
            assert domain[v["selected"]]["ece"] <= domain["none"]["ece"]  # never worse than none on a domain
        assert stage["worst_change"][v["selected"]] <= 0
    md = (out / "report.md").read_text()
    assert "### Validation (selection)" in md and "| plain text ECE | plain text NLL |" in md
    assert f"| {report['variants'][0]['variant']} | {report['variants'][0]['selected']} * |" in md
    assert "Validation (selection)" in (out / "report.html").read_text()


def test_validation_text_that_is_the_evaluation_text_is_refused(tiny_recipe, write_recipe, alpaca, texts):
    tiny_recipe["calibrators"] = {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10,
                                  "validation_text": {"data": {"source": str(texts["heldout"])}}}
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert result.exit_code == 2
    assert "the calibrators' validation text is the evaluation text" in result.output


@pytest.mark.slow  # the bundled model's tokenizer takes about 25 s to build from its GGUF file
@pytest.mark.skipif(data_dir() is None, reason="needs the offline data folder (CALQ_DATA_DIR)")
def test_quickstart_validation_text_shares_nothing_with_its_evaluation_text(tmp_path, monkeypatch):
    """The quickstart writes nothing about validation text: its default (WikiText-2 train, outside the calibration
    samples) shares no 24-token sequence with the WikiText-2 test windows it is evaluated on."""
    monkeypatch.setattr(models, "load_tokenizer", functools.cache(models.load_tokenizer))  # built once, not twice
    recipe = load_recipe(QUICKSTART)
    assert recipe.calibrators.validation_text.data is None
    source = models.resolve(recipe.model.id)
    ctx = pipeline.Context(recipe, RunDir(tmp_path / "run"), data_dir(), source)
    _, info = validation_text.stage_validation_text(ctx)
    eval_tokens.stage_eval_tokens(ctx)
    validation = load_file(str(ctx.run.path("validation_text.safetensors")))["input_ids"]
    evaluated = load_file(str(ctx.run.path("eval_tokens.safetensors")))["input_ids"]
    assert info["tokens"] == recipe.calibrators.validation_text.tokens
    assert info["source"].endswith("wikitext2_train_5k_HyperTensor.txt")
    assert not ngrams(validation, 24) & ngrams(evaluated, 24)
