"""One run as a declarative stage table, and the executor that runs it.

`plan(recipe, data_root)` checks everything that can fail before long work starts and builds the table
(`stage_table`): each `Stage` names the stages it needs, the settings it depends on and the plain function that
does it, `fn(ctx, *args) -> ({name: output path}, info)`. A stage's key hashes its settings with the keys of the
stages it needs, so an edit reruns exactly what depends on it; `RunDir.run_stage` skips a stage whose key and
outputs are unchanged. An executor runs the table: `LocalExecutor` in this process, one stage after another;
another executor can run the same table without touching any stage.

The stage kinds, their groups and the files each writes are declared once in `calq.stages`; stages read their
inputs through them (`Context.output`).
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calq import data as data_mod
from calq import models, stages
from calq.calib import calibrators, hidden, select
from calq.calib import ranges as ranges_mod
from calq.calib.base import CalibratedLM, FitData, split
from calq.errors import CalqError, located
from calq.evaluation import answer_calibration, harness, trust
from calq.evaluation import tokens as token_eval
from calq.export import base as export_base
from calq.models import BASELINE
from calq.quant import llmc
from calq.quant.base import MethodConfig, MethodUnavailable
from calq.recipe import Recipe, StageResources
from calq.registry import Registry
from calq.report.gates import check_gates
from calq.runs import RunDir, atomic_path, stable_hash, write_json

CODE_VERSION = 2  # bump when a stage's computation changes, so old markers stop matching
EVALUATE_VERSION = 3  # the same, for the evaluation stages alone
TASKS_VERSION = 1
ANSWERS_VERSION = 1
EXPORT_VERSION = 1
CHECK_VERSION = 1
PACKAGES = ("calq", "torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "lm_eval", "matplotlib")


@dataclass
class Context:
    """What every stage gets: the recipe, the run folder, the data folder and the base model's location."""

    recipe: Recipe
    run: RunDir
    data_root: Path | None
    source: models.ModelSource  # the base model as stages load it (for GGUF: the dequantized folder)
    progress: Any = None  # a rich Progress, or None
    log: Callable[[str], None] = lambda msg: None
    debug: bool = False

    def track(self, description: str, total: int | None) -> Callable[..., None] | None:
        """A progress bar: returns `update(done, total=None, description=None)`, or None without progress display."""
        if self.progress is None:
            return None
        task = self.progress.add_task(description, total=total)

        def update(done: int, total: int | None = None, description: str | None = None):
            self.progress.update(task, completed=done, **({"total": total} if total is not None else {}),
                                 **({"description": description} if description else {}))

        return update

    def original_source(self) -> models.ModelSource:
        """The model as the recipe names it (for a GGUF: the file itself, not the dequantized folder)."""
        m = self.recipe.model
        return models.resolve(m.id, m.gguf_file, m.revision)

    def variant_source(self, name: str) -> models.ModelSource:
        if name == BASELINE:
            return self.source
        return models.ModelSource(str(self.output("quantize", "checkpoint", variant=name)), kind="folder")

    def output(self, kind: str, name: str, **parts: str) -> Path:
        """Output `name` of a stage of kind `kind` in the run folder (calq.stages)."""
        return self.run.path(stages.output(kind, name, **parts))


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable  # fn(ctx, *args) -> ({output name: path}, info)
    args: tuple = ()
    needs: tuple[str, ...] = ()
    settings: Any = None  # everything besides upstream stages that the outputs depend on (hashed into the key)
    group: str = "prepare"
    key: str = ""


@dataclass
class Plan:
    """Everything checked before long work starts, and the stage table with every stage's key, in run order."""

    source: models.ModelSource
    stages: list[Stage] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)  # variant names, baseline first
    skipped: dict[str, str] = field(default_factory=dict)  # variant name -> why (an optional package is missing)
    notes: list[str] = field(default_factory=list)  # sections left out, and why

    @property
    def keys(self) -> dict[str, str]:
        return {s.name: s.key for s in self.stages}


# ---- the plan: checks, then the table ----------------------------------------------------------------

def without_unavailable_data(recipe: Recipe, data_root: Path | None) -> tuple[Recipe, list[str]]:
    """Without a data folder, drop the sections that need one (calibrators, tasks, the gates on them), with notes.

    So the quickstart still runs on a laptop with no network and no data folder; a missing file inside a
    given data folder stays an error."""
    if data_root is not None:
        return recipe, []
    notes, update = [], {}
    cal = recipe.calibrators
    if cal is not None:
        try:
            data_mod.check_available(cal.data, "calibrators.data", None)
        except data_mod.SourceUnavailable:
            update["calibrators"] = None
            notes.append(f"calibrators skipped: {cal.data.source} needs a data folder (--data-dir)")
    gates = recipe.gates
    if recipe.evaluation.tasks is not None:
        update["evaluation"] = recipe.evaluation.model_copy(update={"tasks": None})
        notes.append("tasks skipped: calq's task data is read from a data folder (--data-dir)")
        if gates is not None and gates.task_gates():
            notes.append(f"gates skipped: {', '.join(gates.task_gates())} (no tasks)")
            gates = gates.model_copy(update={g: None for g in gates.task_gates()})
            gates = gates if gates.thresholds() else None
    if update.get("calibrators", cal) is None and gates is not None and gates.calibrator not in (None, "none"):
        notes.append(f"gates skipped: they check calibrator '{gates.calibrator}', which was not fitted")
        gates = None
    if gates is not recipe.gates:
        update["gates"] = gates
    return recipe.model_copy(update=update), notes


