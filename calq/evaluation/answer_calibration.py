"""Answer-level calibration of one variant end to end, from `harness.run_tasks(..., features=True)` output.

    check_split(fit_tasks, eval_tasks, counts)          # before any model loads: overlap, too few questions
    sets = answer_sets(results)                          # {task: AnswerSet} of every multiple-choice task
    fitted, seconds = fit_answer_calibrators({t: sets[t] for t in fit_tasks}, {"answer_temperature": None, ...})
    section = answer_section(fitted, sets, fit_tasks, eval_tasks, targets=[0.8])

The fit tasks and the evaluation tasks never overlap: every evaluation row is on a task no calibrator saw.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel

from calq.calib import calibrators
from calq.calib.answer_base import AnswerCalibrator, AnswerFitData
from calq.calib.answer_features import AnswerSet, top_choice
from calq.errors import CalqError
from calq.evaluation.selective import bands, selective_report, summary

MIN_FIT_QUESTIONS = 20


def check_split(fit_tasks: list[str], eval_tasks: list[str], counts: dict[str, int] | None = None,
                names: list[str] = (), where: str = "evaluation.answer_calibration") -> None:
    """One-line errors before long work: fit and evaluation tasks overlapping, a fit task with too few questions
    (counts: harness.check_tasks' output), an unknown answer calibrator, the adaptive one with one fit task."""
    overlap = sorted(set(fit_tasks) & set(eval_tasks))
    if overlap:
        raise CalqError(f"fit tasks and evaluation tasks overlap: {', '.join(overlap)}", where,
                        "an answer calibrator must be evaluated on tasks it never saw; remove them from one list")
    if not fit_tasks:
        raise CalqError("no fit tasks listed", where,
                        "list multiple-choice fit tasks, e.g. openbookqa, commonsense_qa, siqa, copa")
    for task in fit_tasks:
        if counts is not None and counts.get(task, 0) < MIN_FIT_QUESTIONS:
            raise CalqError(f"fit task '{task}' has {counts.get(task, 0)} questions", where,
                            f"give each fit task at least {MIN_FIT_QUESTIONS} (raise its limit)")
    known = calibrators.names("answer")
    for name in names:
        if name not in known:
            raise CalqError(f"unknown answer calibrator '{name}'", where, f"use one of: {', '.join(known)}")
    if "answer_adaptive" in names and len(fit_tasks) < 2:
        raise CalqError("answer_adaptive needs two or more fit tasks (one is held out for early stopping)", where,
                        "add a fit task")


def answer_sets(results: dict, calibrator: str = "none") -> dict[str, AnswerSet]:
    """{task: AnswerSet} for every multiple-choice task of a run_tasks output (its scores under `calibrator`)."""
    return {name: AnswerSet.from_task(entry, calibrator) for name, entry in results["tasks"].items()
            if entry.get("output_type") == "multiple_choice"}


def fit_answer_calibrators(fit_sets: dict[str, AnswerSet], settings: dict[str, BaseModel | None], seed: int = 0,
                           parent_probabilities: dict[str, torch.Tensor] | None = None
                           ) -> tuple[dict[str, AnswerCalibrator], dict[str, float]]:
    """Every calibrator named in `settings` ({name: its Config or None}) fitted on the fit tasks, and seconds each.
    `parent` is fitted on the same prompts without their labels, against `parent_probabilities` (by task)."""
    data = AnswerFitData(fit_sets, seed=seed)
    fitted, seconds = {}, {}
    for name, config in settings.items():
        cls = calibrators.get(name)
        start = time.perf_counter()
        if name == "parent":
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
    "selective": {calibrator: selective_report}} for a report."""
    every = {"none": None, **fitted}

    def probabilities(name: str, answers: AnswerSet) -> torch.Tensor:
        return answers.probabilities() if every[name] is None else every[name].apply(answers)

    rows = []
    for task in eval_tasks:
        answers = sets[task]
        for name in every:
            p = probabilities(name, answers)
            rows.append({"task": task, "calibrator": name, **summary(p, answers.gold, bins, n_boot, seed),
                         "bands": bands(*top_choice(p, answers.gold))})
    fit_gold = [sets[t].gold for t in fit_tasks]
    selective = {name: selective_report([probabilities(name, sets[t]) for t in fit_tasks], fit_gold,
                                        {t: (probabilities(name, sets[t]), sets[t].gold) for t in eval_tasks},
                                        list(targets), n_boot, seed)
                 for name in every}
    return {"fit_tasks": list(fit_tasks), "eval_tasks": list(eval_tasks), "rows": rows, "selective": selective,
            "fit_info": {name: c.fit_info for name, c in fitted.items()}}
