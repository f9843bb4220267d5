"""Answer calibrators of each variant: fitted on the fit tasks, evaluated on the evaluation tasks."""

from __future__ import annotations

import json

import torch

from calq.calib import calibrators
from calq.errors import located
from calq.evaluation import answer_calibration
from calq.models import BASELINE
from calq.pipeline import Context, raised_versions
from calq.runs import atomic_path, write_json
from calq.stage_kinds.tasks import read_task_results, task_files
from calq.stages import KINDS, StageKind


@KINDS.register
class Answers(StageKind):
    kind, pattern, group, words, order = "answers", "answers/<variant>", "evaluate", "answer calibration", 130
    outputs = {"calibrators": "answers/{variant}", "result": "answers/{variant}.json"}

    @classmethod
    def add_stages(cls, table) -> None:
        tasks = table.recipe.evaluation.tasks
        if tasks is None or tasks.answer_calibration is None:
            return
        answers = tasks.answer_calibration
        with_parent = any(calibrators.ANSWER.get(n).needs_parent for n in answers.use)
        for name in table.model:
            parent = ("fit_tasks/baseline", "answers/baseline") if name != BASELINE and with_parent else ()
            table.add(f"answers/{name}", stage_answers, name, needs=(f"fit_tasks/{name}", f"tasks/{name}", *parent),
                      settings=[answers.model_dump(exclude={"fit_tasks", "fit_limit"}), tasks.bootstrap, tasks.seed,
                                table.recipe.evaluation.tokens.bins, cls.version,
                                *raised_versions(calibrators.ANSWER, answers.use)])


def _answer_sets(ctx: Context, kind: str, name: str) -> dict:
    return answer_calibration.answer_sets(read_task_results(task_files(ctx, kind, name)))


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
        spec.select_by, ctx.recipe.evaluation.tokens.bins, tasks.bootstrap, tasks.seed, parents, spec.skip_at_chance)
    folder = ctx.output("answers", "calibrators", variant=name)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        for calibrator_name, calibrator in fitted.items():
            calibrator.save(tmp / calibrator_name)
    out = write_json(ctx.output("answers", "result", variant=name), {"variant": name, **section})
    return {"calibrators": folder, "result": out}, {"selected": section["selected"],
                                                    "not_fitted": section["not_fitted"]}