def plan(recipe: Recipe, data_root: Path | None) -> Plan:
    """Check the recipe against the model config and the data (no model weights load) and build the stage table."""
    m = recipe.model
    source = models.resolve(m.id, m.gguf_file, m.revision)
    cal, ev = recipe.calibration, recipe.evaluation.tokens
    data_mod.check_available(cal.data, "calibration.data", data_root)
    data_mod.check_available(ev.data, "evaluation.tokens.data", data_root)
    used_for_calibration = {(cal.data.source, cal.data.split), (cal.data.fallback, cal.data.split)}
    evaluated = {(ev.data.source, ev.data.split), (ev.data.fallback, ev.data.split)}
    if evaluated & used_for_calibration - {(None, cal.data.split)}:
        raise CalqError("evaluation text is the calibration text", "evaluation.tokens.data",
                        "evaluate on held-out text: another file, or another split")
    config = models.load_config(source)
    layers = models.linear_layers(config)
    result = Plan(source)
    variants = []
    for i, v in enumerate(recipe.variants):
        quantized = v.quantized_layers(layers)
        try:
            with located(f"variants[{i}]"):
                v.check_model(config)
                v.check_group_size({name: m.in_features for name, m in quantized.items()})
        except MethodUnavailable as exc:
            result.skipped[v.label] = exc.line()
            continue
        if not quantized:
            raise CalqError(f"ignore leaves no Linear layer to quantize ({len(layers)} layers)",
                            f"variants[{i}].ignore", "ignore fewer layers (the default is lm_head only)")
        variants.append(v)
    if recipe.calibrators is not None:
        instruction_records(recipe.calibrators, data_root)  # too few records is an error now, not after quantization
        check_validation_text(recipe, data_root)
    task_docs = fit_docs = None
    if recipe.evaluation.tasks is not None:
        tasks = recipe.evaluation.tasks
        task_docs = harness.check_tasks(list(tasks.names), data_root, tasks.limit, "evaluation.tasks.names",
                                        list(tasks.include_path))
        answers = tasks.answer_calibration
        if answers is not None:
            where = "evaluation.tasks.answer_calibration"
            fit_docs = harness.check_tasks(list(answers.fit_tasks), data_root, answers.fit_limit,
                                           f"{where}.fit_tasks", list(tasks.include_path), multiple_choice=True)
            answer_calibration.check_split(list(fit_docs), list(task_docs), {t: d["n"] for t, d in fit_docs.items()},
                                           list(answers.use), where)
    result.variants = [BASELINE, *(v.label for v in variants)]
    if recipe.export is not None:
        check_export(recipe, result.variants)
    if recipe.gates is not None:
        answers = recipe.evaluation.tasks.answer_calibration if recipe.evaluation.tasks else None
        check_gates(recipe.gates, result.variants, recipe.calibrator_names(),
                    list(recipe.evaluation.tasks.names) if recipe.evaluation.tasks else [],
                    ["none", *answers.use] if answers else None, list(answers.targets) if answers else [])
    try:
        bos = models.bos_policy(models.load_tokenizer(source))
    except OSError as exc:
        raise CalqError(f"cannot load the tokenizer of {source.describe()} ({str(exc).splitlines()[0]})", "model.id",
                        "check the id or path; hub ids need network access") from None
    result.stages = stage_table(recipe, source, data_root, variants, task_docs, bos, fit_docs)
    for key in recipe.resources:
        if not any(_match(key, s) for s in result.stages):
            raise CalqError(f"'{key}' names no stage of this run", f"resources.{key}",
                            "use a stage group (quantize, calibrate, evaluate), kind (tasks) or name "
                            "(`calq run --dry-run` lists them)")
    return result


def _match(key: str, stage: Stage) -> int:
    """How specifically a `resources` key names a stage: 3 its name, 2 a prefix of it (quantize), 1 its group, 0 not."""
    if stage.name == key:
        return 3
    return 2 if stage.name.startswith(key + "/") else int(stage.group == key)


def stage_resources(recipe: Recipe, stage: Stage) -> tuple[str | None, StageResources]:
    """The recipe's `resources` entry for a stage (the most specific key), or the defaults; with the key."""
    ranked = sorted((_match(k, stage), len(k), k) for k in recipe.resources if _match(k, stage))
    if not ranked:
        return None, StageResources()
    key = ranked[-1][2]
    return key, recipe.resources[key]


