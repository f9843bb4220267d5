"""The report's answer-level calibration data (answers/<variant>.json of every variant), and its tables."""

from __future__ import annotations

from calq.calib.answer_temperature import LOG_BOUND
from calq.evaluation.selective import COLLAPSED_SHARE, UNIFORM_TOLERANCE
from calq.models import BASELINE
from calq.report.model import ci


def answers_section(per_variant: dict[str, dict], settings: dict) -> dict:
    """report.json's `answers`: {"settings", "variants": {variant: selection and fit details}, "results": one row per
    variant x answer calibrator x evaluation task, with `selected`, `coverage` per target accuracy and, for quantized
    variants, `ece_vs_baseline` (this row's ECE minus the baseline's selected calibrator's on the task)}."""
    first = next(iter(per_variant.values()))
    base = per_variant.get(BASELINE)
    base_ece = {r["task"]: r["ece"] for r in base["rows"] if r["calibrator"] == base["selected"]} if base else {}
    results, variants = [], {}
    for variant, sec in per_variant.items():
        for r in sec["rows"]:
            coverage = {target: {**rep["tasks"][r["task"]], "threshold": rep["threshold"]}
                        for target, rep in sec["selective"][r["calibrator"]].items()}
            vs_base = r["ece"] - base_ece[r["task"]] if variant != BASELINE and r["task"] in base_ece else None
            results.append({"variant": variant, **r, "selected": r["calibrator"] == sec["selected"],
                            "coverage": coverage, "ece_vs_baseline": vs_base})
        variants[variant] = {k: sec.get(k) for k in ("selected", "select_by", "selection", "fit_seconds",
                                                     "not_fitted", "fit_info", "fit_accuracy", "fitted_on",
                                                     "screened_out")}
    return {"settings": {**settings, "fit_tasks": first["fit_tasks"], "eval_tasks": first["eval_tasks"]},
            "variants": variants, "results": results}


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def ranks(row: dict) -> str:
    """Whether the confidence ranks right answers above wrong ones, by AUROC's 95% interval against 0.5."""
    interval = row.get("auroc_ci")
    if interval is None:
        return "–"
    return "yes" if interval[0] > 0.5 else "reversed" if interval[1] < 0.5 else "not shown"


COLLAPSED = "collapsed to uniform: confidence carries no information"
ONE_T = "answer_temperature"


def at_bound_notes(section: dict) -> list[str]:
    """One sentence per fitted temperature stopped at its bound, with the fit tasks it was fitted on whose accuracy
    interval reaches chance."""
    notes = []
    for variant, info in section["variants"].items():
        used = info.get("fitted_on")  # None: results stored before fit tasks were screened
        at_chance = [f"{t} ({ci(a['accuracy'], a['accuracy_ci'], 2)}, chance {a['chance']:.2f})"
                     for t, a in (info.get("fit_accuracy") or {}).items()
                     if a["at_chance"] and (used is None or t in used)]
        for name, fit in (info.get("fit_info") or {}).items():
            if fit.get("at_bound"):
                reason = (f"fit tasks {', '.join(at_chance)} are at or below chance within their intervals (a fit "
                          "task at or below chance makes the likelihood-optimal temperature infinite)" if at_chance
                          else "no fit task's accuracy interval reaches down to chance")
                notes.append(f"{variant} / {name}: temperature at its bound (T={fit['temperature']:.4g}, the fit "
                             f"allows e^±{LOG_BOUND:g}): {reason}")
    return notes


def screening_notes(section: dict) -> list[str]:
    """One sentence per variant whose fit tasks were screened: which were left out, or that none was fitted."""
    notes = []
    for variant, info in section["variants"].items():
        out = info.get("screened_out") or []
        if out and not info.get("fitted_on"):
            notes.append(f"{variant}: every fit task ({', '.join(out)}) is at or below chance, so no answer "
                         "calibrator was fitted and the confidence shown is the uncalibrated one")
        elif out:
            notes.append(f"{variant}: fit tasks {', '.join(out)} are at or below chance and were left out of fitting "
                         f"(fitted on {', '.join(info['fitted_on'])})")
    return notes


