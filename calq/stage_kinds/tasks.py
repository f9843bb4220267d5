"""lm-eval tasks of each variant under every calibrator (calq.evaluation.harness)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from calq import models
from calq.evaluation import harness
from calq.pipeline import Context
from calq.runs import atomic_path, write_json
from calq.stage_kinds.calibrate import load_calibrators
from calq.stages import KINDS, StageKind


@KINDS.register
class Tasks(StageKind):
    kind, pattern, group, words, order = "tasks", "tasks/<variant>", "evaluate", "task evaluation", 110
    # evaluation.tasks.split: tasks/<variant>/<task> per task (the `task*` outputs), merged by tasks/<variant>
    outputs = {"result": "tasks/{variant}.json", "features": "tasks/{variant}.safetensors",
               "task_result": "tasks/{variant}/{task}.json", "task_features": "tasks/{variant}/{task}.safetensors"}

    @classmethod
    def add_stages(cls, table) -> None:
        tasks, task_docs = table.recipe.evaluation.tasks, table.task_docs
        if tasks is None:
            return
        # added only when set, so the keys of runs made before these options stay valid
        extra = [*([["include_path", tasks.include_path]] if tasks.include_path else []),
                 *([["features", True]] if tasks.answer_calibration else [])]
        for name, needs in table.evaluated_on().items():
            if not (tasks.split and len(task_docs) > 1):
                table.add(f"tasks/{name}", stage_tasks, name, needs=needs,
                          settings=[tasks.names, tasks.limit, task_docs, cls.version, *extra])
                continue
            for task in task_docs:  # one stage per task; each keeps the forward pass shared by all calibrators
                table.add(f"tasks/{name}/{task}", stage_tasks, name, (task,), needs=needs,
                          settings=[[task], tasks.limit, {task: task_docs[task]}, cls.version, *extra])
            table.add(f"tasks/{name}", stage_merge_tasks, name, tuple(task_docs),
                      needs=tuple(f"tasks/{name}/{task}" for task in task_docs), settings=cls.version)


def run_tasks(ctx: Context, name: str, cals: dict, tasks: list[str], limit: int | None, features: bool) -> dict:
    spec = ctx.recipe.evaluation.tasks
    bar = ctx.track(f"tasks {name}", None)

    def progress(description, done, total):
        if bar is not None:
            bar(done, total, f"tasks {name}: {description}")

    return harness.run_tasks(ctx.variant_source(name).location, cals, tasks, limit, ctx.data_root, spec.batch_size,
                             dtype=ctx.recipe.model.dtype, progress=progress, include_path=list(spec.include_path),
                             features=features)


def task_files(ctx: Context, kind: str, name: str, task: str | None = None) -> tuple[Path, Path]:
    """The result and feature files of a tasks or fit_tasks stage (with `task`: of one task's tasks stage)."""
    if task is None:
        return ctx.output(kind, "result", variant=name), ctx.output(kind, "features", variant=name)
    return (ctx.output(kind, "task_result", variant=name, task=task),
            ctx.output(kind, "task_features", variant=name, task=task))


def write_task_results(files: tuple[Path, Path], result: dict) -> dict[str, Path]:
    """run_tasks output as JSON, its prompt features (features=True) in a safetensors file."""
    part, tensors = harness.split_features(result)
    out = {"result": write_json(files[0], part)}
    if tensors:
        out["features"] = files[1]
        with atomic_path(files[1]) as tmp:
            save_file(tensors, str(tmp))
    return out


def read_task_results(files: tuple[Path, Path]) -> dict:
    path, features = files
    return harness.join_features(json.loads(path.read_text()),
                                 load_file(str(features)) if features.is_file() else {})


def task_metrics(result: dict) -> dict:
    return {t: {c: r["metrics"] for c, r in v["calibrators"].items()} for t, v in result["tasks"].items()}


def stage_tasks(ctx: Context, name: str, only: tuple[str, ...] = ()):
    """lm-eval tasks under every calibrator: one forward pass per batch serves them all (calq.evaluation.harness).
    With `only` (evaluation.tasks.split), those tasks alone, into tasks/<variant>/<task>.json."""
    spec = ctx.recipe.evaluation.tasks
    cals, _ = load_calibrators(ctx, name, models.load_config(ctx.variant_source(name)))
    result = run_tasks(ctx, name, cals, list(only or spec.names), spec.limit, spec.answer_calibration is not None)
    return write_task_results(task_files(ctx, "tasks", name, *only), result), task_metrics(result)


def stage_merge_tasks(ctx: Context, name: str, names: tuple[str, ...]):
    """The per-task results of one variant (evaluation.tasks.split) as one tasks/<variant>.json, in recipe order."""
    parts = [read_task_results(task_files(ctx, "tasks", name, task)) for task in names]
    result = {**parts[0], "tasks": {task: part["tasks"][task] for task, part in zip(names, parts)}}
    return write_task_results(task_files(ctx, "tasks", name), result), task_metrics(result)