def stage_table(recipe: Recipe, source: models.ModelSource, data_root: Path | None, variants: list[MethodConfig],
                task_docs: dict[str, dict] | None, bos: int | None = None,
                fit_docs: dict[str, dict] | None = None) -> list[Stage]:
    """Every stage of the run in execution order, each with its key. `bos`: the BOS id the tokenizer starts every
    text with (models.bos_policy); samples and evaluation windows start with it, so it is part of their keys.
    `task_docs`, `fit_docs`: what harness.check_tasks returned (examples per task and their sha256)."""
    cal, ev, spec, tasks = recipe.calibration, recipe.evaluation.tokens, recipe.calibrators, recipe.evaluation.tasks
    # placement changes where a model runs, not what it computes: it is left out of the keys. The model and the data
    # enter by content (models.identity, data_mod.fingerprint), never by path: a moved run folder keeps its keys.
    keys = {"model": stable_hash(CODE_VERSION, recipe.model.dtype, models.identity(source))}
    with_bos = [["bos", bos]] if bos is not None else []  # no BOS: the keys of earlier runs stay valid
    table: list[Stage] = []

    def add(name: str, fn: Callable, *args, needs: tuple[str, ...] = (), settings: Any = None):
        keys[name] = stable_hash(settings, *(keys[n] for n in ("model", *needs)))
        table.append(Stage(name, fn, args, tuple(needs), settings, stages.spec_of(name).group, keys[name]))

    base = ("base_model",) if source.gguf_file else ()
    if source.gguf_file:
        add("base_model", stage_base_model)
    add("samples", stage_samples, needs=base,
        settings=[cal.model_dump(exclude={"data"}), data_mod.fingerprint(cal.data, data_root), *with_bos])
    # before any long work (ranges, quantization); not a need of later stages: its settings must not rekey them
    add("baseline_check", stage_baseline_check, needs=base,
        settings=[recipe.model.check.model_dump(), data_mod.fingerprint(ev.data, data_root), CHECK_VERSION])
    add("ranges", stage_ranges, needs=("samples",), settings=recipe.outliers_top_k)
    fitted_on = {BASELINE: base}
    for v in variants:
        version = [type(v).version] if type(v).version > 1 else []  # a method's first version adds nothing
        add(f"quantize/{v.label}", stage_quantize, v, needs=("samples",) if v.needs_data() else base,
            settings=[v.model_dump(exclude_defaults=True), *version])
        fitted_on[v.label] = (f"quantize/{v.label}",)
    evaluated_on = dict(fitted_on)
    if spec is not None:
        calibrate_settings = spec.model_dump(exclude={"data", "fit_records", "heldout_records"})
        versions = _versions(calibrators.TOKEN, recipe.calibrator_names())
        add("instructions", stage_instructions,
            settings=[spec.model_dump(include={"fit_records", "heldout_records", "seed"}),
                      data_mod.fingerprint(spec.data, data_root)])
        text = spec.validation_text
        if text is not None:
            add("validation_text", stage_validation_text, needs=base,
                settings=[text.model_dump(exclude={"data"}), spec.seed, cal.model_dump(exclude={"data"}),
                          data_mod.fingerprint(text.data or cal.data, data_root), *with_bos])
        for name, needs in fitted_on.items():
            add(f"calibrate/{name}", stage_calibrate, name,
                needs=("instructions", *(("validation_text",) if text is not None else ()), *needs),
                settings=[calibrate_settings, *versions] if versions else calibrate_settings)
            evaluated_on[name] = (f"calibrate/{name}",)
    add("eval_tokens", stage_eval_tokens, needs=base,
        settings=[ev.max_tokens, data_mod.fingerprint(ev.data, data_root)])
    for name, needs in evaluated_on.items():
        add(f"evaluate/{name}", stage_evaluate, name, needs=("eval_tokens", *needs),
            settings=[ev.seq_len, ev.bins, EVALUATE_VERSION, *with_bos])  # batch_size changes speed, not results
    if tasks is not None:
        answers = tasks.answer_calibration
        # added only when set, so the keys of runs made before these options stay valid
        extra = [*([["include_path", tasks.include_path]] if tasks.include_path else []),
                 *([["features", True]] if answers else [])]
        for name, needs in evaluated_on.items():
            if not (tasks.split and len(task_docs) > 1):
                add(f"tasks/{name}", stage_tasks, name, needs=needs,
                    settings=[tasks.names, tasks.limit, task_docs, TASKS_VERSION, *extra])
                continue
            for task in task_docs:  # one stage per task; each keeps the forward pass shared by all calibrators
                add(f"tasks/{name}/{task}", stage_tasks, name, (task,), needs=needs,
                    settings=[[task], tasks.limit, {task: task_docs[task]}, TASKS_VERSION, *extra])
            add(f"tasks/{name}", stage_merge_tasks, name, tuple(task_docs),
                needs=tuple(f"tasks/{name}/{task}" for task in task_docs), settings=TASKS_VERSION)
        if answers is not None:
            for name, needs in fitted_on.items():
                add(f"fit_tasks/{name}", stage_fit_tasks, name, needs=needs,
                    settings=[answers.fit_tasks, answers.fit_limit, fit_docs, tasks.include_path,
                              TASKS_VERSION])
            with_parent = any(calibrators.ANSWER.get(n).needs_parent for n in answers.use)
            for name in fitted_on:
                parent = ("fit_tasks/baseline", "answers/baseline") if name != BASELINE and with_parent else ()
                add(f"answers/{name}", stage_answers, name, needs=(f"fit_tasks/{name}", f"tasks/{name}", *parent),
                    settings=[answers.model_dump(exclude={"fit_tasks", "fit_limit"}), tasks.bootstrap, tasks.seed,
                              ev.bins, ANSWERS_VERSION, *_versions(calibrators.ANSWER, answers.use)])
    if recipe.export is not None:
        for name in recipe.export.variants or evaluated_on:
            for fmt in recipe.export.formats:
                add(f"export/{name}/{fmt}", stage_export, name, fmt, needs=("eval_tokens", *evaluated_on[name]),
                    settings=[recipe.export.model_dump(exclude={"formats", "variants"}), ev.seq_len, ev.bins,
                              EXPORT_VERSION])
    return table


