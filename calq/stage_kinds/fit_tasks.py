"""The answer calibrators' fit tasks on each variant, uncalibrated, with their prompt features."""

from __future__ import annotations

from calq.calib import calibrators
from calq.pipeline import Context
from calq.stage_kinds.tasks import run_tasks, task_files, task_metrics, write_task_results
from calq.stages import KINDS, StageKind


@KINDS.register
class FitTasks(StageKind):
    kind, pattern, group, words, order = "fit_tasks", "fit_tasks/<variant>", "calibrate", "fit task evaluation", 120
    outputs = {"result": "fit_tasks/{variant}.json", "features": "fit_tasks/{variant}.safetensors"}

    @classmethod
    def add_stages(cls, table) -> None:
        tasks = table.recipe.evaluation.tasks
        if tasks is None or tasks.answer_calibration is None:
            return
        answers = tasks.answer_calibration
        for name, needs in table.model.items():
            table.add(f"fit_tasks/{name}", stage_fit_tasks, name, needs=needs,
                      settings=[answers.fit_tasks, answers.fit_limit, table.fit_docs, tasks.include_path,
                                cls.version])


def stage_fit_tasks(ctx: Context, name: str):
    """The answer calibrators' fit tasks on this variant, uncalibrated, with the prompt features they read."""
    spec = ctx.recipe.evaluation.tasks.answer_calibration
    none = {"none": calibrators.TOKEN.get("none")()}
    result = run_tasks(ctx, name, none, list(spec.fit_tasks), spec.fit_limit, True)
    return write_task_results(task_files(ctx, "fit_tasks", name), result), task_metrics(result)