def summary_rows(section: dict) -> list[dict]:
    """Per variant: the selected answer calibrator and its mean / worst ECE over the evaluation tasks against none,
    and on how many tasks it collapsed to uniform."""
    out = []
    for variant, info in section["variants"].items():
        mine = [r for r in section["results"] if r["variant"] == variant]
        chosen = [r for r in mine if r["selected"]]
        none = [r for r in mine if r["calibrator"] == "none"]
        # the per-task condition: the selected is no worse than one temperature and than none on each task
        others = {(r["task"], r["calibrator"]): r["ece"] for r in mine if r["calibrator"] in ("none", ONE_T)}
        no_worse = sum(r["ece"] <= min(e for (task, _), e in others.items() if task == r["task"]) + 1e-9
                       for r in chosen)
        out.append({"variant": variant, "selected": info["selected"], "no_worse": no_worse,
                    "mean_ece_none": _mean([r["ece"] for r in none]),
                    "mean_ece": _mean([r["ece"] for r in chosen]),
                    "max_ece": max((r["ece"] for r in chosen), default=None),
                    "mean_auroc": _mean([r["auroc"] for r in chosen]),
                    "mean_ece_vs_baseline": _mean([r["ece_vs_baseline"] for r in chosen]),
                    # None: results stored before `collapsed` was measured
                    "collapsed": sum(r["collapsed"] for r in chosen) if all("collapsed" in r for r in chosen) else None,
                    "tasks": len(chosen)})
    return out