def _versions(registry: Registry, names) -> list[dict[str, int]]:
    """[{name: version}] of the named classes past their first version; [] when none is, so keys stay as before."""
    raised = {n: registry.get(n).version for n in names if registry.get(n).version > 1}
    return [raised] if raised else []


def check_export(recipe: Recipe, variants: list[str]) -> None:
    """Formats known, their runtimes installed, variants known, the calibrator fitted: before any long work."""
    spec = recipe.export
    for fmt in spec.formats:
        exporter = export_base.get(fmt, "export.formats")
        exporter.check_runtime()
        fuse = "none" if spec.calibrator == "selected" else calibrators.TOKEN.get(spec.calibrator).fuse
        if fuse not in exporter.calibrators:
            raise CalqError(f"{fmt} cannot hold the {spec.calibrator} calibrator (it holds: "
                            f"{', '.join(exporter.calibrators)})", "export.calibrator",
                            f"use calibrator: selected (the format then falls back to the temperature) or drop {fmt}")
    for name in spec.variants or ():
        if name not in variants:
            raise CalqError(f"unknown variant '{name}'", "export.variants", f"use one of: {', '.join(variants)}")
    if spec.calibrator not in ("selected", *recipe.calibrator_names()):
        raise CalqError(f"the {spec.calibrator} calibrator is not fitted in this recipe", "export.calibrator",
                        "add it to calibrators.use, or export with calibrator: none")


def base_source(source: models.ModelSource, run: RunDir) -> models.ModelSource:
    """Where later stages load the base model from: a GGUF model is dequantized once into the run folder."""
    if source.gguf_file:
        return models.ModelSource(str(run.path(stages.output("base_model", "model"))), kind="folder")
    return source


# ---- the manifest: what a run was, so that its report can be rebuilt from the folder alone ---------

def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_manifest(run: RunDir, recipe: Recipe, result: Plan, data_root: Path | None) -> Path:
    """RUN/.calq/manifest.json: the recipe as run, the model source, data folder, variants, skipped variants,
    notes, the stage table and the versions. `calq report` needs nothing else besides the stored results."""
    source = result.source
    return write_json(run.meta / "manifest.json", {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"id": recipe.model.id, "source": source.describe(), "kind": source.kind, "revision": source.revision},
        "data_dir": str(data_root) if data_root else None,
        "variants": result.variants, "skipped": result.skipped, "notes": result.notes,
        "calibrators": recipe.calibrator_names(),
        "stages": [{"name": s.name, "key": s.key, "needs": list(s.needs), "group": s.group} for s in result.stages],
        "versions": versions(), "machine": {"platform": platform.platform(), "cpus": _cpus()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def worker_context(root: str | Path, source: models.ModelSource, data_root: Path | None) -> Context:
    """A stage's Context in another process or machine (executors other than LocalExecutor): the recipe as run is
    read from the run folder's manifest, which also checks that this machine sees the folder; no progress or log."""
    run = RunDir(root)
    manifest = run.meta / "manifest.json"
    if not manifest.is_file():
        raise CalqError(f"this worker does not see the run folder ({manifest} is missing)", str(root),
                        "put the run folder (and the data folder) on storage every worker sees, at the same path")
    recipe = Recipe.model_validate(json.loads(manifest.read_text())["recipe"])
    return Context(recipe, run, data_root, source)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---- executors -------------------------------------------------------------------------------------

class LocalExecutor:
    """Runs the stages in table order in this process, reusing finished ones."""

    def run(self, ctx: Context, stages: list[Stage]) -> None:
        for stage in stages:
            # elapsed time while it works
            task = ctx.progress.add_task(stage.name, total=None) if ctx.progress else None
            try:
                rec = ctx.run.run_stage(stage.name, stage.key, stage.fn, ctx, *stage.args)
                if rec.redone:
                    ctx.log(f"[yellow]note:[/] {rec.redone}")
            finally:
                if task is not None:
                    ctx.progress.remove_task(task)
            state = "reused" if rec.reused else f"{rec.seconds:.1f} s, peak {rec.peak_rss_mb:,.0f} MB"
            ctx.log(f"[green]✓[/] {stage.name} [dim]({state})[/]")


def execute(ctx: Context, result: Plan, until: str | None = None, executor=None) -> None:
    """Run the table (up to and including the stages of group `until`), skipped variants noted first."""
    for label, why in result.skipped.items():
        ctx.log(f"[yellow]skipped[/] variant {label}: {why}")
    last = stages.GROUPS.index(until) if until else len(stages.GROUPS) - 1
    (executor or LocalExecutor()).run(ctx, [s for s in result.stages if stages.GROUPS.index(s.group) <= last])


# ---- stages ----------------------------------------------------------------------------------------

def stage_base_model(ctx: Context):
    """GGUF weights dequantized once into an ordinary transformers folder that every later stage loads."""
    source = ctx.original_source()
    model, tokenizer = models.load(source, ctx.recipe.model.dtype)
    final = ctx.output("base_model", "model")
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"model": final}, {"from": source.describe(), "size_bytes": models.size_on_disk(final),
                              "note": "dequantized from GGUF: the baseline carries the GGUF quantization error"}


def stage_baseline_check(ctx: Context):
    """Is the baseline a working LM, and for a GGUF the model llama.cpp reads from the file? (calq.evaluation.trust)
    A failure stops the run with one line (exit 2) unless `model.check.enforce` is false."""
    m = ctx.recipe.model
    model, tokenizer = models.load(ctx.source, m.dtype)
    texts = data_mod.load_texts(ctx.recipe.evaluation.tokens.data, "evaluation.tokens.data", ctx.data_root, tokenizer)
    original = ctx.original_source()
    gguf = Path(original.location) / original.gguf_file if original.gguf_file else None
    info = trust.verify(model, tokenizer, texts.docs, texts.name, gguf, **m.check.model_dump())
    if not info["passed"]:
        ctx.log(f"[yellow]baseline check failed, not enforced:[/] {info['problem']}")
    return {"result": write_json(ctx.output("baseline_check", "result"), info)}, info


def stage_samples(ctx: Context):
    cal = ctx.recipe.calibration
    tokenizer = models.load_tokenizer(ctx.source)
    texts = data_mod.load_texts(cal.data, "calibration.data", ctx.data_root, tokenizer)
    if texts.note:
        ctx.log(f"[yellow]note:[/] {texts.note}")
    stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=_sample_pool(cal))
    samples = data_mod.sample_windows(stream, cal.num_samples, cal.seq_len, cal.seed, "calibration",
                                      bos=models.bos_policy(tokenizer))
    out = ctx.output("samples", "samples")
    with atomic_path(out) as tmp:
        save_file({"input_ids": samples}, str(tmp), metadata={"source": texts.name})
    return {"samples": out}, {"source": texts.name, "note": texts.note, "tokens_read": int(stream.numel()),
                              "num_samples": cal.num_samples, "seq_len": cal.seq_len, "seed": cal.seed}


