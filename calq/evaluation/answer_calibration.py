"""Answer-level calibration of one variant end to end, from `harness.run_tasks(..., features=True)` output.

    check_split(fit_tasks, eval_tasks, counts)          # before any model loads: overlap, too few questions
    fit_sets, eval_sets = answer_sets(fit_results), answer_sets(eval_results)   # {task: AnswerSet}
    fitted, section = calibrate_answers(fit_sets, eval_sets, {"answer_temperature": None, ...}, targets=[0.8])

The fit tasks and the evaluation tasks never overlap: every evaluation row is on a task no calibrator saw. Each
variant's answer calibrator is selected by leave-one-fit-task-out: every candidate is refitted without one fit task
and scored on it, so selection too uses only tasks the candidate did not see; a calibrator more flexible than one
temperature must score at most the better of it and `none` on every held-out fit task (`select`).

Fit tasks are screened per variant: one where the model is at chance (its accuracy interval reaches 1/choices or
lies below) is left out of fitting. There the likelihood-optimal temperature is infinite, whatever weight the task
gets, so weighting would still pull every temperature towards uniform; such a task teaches nothing about one where
the model knows something. With every fit task at chance no calibrator is fitted and `none` is selected.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel

from calq.calib.answer_base import AnswerCalibrator, AnswerFitData, task_folds
from calq.calib.answer_features import AnswerSet, nll, top_choice
from calq.calib.calibrators import ANSWER
from calq.errors import CalqError
from calq.evaluation.selective import against_chance, bands, selective_report, summary
from calq.evaluation.tasks import shared_data
from calq.metrics import ece

MIN_FIT_QUESTIONS = 20


def check_split(fit_tasks: list[str], eval_tasks: list[str], counts: dict[str, int] | None = None,
                names: list[str] = (), where: str = "evaluation.answer_calibration") -> None:
    """One-line errors before long work: fit and evaluation tasks overlapping, a fit task with too few questions
    (counts: harness.check_tasks' output), an unknown answer calibrator, fewer fit tasks than one needs."""
    overlap = sorted(set(fit_tasks) & set(eval_tasks))
    if overlap:
        raise CalqError(f"fit tasks and evaluation tasks overlap: {', '.join(overlap)}", where,
                        "an answer calibrator must be evaluated on tasks it never saw; remove them from one list")
    for fit_task in fit_tasks:
        for eval_task in eval_tasks:
            if shared := shared_data(fit_task, eval_task):
                raise CalqError(f"fit task '{fit_task}' and evaluation task '{eval_task}' read the same questions "
                                f"({shared})", where, "an answer calibrator must be evaluated on questions it never "
                                                      "saw; remove one of them")
    if not fit_tasks:
        raise CalqError("no fit tasks listed", where,
                        "list multiple-choice fit tasks, e.g. openbookqa, commonsense_qa, siqa, copa")
    for task in fit_tasks:
        if counts is not None and counts.get(task, 0) < MIN_FIT_QUESTIONS:
            raise CalqError(f"fit task '{task}' has {counts.get(task, 0)} questions", where,
                            f"give each fit task at least {MIN_FIT_QUESTIONS} (raise its limit)")
    for name in names:
        need = ANSWER.get(name, where).min_fit_tasks
        if len(fit_tasks) < need:
            raise CalqError(f"{name} needs {need} or more fit tasks", where, "add a fit task")


def answer_sets(results: dict, calibrator: str = "none") -> dict[str, AnswerSet]:
    """{task: AnswerSet} for every multiple-choice task of a run_tasks output (its scores under `calibrator`)."""
    return {name: AnswerSet.from_task(entry, calibrator) for name, entry in results["tasks"].items()
            if entry.get("output_type") == "multiple_choice"}


def fit_answer_calibrators(fit_sets: dict[str, AnswerSet], settings: dict[str, BaseModel | None], seed: int = 0,
                           parent_probabilities: dict[str, torch.Tensor] | None = None
                           ) -> tuple[dict[str, AnswerCalibrator], dict[str, float]]:
    """Every calibrator named in `settings` ({name: its Config or None}) fitted on the fit tasks, and seconds each.
    One that `needs_parent` is fitted on the same prompts without their labels, against `parent_probabilities`."""
    data = AnswerFitData(fit_sets, seed=seed)
    fitted, seconds = {}, {}
    for name, config in settings.items():
        cls = ANSWER.get(name)
        start = time.perf_counter()
        if cls.needs_parent:
            unlabelled = {t: AnswerSet(s.loglikelihoods, None, s.hidden, s.choice_tokens) for t, s in fit_sets.items()}
            fitted[name] = cls.fit(AnswerFitData(unlabelled, seed=seed, parent_probabilities=parent_probabilities))
        else:
            fitted[name] = cls.fit(data, config if config is not None else cls.Config())
        seconds[name] = time.perf_counter() - start
    return fitted, seconds


def answer_section(fitted: dict[str, AnswerCalibrator], sets: dict[str, AnswerSet], fit_tasks: list[str],
                   eval_tasks: list[str], targets: list[float] = (0.8,), bins: int = 15, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """{"rows": one per evaluation task x calibrator (`none` first) with summary() metrics and confidence bands,
    "selective": {calibrator: selective_report}, "fit_accuracy": {fit task: against_chance}} for a report."""
    every = {"none": None, **fitted}

    def probabilities(name: str, answers: AnswerSet) -> torch.Tensor:
        return answers.probabilities() if every[name] is None else every[name].apply(answers)

    rows = []
    for task in eval_tasks:
        answers = sets[task]
        for name in every:
            p = probabilities(name, answers)
            conf, correct = top_choice(p, answers.gold)
            rows.append({"task": task, "calibrator": name, **summary(p, answers, bins, n_boot, seed),
                         "bands": bands(conf, correct)})
    fit_gold = [sets[t].gold for t in fit_tasks]
    selective = {name: selective_report([probabilities(name, sets[t]) for t in fit_tasks], fit_gold,
                                        {t: (probabilities(name, sets[t]), sets[t].gold) for t in eval_tasks},
                                        list(targets), n_boot, seed)
                 for name in every}
    return {"fit_tasks": list(fit_tasks), "eval_tasks": list(eval_tasks), "rows": rows, "selective": selective,
            "fit_info": {name: c.fit_info for name, c in fitted.items()},
            "fit_accuracy": {t: against_chance(sets[t], n_boot, seed) for t in fit_tasks}}


def _score(probabilities: torch.Tensor, answers: AnswerSet, select_by: str, bins: int) -> float:
    if select_by == "nll":
        return float(nll(probabilities, answers.gold_mask()))
    return ece(*top_choice(probabilities, answers.gold), bins)


def leave_one_task_out(fit_sets: dict[str, AnswerSet], settings: dict[str, BaseModel | None], select_by: str = "ece",
                       bins: int = 15, seed: int = 0, parent_probabilities: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, dict]:
    """{calibrator: {"per_task": {fit task: its `select_by` when fitted on the other fit tasks}, "mean", "error"}},
    `none` first. A calibrator that cannot be fitted without one of the tasks has mean None and the reason. With
    more fit tasks than answer_base.MOST_FOLDS, a group of them is held out at a time (task_folds)."""
    out = {"none": {"per_task": {t: _score(s.probabilities(), s, select_by, bins) for t, s in fit_sets.items()}}}
    for name, config in settings.items():
        per_task, error = {}, None
        if len(fit_sets) < 2:
            out[name] = {"per_task": per_task, "error": "one fit task: none to hold out"}
            continue
        try:
            for held in task_folds(list(fit_sets)):
                rest = {t: s for t, s in fit_sets.items() if t not in held}
                parents = {t: parent_probabilities[t] for t in rest} if parent_probabilities else None
                fitted, _ = fit_answer_calibrators(rest, {name: config}, seed, parents)
                for task in held:
                    per_task[task] = _score(fitted[name].apply(fit_sets[task]), fit_sets[task], select_by, bins)
            per_task = {t: per_task[t] for t in fit_sets}
        except CalqError as err:
            error = err.what
        out[name] = {"per_task": per_task, "error": error}
    for entry in out.values():
        entry["mean"] = (sum(entry["per_task"].values()) / len(entry["per_task"])
                         if entry["per_task"] and not entry.get("error") else None)
    return out


REFERENCES = ("none", "answer_temperature")


def select(selection: dict[str, dict], candidates: list[str]) -> str:
    """The selected calibrator from leave_one_task_out's scores (lower is better). The references, `none` and one
    temperature, compete on their mean; any other candidate replaces the better of them only when on every held-out
    fit task it scores at most the better of the two references there (the goal asked of it on evaluation tasks,
    checked where labels are allowed), and then the lowest mean among such wins. A flexible calibrator whose mean
    gain comes with a loss on some task is not taken: measured leave-one-task-out on 50 tasks, a one-standard-error
    rule took answer_adaptive for 30 of them and it was then worse than one T or none on 7 (by at most 0.006)."""
    references = [n for n in candidates if n in REFERENCES]
    best = min(references, key=lambda n: selection[n]["mean"])
    floor = {t: min(selection[n]["per_task"][t] for n in references) for t in selection[best]["per_task"]}

    def never_worse(name: str) -> bool:
        return (selection[name]["mean"] < selection[best]["mean"]
                and all(selection[name]["per_task"][t] <= score for t, score in floor.items()))

    challengers = [n for n in candidates if n not in REFERENCES and never_worse(n)]
    return min(challengers, key=lambda n: selection[n]["mean"]) if challengers else best


def calibrate_answers(fit_sets: dict[str, AnswerSet], eval_sets: dict[str, AnswerSet],
                      settings: dict[str, BaseModel | None], targets: list[float] = (0.8,), select_by: str = "ece",
                      bins: int = 15, n_boot: int = 1000, seed: int = 0,
                      parent_probabilities: dict[str, torch.Tensor] | None = None, skip_at_chance: bool = True
                      ) -> tuple[dict[str, AnswerCalibrator], dict]:
    """Fit every calibrator in `settings` on the fit tasks above chance (on all, without `skip_at_chance`), select
    one by leave-one-fit-task-out `select_by` (`select`: `none` is a candidate, so the selected one was never worse
    than none there on the mean), evaluate all on the evaluation tasks. A calibrator that cannot be fitted (parent
    with too few agreeing prompts, every fit task at chance, ...) is left out with its reason. Returns (fitted,
    answer_section(...) plus "selected", "selection", "fit_seconds", "not_fitted", "fitted_on": the fit tasks used,
    "screened_out": those at or below chance)."""
    screened_out = [t for t, s in fit_sets.items() if skip_at_chance and against_chance(s, n_boot, seed)["at_chance"]]
    informative = {t: s for t, s in fit_sets.items() if t not in screened_out}
    parents = ({t: p for t, p in parent_probabilities.items() if t in informative}
               if parent_probabilities is not None else None)
    selection = leave_one_task_out(informative, settings, select_by, bins, seed, parents)
    fitted, seconds, not_fitted = {}, {}, {}
    for name, config in settings.items():
        if not informative:
            not_fitted[name] = "every fit task is at or below chance for this variant"
            continue
        try:
            one, secs = fit_answer_calibrators(informative, {name: config}, seed, parents)
        except CalqError as err:
            not_fitted[name] = err.what
            continue
        fitted.update(one)
        seconds.update(secs)
    candidates = [n for n in selection if n == "none" or (n in fitted and selection[n]["mean"] is not None)]
    selected = select(selection, candidates) if informative else "none"
    section = answer_section(fitted, {**fit_sets, **eval_sets}, list(fit_sets), list(eval_sets), targets, bins,
                             n_boot, seed)
    section.update(selected=selected, select_by=select_by, selection=selection, fit_seconds=seconds,
                   not_fitted=not_fitted, fitted_on=list(informative), screened_out=screened_out)
    return fitted, section