def tables(section: dict) -> list[dict]:
    """[{"title", "note", "header", "rows", "numeric"}]: the summary, every row, the selection, selective prediction
    and confidence bands, as strings."""
    s = section["settings"]
    limit = f"at most {s['fit_limit']} questions each" if s.get("fit_limit") else "all questions"
    summary = {"title": "Summary",
               "note": f"Answer calibrators fitted per variant on {', '.join(s['fit_tasks'])} ({limit}); evaluated on "
                       f"{', '.join(s['eval_tasks'])}, which no calibrator saw. Each variant's calibrator is selected "
                       f"by leave-one-fit-task-out {s['select_by']}: the better of `none` and one temperature, unless "
                       f"another has a lower mean and is no worse than both on every held-out fit task. ECE: "
                       f"{s['bins']} equal-width bins; intervals: 95% bootstrap over questions (seed {s['seed']}). "
                       f"Collapsed: on at least {COLLAPSED_SHARE:.0%} of a task's questions the confidence is within "
                       f"{UNIFORM_TOLERANCE} of 1/choices, so its ECE is |accuracy − 1/choices| and says nothing. "
                       f"Selected ≤ one T and none: evaluation tasks where the selected calibrator's ECE is at most "
                       f"both `{ONE_T}`'s and `none`'s (a flexible calibrator should never lose to either)."
                       + "".join(f" {n}." for n in screening_notes(section) + at_bound_notes(section)),
               "header": ["variant", "selected", "mean ECE none", "mean ECE selected", "worst task ECE",
                          "tasks where selected ≤ one T and none", "mean AUROC", "mean ECE − calibrated baseline's",
                          "selected confidence"],
               "rows": [[r["variant"], r["selected"], _f(r["mean_ece_none"]), _f(r["mean_ece"]), _f(r["max_ece"]),
                         f"{r['no_worse']} of {r['tasks']}",
                         _f(r["mean_auroc"]), _f(r["mean_ece_vs_baseline"], 4) if r["variant"] != BASELINE else "–",
                         "–" if r["collapsed"] is None else
                         f"{COLLAPSED} ({r['collapsed']} of {r['tasks']} tasks)" if r["collapsed"] else "varies"]
                        for r in summary_rows(section)], "numeric": {2, 3, 4, 6, 7}}
    every = {"title": "Every answer calibrator on every evaluation task",
             "note": "* = the variant's selected one. AUROC and AURC rank questions by confidence, ties broken by the "
                     "uncalibrated score margin (top-1 − top-2 log-likelihood); ranks right above wrong: AUROC's "
                     "interval above 0.5 (yes), below (reversed), or containing it (not shown). Confidence std: "
                     "spread of the calibrated confidence over the task's questions.",
             "header": ["variant", "calibrator", "task", "n", "accuracy", "confidence", "ECE-15 [CI]", "ECE-10 mass",
                        "smooth ECE", "Brier", "AUROC [CI]", "ranks right above wrong", "AURC", "confidence std",
                        "collapsed to uniform"],
             "rows": [[r["variant"], r["calibrator"] + (" *" if r["selected"] else ""), r["task"], str(r["n"]),
                       _f(r["accuracy"]), _f(r["confidence"]), ci(r["ece"], r["ece_ci"]), _f(r["ece_mass"]),
                       _f(r["smece"]), _f(r["brier"]), ci(r["auroc"], r["auroc_ci"]), ranks(r), _f(r["aurc"]),
                       _f(r.get("confidence_std"), 4), {True: "yes", False: "no"}.get(r.get("collapsed"), "–")]
                      for r in section["results"]], "numeric": {3, 4, 5, 7, 8, 9, 12, 13}}
    fit_accuracy = {"title": "Fit tasks against chance",
                    "note": "Uncalibrated top-choice accuracy on each fit task; chance = gold choices / choices. A fit "
                            "task whose interval reaches down to chance (at or below it) would pull a fitted "
                            "temperature up (there its optimum is infinite), so it is left out of that variant's "
                            "fitting.",
                    "header": ["variant", "fit task", "n", "accuracy [CI]", "chance", "at or below chance",
                               "fitted on"],
                    "rows": [[variant, t, str(a["n"]), ci(a["accuracy"], a["accuracy_ci"]), _f(a["chance"]),
                              "yes" if a["at_chance"] else "no",
                              "–" if info.get("fitted_on") is None else "yes" if t in info["fitted_on"] else "no"]
                             for variant, info in section["variants"].items()
                             for t, a in (info.get("fit_accuracy") or {}).items()], "numeric": {2, 4}}
    fit_tasks = list(s["fit_tasks"])
    selection = {"title": "Selection (leave one fit task out)",
                 "note": f"{s['select_by']} on each fit task of the calibrator fitted on the other fit tasks.",
                 "header": ["variant", "calibrator", "mean", *fit_tasks],
                 "rows": [[variant, name + (" *" if name == info["selected"] else ""), _f(e["mean"], 4),
                           *(_f(e["per_task"].get(t), 4) for t in fit_tasks)] if not e.get("error") else
                          [variant, name, f"not selectable: {e['error']}", *("–" for _ in fit_tasks)]
                          for variant, info in section["variants"].items() for name, e in info["selection"].items()],
                 "numeric": set(range(2, 3 + len(fit_tasks)))}
    chosen = [r for r in section["results"] if r["selected"]]
    selective = {"title": "Selective prediction: answer only when confidence ≥ threshold",
                 "note": "The threshold is fitted on the fit tasks for each target accuracy; coverage and accuracy are "
                         "what it reaches on each evaluation task (selected calibrators).",
                 "header": ["variant", "calibrator", "target", "threshold", "task", "coverage [CI]", "accuracy [CI]"],
                 "rows": [[r["variant"], r["calibrator"], target, _f(c["threshold"], 4), r["task"],
                           ci(c["coverage"], c["coverage_ci"]), ci(c["accuracy"], c["accuracy_ci"])]
                          for r in chosen for target, c in r["coverage"].items()], "numeric": {2, 3}}
    bands = {"title": "Confidence bands", "note": "Questions by confidence of the selected calibrator: how many, and "
                                                   "the accuracy measured in each band.",
             "header": ["variant", "calibrator", "task",
                        *(f"{b['band']} ({b['lo']:.1f}–{b['hi']:.1f}): n, conf, acc" for b in chosen[0]["bands"])]
             if chosen else [],
             "rows": [[r["variant"], r["calibrator"], r["task"],
                       *(f"{b['count']}, {_f(b['confidence'], 2)}, {_f(b['accuracy'], 2)}" for b in r["bands"])]
                      for r in chosen], "numeric": set()}
    return [summary, every, fit_accuracy, selection, selective, bands]