def _sample_pool(cal) -> int:
    """Tokens of the calibration text the samples are drawn from (the rest of the text is never read for them)."""
    return cal.num_samples * cal.seq_len * 8


def _samples(ctx: Context) -> torch.Tensor:
    return load_file(str(ctx.output("samples", "samples")))["input_ids"]


def stage_ranges(ctx: Context):
    model, _ = models.load(ctx.source, ctx.recipe.model.dtype)
    samples = _samples(ctx)
    collected = ranges_mod.collect(model, samples, progress=ctx.track("activation ranges", samples.shape[0]))
    out = ctx.output("ranges", "ranges")
    with atomic_path(out) as tmp:
        ranges_mod.save(collected, tmp, {"samples": str(samples.shape[0]), "seq_len": str(samples.shape[1])})
    summary = ranges_mod.outlier_summary(ranges_mod.load(out), ctx.recipe.outliers_top_k)
    return ({"ranges": out, "outliers": write_json(ctx.output("ranges", "outliers"), summary)},
            {"layers": len(collected) // 5})


def stage_quantize(ctx: Context, variant: MethodConfig):
    model, tokenizer = models.load(ctx.source, ctx.recipe.model.dtype)
    llmc.quiet_logs(str(ctx.run.path("logs", "llmcompressor.log")), console=ctx.debug)
    samples = _samples(ctx) if variant.needs_data() else None  # the table orders this stage after samples only then
    start = time.perf_counter()
    with located(f"variants[{ctx.recipe.variants.index(variant)}]"):
        variant.apply(model, samples)
    seconds = time.perf_counter() - start
    extra = variant.extra_outputs(model, samples, lambda: models.load(ctx.source, ctx.recipe.model.dtype)[0])
    outputs = {name: write_json(ctx.output("quantize", "method", output=name, variant=variant.label), obj)
               for name, obj in extra.items()}
    final = ctx.output("quantize", "checkpoint", variant=variant.label)
    with atomic_path(final) as tmp, warnings.catch_warnings():
        # llm-compressor leaves its offloading hooks on the model (all on the CPU here); the shard-size warning is moot
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
    used = variant.calibration_samples(samples).shape if variant.needs_data() else (0, 0)
    return {"checkpoint": final, **outputs}, {
        "calibration_seconds": round(seconds, 2), "size_bytes": models.size_on_disk(final), "method": variant.method,
        "scheme": variant.scheme, "group_size": variant.group_size, "calibration_samples": list(used)}


def stage_eval_tokens(ctx: Context):
    ev = ctx.recipe.evaluation.tokens
    tokenizer = models.load_tokenizer(ctx.source)
    texts = data_mod.load_texts(ev.data, "evaluation.tokens.data", ctx.data_root, tokenizer)
    if texts.note:
        ctx.log(f"[yellow]note:[/] {texts.note}")
    stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=ev.max_tokens)
    if stream.numel() < ev.seq_len:
        raise CalqError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {ev.seq_len}",
                        "evaluation.tokens", "use more text or a smaller seq_len")
    out = ctx.output("eval_tokens", "tokens")
    with atomic_path(out) as tmp:
        save_file({"input_ids": stream}, str(tmp), metadata={"source": texts.name})
    return {"tokens": out}, {"source": texts.name, "note": texts.note, "tokens": int(stream.numel())}


def instruction_records(spec, data_root: Path | None) -> tuple[str, list[dict], str | None]:
    """(source read, the Alpaca-style records, note on a fallback); fewer than fit + held-out records is an error."""
    name, records, note = data_mod.load_records(spec.data, "calibrators.data", data_root)
    records = [r for r in records if isinstance(r, dict) and r.get("instruction") and r.get("output")]
    need = spec.fit_records + spec.heldout_records
    if len(records) < need:
        raise CalqError(f"{name} has {len(records)} instruction records (with 'instruction' and 'output'), fewer than "
                        f"fit_records + heldout_records = {need}", "calibrators.data",
                        "give more Alpaca-style records, or lower fit_records / heldout_records")
    return name, records, note


