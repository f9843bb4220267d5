"""One run as a declarative stage table, and the executor that runs it.

`plan(recipe, data_root)` checks everything that can fail before long work starts and builds the table
(`stage_table`): every stage kind (one module of `calq/stage_kinds/`, calq.stages) adds its stages, each a `Stage`
naming the stages it needs, the settings it depends on and the plain function that does it,
`fn(ctx, *args) -> ({name: output path}, info)`. A stage's key hashes its settings with the keys of the
stages it needs, so an edit reruns exactly what depends on it; `RunDir.run_stage` skips a stage whose key and
outputs are unchanged. An executor runs the table: `LocalExecutor` in this process, one stage after another;
another executor can run the same table without touching any stage.

Stages read their inputs by the producing kind and output name (`Context.output`), never by path.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from calq import data as data_mod
from calq import models, stages
from calq.errors import CalqError, located
from calq.evaluation import answer_calibration, harness
from calq.models import BASELINE
from calq.quant.base import MethodConfig, MethodUnavailable
from calq.recipe import Recipe, StageResources
from calq.registry import Registry
from calq.report.gates import check_gates
from calq.runs import RunDir, stable_hash, write_json

CODE_VERSION = 2  # bump when what every stage computes changes (a stage kind has its own `version`)
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
                v.check_layers({name: m.in_features for name, m in quantized.items()}, config)
        except MethodUnavailable as exc:
            result.skipped[v.label] = exc.line()
            continue
        if not quantized:
            raise CalqError(f"ignore leaves no Linear layer to quantize ({len(layers)} layers)",
                            f"variants[{i}].ignore", "ignore fewer layers (the default is lm_head only)")
        variants.append(v)
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
    for kind in stages.in_order():
        kind.check(recipe, data_root, result.variants, config)
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


@dataclass
class Table:
    """A run's stage table while the stage kinds add their stages (`StageKind.add_stages`, in their `order`)."""

    recipe: Recipe
    source: models.ModelSource
    data_root: Path | None
    variants: list[MethodConfig]  # the quantized variants that run (skipped ones left out)
    task_docs: dict[str, dict] | None  # what harness.check_tasks returned: examples per task and their sha256
    fit_docs: dict[str, dict] | None  # the same, for the answer calibrators' fit tasks
    bos: int | None  # the BOS id the tokenizer starts every text with (models.bos_policy)
    stages: list[Stage] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    model: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variant -> the stages its model comes from
    calibrators: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variant -> its calibrate stage

    def __post_init__(self):
        # placement changes where a model runs, not what it computes: it is left out of the keys. The model and the
        # data enter by content (models.identity, data_mod.fingerprint), never by path: a moved run folder keeps its
        # keys.
        self.keys["model"] = stable_hash(CODE_VERSION, self.recipe.model.dtype, models.identity(self.source))
        self.model[BASELINE] = self.base

    @property
    def base(self) -> tuple[str, ...]:
        """What a stage reading the base model needs: the dequantized GGUF, or nothing."""
        return ("base_model",) if self.source.gguf_file else ()

    @property
    def with_bos(self) -> list:
        """The BOS id as a part of the settings of stages that make token windows (none: earlier keys stay valid)."""
        return [["bos", self.bos]] if self.bos is not None else []

    def evaluated_on(self) -> dict[str, tuple[str, ...]]:
        """variant -> what evaluating it needs: its calibrators when fitted, else its model."""
        return {name: self.calibrators.get(name, needs) for name, needs in self.model.items()}

    @staticmethod
    def raised(kind: type[stages.StageKind]) -> list[int]:
        """[version] of a kind past its first version, for its settings; [] before, so keys stay as they were."""
        return [kind.version] if kind.version > 1 else []

    def add(self, name: str, fn: Callable, *args, needs: tuple[str, ...] = (), settings: Any = None) -> None:
        """Add a stage; its key hashes its settings with the keys of the model and of the stages it needs."""
        self.keys[name] = stable_hash(settings, *(self.keys[n] for n in ("model", *needs)))
        self.stages.append(Stage(name, fn, args, tuple(needs), settings, stages.spec_of(name).group, self.keys[name]))


def stage_table(recipe: Recipe, source: models.ModelSource, data_root: Path | None, variants: list[MethodConfig],
                task_docs: dict[str, dict] | None, bos: int | None = None,
                fit_docs: dict[str, dict] | None = None) -> list[Stage]:
    """Every stage of the run in execution order, each with its key: each stage kind adds its own (calq.stages).
    `bos`: the BOS id the tokenizer starts every text with (models.bos_policy); samples and evaluation windows start
    with it, so it is part of their keys. `task_docs`, `fit_docs`: what harness.check_tasks returned (examples per
    task and their sha256)."""
    table = Table(recipe, source, data_root, variants, task_docs, fit_docs, bos)
    for kind in stages.in_order():
        kind.add_stages(table)
    return table.stages


def raised_versions(registry: Registry, names) -> list[dict[str, int]]:
    """[{name: version}] of the named classes past their first version; [] when none is, so keys stay as before."""
    raised = {n: registry.get(n).version for n in names if registry.get(n).version > 1}
    return [raised] if raised else []


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


