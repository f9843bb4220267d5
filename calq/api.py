"""calq from Python. One call runs a whole recipe, exactly as `calq run` does (same folder, same resume):

    report = calq.run("recipes/quickstart.yaml", out="runs/quickstart", data_dir="../shared/data")
    report.passed, report.folder / "report.html"

and the stages are plain calls on in-memory objects, for users who bring their own model:

    quantized = calq.quantize(model, {"method": "awq", "scheme": "w4a16", "group_size": 64}, samples)
    fitted = calq.calibrate(quantized, tokenizer, records)            # none, temperature, ats; .selected
    metrics = calq.evaluate(quantized, fitted.calibrators, token_ids)  # every calibrator, one forward pass
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from calq import data as data_mod
from calq import pipeline, stages
from calq.calib import calibrators as calibrators_mod
from calq.calib import hidden
from calq.calib.base import Calibrator, FitData, split
from calq.errors import CalqError
from calq.evaluation import tokens as token_eval
from calq.quant import methods
from calq.quant.base import MethodConfig
from calq.recipe import Recipe, load_recipe, parse_recipe
from calq.report.build import read_manifest, write_reports
from calq.runs import RunDir, require_intact, write_text


@dataclass
class Report:
    """A finished run's report: `data` is report.json's content."""

    data: dict
    folder: Path

    @property
    def passed(self) -> bool | None:
        """Whether every gate passed (None: the recipe sets no gates)."""
        gates = self.data.get("gates")
        return None if not gates else gates["passed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.passed is False else 0

    @property
    def failed_gates(self) -> list[str]:
        gates = self.data.get("gates") or {"results": []}
        return [r["name"] + (f" ({r['note']})" if r.get("note") else "") for r in gates["results"] if not r["passed"]]


@dataclass
class Prepared:
    """A recipe checked and planned against its run folder, before any stage runs."""

    recipe: Recipe
    plan: pipeline.Plan
    run: RunDir
    data_root: Path | None
    text: str  # the recipe as written, kept in the run folder


def prepare(recipe: str | Path | dict | Recipe, out: str | Path | None = None,
            data_dir: str | Path | None = None) -> Prepared:
    """Read and check the recipe, drop what needs a missing data folder (with notes), and plan the run."""
    if isinstance(recipe, (str, Path)):
        r = load_recipe(recipe)
        text = Path(recipe).read_text(encoding="utf-8")
    else:
        r = parse_recipe(recipe)
        text = yaml.safe_dump(r.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    root = Path(out or r.output or Path("runs") / r.name)
    data_root = data_mod.data_dir(str(data_dir) if data_dir else None)
    if data_root is not None and not data_root.is_dir():
        raise CalqError(f"data folder not found: {data_root}", "--data-dir",
                        "pass an existing folder (e.g. ../shared/data)")
    r, notes = pipeline.without_unavailable_data(r, data_root)
    result = pipeline.plan(r, data_root)
    result.notes = notes
    return Prepared(r, result, RunDir(root), data_root, text)


def run(recipe: str | Path | dict | Recipe | Prepared, out: str | Path | None = None,
        data_dir: str | Path | None = None, until: str | None = None, executor=None, progress=None, log=None,
        debug: bool = False, address: str | None = None) -> Report | None:
    """Run a recipe (a YAML path, a dict, a Recipe, or what `prepare` returned) into its run folder, reusing
    finished stages (a stage whose outputs were damaged is redone, with a note); returns the report, or None when
    `until` ('ranges', 'quantize', 'calibrate' or 'evaluate') stops before it. One process writes a run folder at a
    time: a second one gets CalqError naming the first. `executor` is "local" (default), "ray" (a local Ray, or the
    cluster at `address`: auto, ray://host:port) or an object with `run(ctx, stages)`. `progress` is a rich Progress
    and `log` a function of one line, both optional."""
    if until is not None and until not in stages.GROUPS[1:]:
        raise CalqError(f"unknown stage group '{until}'", "--until", f"use one of: {', '.join(stages.GROUPS[1:])}")
    executor = _executor(executor, address)
    p = recipe if isinstance(recipe, Prepared) else prepare(recipe, out, data_dir)
    if until == "calibrate" and p.recipe.calibrators is None:
        raise CalqError("the recipe has no `calibrators` section to fit", "calibrators",
                        "add one (`calq keys` lists its keys)")
    with p.run.lock():
        p.run.claim(p.recipe.name)
        write_text(p.run.path("recipe.yaml"), p.text)
        pipeline.write_manifest(p.run, p.recipe, p.plan, p.data_root)
        ctx = pipeline.Context(p.recipe, p.run, p.data_root, pipeline.base_source(p.plan.source, p.run),
                               progress=progress, log=log or (lambda msg: None), debug=debug)
        pipeline.execute(ctx, p.plan, until, executor)
        if until is not None:
            return None
        return _write_report(p.run.root)


def _executor(executor, address: str | None):
    if executor == "ray":
        try:
            from calq.ray_executor import RayExecutor
        except ImportError:
            raise CalqError("ray is not installed", "--executor", "pip install 'calq[ray]'") from None
        return RayExecutor(address)
    if address is not None:
        raise CalqError("an address is for the Ray executor", "--address", "add --executor ray, or drop --address")
    if executor in (None, "local"):
        return pipeline.LocalExecutor()
    if isinstance(executor, str) or not hasattr(executor, "run"):
        raise CalqError(f"unknown executor {executor!r}", "--executor", "use local or ray")
    return executor


def report(run_dir: str | Path) -> Report:
    """Rebuild report.json, report.md and report.html from a run folder alone (no model, data or network).
    A folder whose stored results do not match their checksums is refused (CalqError naming the files)."""
    run_dir = RunDir(run_dir)
    require_intact(run_dir.root)  # refuses a folder calq did not make, too
    with run_dir.lock():
        return _write_report(run_dir.root)


def _write_report(root: Path) -> Report:
    try:
        return Report(write_reports(root), root)
    except FileNotFoundError as err:
        raise CalqError(f"missing result file {err.filename}", str(root), "finish the run with `calq run`") from None


def export(run_dir: str | Path, formats: list[str] | None = None, variants: list[str] | None = None,
           progress=None, log=None, data_dir: str | Path | None = None, model: str | Path | None = None) -> Report:
    """Export the variants of a finished run (their calibrators fused) and re-verify each artifact on its runtime:
    the run's own recipe with its `export:` section set from `formats` / `variants`; only the export stages run.
    `data_dir` / `model`: where the data folder and the model are now, for a run folder that moved (default: where the
    run read them); stages are keyed by content, so the finished ones are reused."""
    root = Path(run_dir)
    if not (root / ".calq" / "run.json").is_file():
        raise CalqError("not a calq run folder", str(root), "pass the folder a `calq run` wrote")
    run_folder = RunDir(root)
    manifest = read_manifest(run_folder)
    unfinished = [s["name"] for s in manifest["stages"] if not s["name"].startswith("export/")
                  and not (run_folder.meta / "stages" / f"{s['name']}.json").is_file()]
    if unfinished:
        raise CalqError(f"the run has not finished ({', '.join(unfinished[:3])} to run)", str(root),
                        "finish it with `calq run` first")
    recipe = dict(manifest["recipe"])
    spec = dict(recipe.get("export") or {})
    spec.update({k: list(v) for k, v in (("formats", formats), ("variants", variants)) if v})
    recipe["export"] = spec
    if model is not None:
        recipe["model"] = {**recipe["model"], "id": str(model)}
    return run(recipe, out=root, data_dir=data_dir or manifest["data_dir"], progress=progress, log=log)


def quantize(model, config: dict | MethodConfig, samples: torch.Tensor | None = None):
    """Quantize `model` in place with one method (`{"method": ..., "scheme": ...}` or a config from calq.quant) on
    calibration token ids [n, seq_len] (methods that read no data take None); returns the model."""
    cfg = methods.config(config)
    if samples is None and cfg.needs_data():
        raise CalqError(f"method {cfg.method} ({cfg.scheme}) calibrates on data and no samples were given", "samples",
                        "pass calibration token ids [n, seq_len]")
    return cfg.apply(model, samples)


@dataclass
class Calibration:
    """Calibrators fitted on one model: every one by name, their validation metrics, and the selected one."""

    calibrators: dict[str, Calibrator]
    validation: dict[str, dict]
    selected: str
    info: dict = field(default_factory=dict)

    @property
    def best(self) -> Calibrator:
        return self.calibrators[self.selected]


def calibrate(model, tokenizer, records: list[dict], use: tuple[str, ...] = ("temperature", "ats"),
              settings: dict[str, dict | BaseModel] | None = None, val_fraction: float = 0.2, seed: int = 0,
              max_len: int = 512, select_by: str = "ece", chunk: int = 1024,
              text: torch.Tensor | None = None) -> Calibration:
    """Fit calibrators on `model`'s own hidden states over Alpaca-style instruction records (instruction, input,
    output); `settings` maps a calibrator name to its settings (e.g. {"ats": {"epochs": 2}}). `text`: windows of
    plain-text token ids [n, T], never the text you evaluate on, validated on beside the instruction responses; the
    selected calibrator is then never worse than `none` on either (`validation`: {domain: {calibrator: metrics}})."""
    settings = settings or {}
    configs: dict[str, Any] = {}
    for name in use:
        config = calibrators_mod.TOKEN.get(name).Config
        given = settings.get(name, {})
        configs[name] = given if isinstance(given, BaseModel) else config.model_validate(given)
    with tempfile.TemporaryDirectory() as tmp:
        info = hidden.cache_hidden(model, tokenizer, records, Path(tmp) / "fit.safetensors", max_len=max_len,
                                   where="records")
        cached = hidden.load_cached(Path(tmp) / "fit.safetensors")
        if text is not None:
            info["text"] = hidden.cache_windows(model, text, Path(tmp) / "text.safetensors")
            text = hidden.load_cached(Path(tmp) / "text.safetensors")
    train, val = split(len(cached), val_fraction, seed)
    data = FitData(cached, train, val, hidden.Logits(model), model.config, chunk)
    fitted, validation, selected = calibrators_mod.fit_all(data, configs, select_by, text=text)
    return Calibration(fitted, validation, selected, info)


def evaluate(model, calibrators: dict[str, Calibrator] | None, tokens: torch.Tensor, seq_len: int = 512,
             batch_size: int = 4, bins: int = 15, baseline=None) -> dict:
    """Token-level metrics (perplexity, accuracy, ECE, Brier, reliability bins) of every calibrator on a 1-D stream
    of held-out token ids, in non-overlapping windows; one forward pass per batch serves every calibrator. With
    `baseline` (the unquantized model), each calibrator's metrics also hold `divergence`: KL(baseline ‖ calibrated
    model), median, 99th percentile, max, same top token, RMS Δp (calq.metrics.DivergenceStats)."""
    result = token_eval.evaluate(model, tokens, seq_len, batch_size, bins, calibrators, baseline=baseline)
    divergence = result.get("divergence", {})
    return {name: {**metrics, **({"divergence": divergence[name]} if name in divergence else {})}
            for name, metrics in result["calibrators"].items()}