def stage_instructions(ctx: Context):
    """Instruction records split once, with the recipe's seed, into fit and held-out sets shared by every variant."""
    spec = ctx.recipe.calibrators
    name, records, note = instruction_records(spec, ctx.data_root)
    if note:
        ctx.log(f"[yellow]note:[/] {note}")
    need = spec.fit_records + spec.heldout_records
    chosen = random.Random(spec.seed).sample(range(len(records)), need)
    parts = {"source": name, "note": note, "fit": [records[i] for i in chosen[:spec.fit_records]],
             "heldout": [records[i] for i in chosen[spec.fit_records:]]}
    out = write_json(ctx.output("instructions", "records"), parts)
    return {"records": out}, {"source": name, "note": note, "fit_records": spec.fit_records,
                              "heldout_records": spec.heldout_records, "seed": spec.seed}


def check_validation_text(recipe: Recipe, data_root: Path | None) -> None:
    """The calibrators' plain-text validation data is available and is not the evaluation text (before long work)."""
    text, ev = recipe.calibrators.validation_text, recipe.evaluation.tokens.data
    if text is None or text.data is None:  # the default, the calibration text, is checked against it in plan()
        return
    data_mod.check_available(text.data, "calibrators.validation_text.data", data_root)
    validated = {(text.data.source, text.data.split), (text.data.fallback, text.data.split)} - {(None, text.data.split)}
    if validated & {(ev.source, ev.split), (ev.fallback, ev.split)}:
        raise CalqError("the calibrators' validation text is the evaluation text", "calibrators.validation_text.data",
                        "validate on other text: another file or split, or omit data (the calibration text)")


def stage_validation_text(ctx: Context):
    """Windows of plain text (calibration.seq_len tokens) the calibrators are validated on beside the instruction
    responses: from `calibrators.validation_text.data`, or by default from the calibration text, never a window the
    calibration samples took. Never the evaluation text (plan() refuses it)."""
    spec, cal, seed = ctx.recipe.calibrators.validation_text, ctx.recipe.calibration, ctx.recipe.calibrators.seed
    tokenizer = models.load_tokenizer(ctx.source)
    bos = models.bos_policy(tokenizer)
    count = max(1, spec.tokens // cal.seq_len)
    where = "calibration.data" if spec.data is None else "calibrators.validation_text.data"
    texts = data_mod.load_texts(spec.data or cal.data, where, ctx.data_root, tokenizer)
    taken: list[int] = []
    if spec.data is None:  # the samples' windows are the first ones of this stream's grid: leave them out
        stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=_sample_pool(cal) + count * cal.seq_len)
        pool = data_mod.windows(stream[:_sample_pool(cal)], cal.seq_len, bos).shape[0]
        taken = data_mod.chosen_windows(pool, min(cal.num_samples, pool), cal.seed)
    else:
        stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=count * cal.seq_len)
    windows = data_mod.free_windows(stream, cal.seq_len, taken, count, seed, bos)
    if windows.shape[0] == 0:
        raise CalqError(f"{texts.name} has no window of {cal.seq_len} tokens left for validation", where,
                        "give calibrators.validation_text.data, or more text")
    out = ctx.output("validation_text", "windows")
    with atomic_path(out) as tmp:
        save_file({"input_ids": windows}, str(tmp), metadata={"source": texts.name})
    return {"windows": out}, {"source": texts.name, "note": texts.note, "windows": windows.shape[0],
                              "seq_len": cal.seq_len, "tokens": int(windows.numel()),
                              "left_out_sample_windows": len(taken)}


def stage_calibrate(ctx: Context, name: str):
    """Cache this model's hidden states on the fit and held-out responses (and the validation text); fit every
    calibrator the recipe lists on the fit records' training split, validate them on its validation split and on the
    validation text, and select one (calq.calib.select)."""
    spec = ctx.recipe.calibrators
    model, tokenizer = models.load(ctx.variant_source(name), ctx.recipe.model.dtype, ctx.recipe.model.device_map)
    records = json.loads(ctx.output("instructions", "records").read_text())
    final = ctx.output("calibrate", "calibrators", variant=name)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        caches = {}
        for part in ("fit", "heldout"):
            caches[part] = hidden.cache_hidden(model, tokenizer, records[part], tmp / f"{part}_hidden.safetensors",
                                               max_len=spec.max_len, where="calibrators.data",
                                               progress=ctx.track(f"hidden states {name} ({part})", len(records[part])))
        text = None
        if spec.validation_text is not None:
            windows = load_file(str(ctx.output("validation_text", "windows")))["input_ids"]
            caches["text"] = hidden.cache_windows(model, windows, tmp / "text_hidden.safetensors",
                                                  progress=ctx.track(f"hidden states {name} (text)", len(windows)))
            text = hidden.load_cached(tmp / "text_hidden.safetensors")
        cached = hidden.load_cached(tmp / "fit_hidden.safetensors")
        train, val = split(len(cached), spec.val_fraction, spec.seed)
        bar = ctx.track(f"fit calibrators {name}", None)
        data = FitData(cached, train, val, hidden.Logits(model), model.config, spec.logits_chunk,
                       progress=(lambda what, done, total: bar(done, total, f"{what} {name}")) if bar else None)
        fitted, validation, selected = calibrators.fit_all(data, spec.settings(), spec.select_by, text=text)
        calibrators.save_all(fitted, tmp)
        worst = {n: select.worst_change(validation, n, spec.select_by) for n in fitted}
        write_json(tmp / "calibrators.json", {"selected": selected, "validation": validation,
                                              "select_by": spec.select_by, "worst_change": worst,
                                              "fit": {n: c.fit_info for n, c in fitted.items()}, "caches": caches})
    return {"calibrators": final}, {"selected": selected, "validation": validation, "worst_change": worst}


def _load_calibrators(ctx: Context, name: str, config) -> tuple[dict, dict]:
    """{calibrator name: calibrator} for this variant, and what calibrators.json recorded ({} without calibrators)."""
    if ctx.recipe.calibrators is None:
        return {"none": calibrators.TOKEN.get("none")()}, {}
    folder = ctx.output("calibrate", "calibrators", variant=name)
    fitted = json.loads((folder / "calibrators.json").read_text())
    with located(f"calibrators/{name}"):
        return calibrators.load_all(folder, config, ctx.recipe.calibrator_names()), fitted


def stage_evaluate(ctx: Context, name: str):
    ev = ctx.recipe.evaluation.tokens
    source = ctx.variant_source(name)
    model, tokenizer = models.load(source, ctx.recipe.model.dtype, ctx.recipe.model.device_map)
    cals, fitted = _load_calibrators(ctx, name, model.config)
    device = model.get_output_embeddings().weight.device  # where the logits are, also with a device_map
    cals = {n: c.to(device) for n, c in cals.items()}
    stream = load_file(str(ctx.output("eval_tokens", "tokens")))["input_ids"]
    # windows of seq_len, BOS first when the tokenizer starts texts with it; evaluate cuts them at seq_len again
    stream = data_mod.windows(stream, ev.seq_len, models.bos_policy(tokenizer)).flatten()
    windows = stream.numel() // ev.seq_len
    result = {"tokens": token_eval.evaluate(model, stream, ev.seq_len, ev.batch_size, ev.bins, cals,
                                            progress=ctx.track(f"evaluate {name}", windows))}
    if fitted:
        with torch.no_grad():
            folder = ctx.output("calibrate", "calibrators", variant=name)
            cached = hidden.load_cached(folder / "heldout_hidden.safetensors")
            result["responses"] = {"calibrators": hidden.evaluate_cached(
                cached, torch.arange(len(cached)), hidden.Logits(model), cals,
                chunk=ctx.recipe.calibrators.logits_chunk, bins=ev.bins)}
        result.update(selected=fitted["selected"], validation=fitted["validation"], fit=fitted["fit"])
    out = write_json(ctx.output("evaluate", "result", variant=name), result)
    none = result["tokens"]["calibrators"]["none"]
    return {"result": out}, {"ece": none["ece"], "ppl": none["ppl"], "size_bytes": models.size_on_disk(source.location)}


def stage_export(ctx: Context, name: str, fmt: str):
    """The variant exported to `fmt` with its calibrator fused (RUN/export/<variant>/<fmt>/), loaded in its own
    runtime and re-verified against the PyTorch variant with the same calibrator on held-out windows."""
    spec, ev = ctx.recipe.export, ctx.recipe.evaluation.tokens
    source = ctx.variant_source(name)
    model, _ = models.load(source, "float32")
    cals, fitted = _load_calibrators(ctx, name, model.config)
    exporter = export_base.get(fmt)
    kind = fitted.get("selected", "none") if spec.calibrator == "selected" else spec.calibrator
    note = None
    if calibrators.TOKEN.get(kind).fuse not in exporter.calibrators:
        note = f"{fmt} cannot hold the {kind} calibrator: the global temperature is fused instead"
        kind = "temperature" if "temperature" in cals else "none"
    calibrator = None if kind == "none" else cals[kind]
    reference = model if calibrator is None else CalibratedLM(model, calibrator)
    options = {}
    if fmt == "gguf":  # the tokenizer as llama.cpp reads it: the source GGUF's own, else converted from the folder
        original = ctx.original_source()
        options["tokenizer"] = (str(Path(original.location) / original.gguf_file) if original.gguf_file
                                else source.location)
    if fmt == "executorch":  # the program's longest input: the verified window
        options["max_seq_len"] = ev.seq_len
    stream = load_file(str(ctx.output("eval_tokens", "tokens")))["input_ids"][: spec.max_tokens]
    final = ctx.output("export", "artifact", variant=name, format=fmt)
    with atomic_path(final) as tmp, torch.no_grad():
        tmp.mkdir(parents=True)
        result = export_base.export_and_verify(fmt, source.location, tmp, lambda ids: reference(input_ids=ids).logits,
                                               stream, ev.seq_len, calibrator, ev.bins, spec.threads, **options)
    result.update(calibrator=kind, note=note)
    out = write_json(ctx.output("export", "result", variant=name, format=fmt), result)
    return {"artifact": final, "result": out}, {"top1_agreement": result["verify"]["top1_agreement"],
                                                "ece_drift": result["verify"]["drift"]["ece"]}


def _run_tasks(ctx: Context, name: str, cals: dict, tasks: list[str], limit: int | None, features: bool) -> dict:
    spec = ctx.recipe.evaluation.tasks
    bar = ctx.track(f"tasks {name}", None)

    def progress(description, done, total):
        if bar is not None:
            bar(done, total, f"tasks {name}: {description}")

    return harness.run_tasks(ctx.variant_source(name).location, cals, tasks, limit, ctx.data_root, spec.batch_size,
                             dtype=ctx.recipe.model.dtype, progress=progress, include_path=list(spec.include_path),
                             features=features)


def _task_files(ctx: Context, kind: str, name: str, task: str | None = None) -> tuple[Path, Path]:
    """The result and feature files of a tasks or fit_tasks stage (with `task`: of one task's tasks stage)."""
    if task is None:
        return ctx.output(kind, "result", variant=name), ctx.output(kind, "features", variant=name)
    return (ctx.output(kind, "task_result", variant=name, task=task),
            ctx.output(kind, "task_features", variant=name, task=task))


def _write_task_results(files: tuple[Path, Path], result: dict) -> dict[str, Path]:
    """run_tasks output as JSON, its prompt features (features=True) in a safetensors file."""
    part, tensors = harness.split_features(result)
    out = {"result": write_json(files[0], part)}
    if tensors:
        out["features"] = files[1]
        with atomic_path(files[1]) as tmp:
            save_file(tensors, str(tmp))
    return out


def _read_task_results(files: tuple[Path, Path]) -> dict:
    path, features = files
    return harness.join_features(json.loads(path.read_text()),
                                 load_file(str(features)) if features.is_file() else {})


def _task_metrics(result: dict) -> dict:
    return {t: {c: r["metrics"] for c, r in v["calibrators"].items()} for t, v in result["tasks"].items()}


def stage_tasks(ctx: Context, name: str, only: tuple[str, ...] = ()):
    """lm-eval tasks under every calibrator: one forward pass per batch serves them all (calq.evaluation.harness).
    With `only` (evaluation.tasks.split), those tasks alone, into tasks/<variant>/<task>.json."""
    spec = ctx.recipe.evaluation.tasks
    cals, _ = _load_calibrators(ctx, name, models.load_config(ctx.variant_source(name)))
    result = _run_tasks(ctx, name, cals, list(only or spec.names), spec.limit, spec.answer_calibration is not None)
    return _write_task_results(_task_files(ctx, "tasks", name, *only), result), _task_metrics(result)


def stage_merge_tasks(ctx: Context, name: str, names: tuple[str, ...]):
    """The per-task results of one variant (evaluation.tasks.split) as one tasks/<variant>.json, in recipe order."""
    parts = [_read_task_results(_task_files(ctx, "tasks", name, task)) for task in names]
    result = {**parts[0], "tasks": {task: part["tasks"][task] for task, part in zip(names, parts)}}
    return _write_task_results(_task_files(ctx, "tasks", name), result), _task_metrics(result)


def stage_fit_tasks(ctx: Context, name: str):
    """The answer calibrators' fit tasks on this variant, uncalibrated, with the prompt features they read."""
    spec = ctx.recipe.evaluation.tasks.answer_calibration
    none = {"none": calibrators.TOKEN.get("none")()}
    result = _run_tasks(ctx, name, none, list(spec.fit_tasks), spec.fit_limit, True)
    return _write_task_results(_task_files(ctx, "fit_tasks", name), result), _task_metrics(result)


def _answer_sets(ctx: Context, kind: str, name: str) -> dict:
    return answer_calibration.answer_sets(_read_task_results(_task_files(ctx, kind, name)))


def _parent_probabilities(ctx: Context) -> dict[str, torch.Tensor]:
    """The calibrated baseline's answer probabilities on its fit tasks (its selected answer calibrator applied)."""
    selected = json.loads(ctx.output("answers", "result", variant=BASELINE).read_text())["selected"]
    sets = _answer_sets(ctx, "fit_tasks", BASELINE)
    if selected == "none":
        return {t: s.probabilities() for t, s in sets.items()}
    with located(f"answers/{BASELINE}/{selected}"):
        folder = ctx.output("answers", "calibrators", variant=BASELINE)
        calibrator = calibrators.ANSWER.get(selected).load(folder / selected)
    return {t: calibrator.apply(s) for t, s in sets.items()}


def stage_answers(ctx: Context, name: str):
    """Answer calibrators of one variant: fitted on the fit tasks, selected leave-one-fit-task-out, evaluated on the
    evaluation tasks (never fitted); one that `needs_parent` (quantized variants only) fitted label-free against the
    calibrated baseline."""
    tasks = ctx.recipe.evaluation.tasks
    spec = tasks.answer_calibration
    settings = spec.settings()
    parents = None
    with_parent = [n for n in settings if calibrators.ANSWER.get(n).needs_parent]
    if name == BASELINE:
        for n in with_parent:
            del settings[n]
    elif with_parent:
        parents = _parent_probabilities(ctx)
    fitted, section = answer_calibration.calibrate_answers(
        _answer_sets(ctx, "fit_tasks", name), _answer_sets(ctx, "tasks", name), settings, list(spec.targets),
        spec.select_by, ctx.recipe.evaluation.tokens.bins, tasks.bootstrap, tasks.seed, parents)
    folder = ctx.output("answers", "calibrators", variant=name)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        for calibrator_name, calibrator in fitted.items():
            calibrator.save(tmp / calibrator_name)
    out = write_json(ctx.output("answers", "result", variant=name), {"variant": name, **section})
    return {"calibrators": folder, "result": out}, {"selected": section["selected"],
                                                    "not_fitted": section["not_fitted"]}
