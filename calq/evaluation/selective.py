"""Answer-level metrics beyond ECE-15, and selective prediction ("answer only when confidence >= c").

On (confidence, correct) per question:
- `ece_mass`: ECE with 10 equal-mass bins (HELM's convention, `metrics.adaptive_ece`);
- `smooth_ece`: smooth ECE (Błasiok & Nakkiran), relplot's `smECE` (automatic kernel bandwidth);
- `auroc`: how well confidence separates right from wrong answers (scikit-learn's roc_auc_score; None when
  all answers are right or all wrong), on `ranking`: ties in the calibrated confidence broken by the raw margin;
- `collapsed`: the calibrated confidence sits at 1/choices for (nearly) every question, so it says nothing;
- `risk_coverage` / `aurc`: answering the most confident questions first, the error rate among those answered
  at each coverage; AURC is its mean over coverages (lower is better; an oracle ranking reaches the minimum);
- `fit_threshold` / `apply_threshold`: the lowest confidence threshold whose answered questions reach a target
  accuracy on the fit tasks, and the coverage and accuracy it actually reaches on an evaluation task;
- `bands`: high / medium / low confidence with the accuracy measured in each.

Intervals are 95% percentile bootstraps over questions with a fixed seed (so rows resample the same questions):
weighted sums for the linear statistics (answers.bootstrap), resampled indices for the others.
"""

from __future__ import annotations

import numpy as np
import torch

from calq.calib.answer_features import AnswerSet, top_choice
from calq.evaluation.answers import LEVEL, bootstrap, calibration_intervals
from calq.metrics import adaptive_ece, brier_top_label, ece

MASS_BINS = 10  # HELM: ECE with 10 equal-mass bins
SLOW_BOOT = 200  # replicates for the statistics computed one replicate at a time (smooth ECE, AUROC, AURC)
TIE_DECIMALS = 9  # confidences equal to 9 decimals are tied: far below any difference a bootstrap resolves
# A calibrator has collapsed when at least COLLAPSED_SHARE of the questions get a top-choice confidence within
# UNIFORM_TOLERANCE of 1/choices: its ECE is then |accuracy - 1/choices|, reached by saying nothing.
UNIFORM_TOLERANCE = 0.01
COLLAPSED_SHARE = 0.95


def ece_mass(conf: torch.Tensor, correct: torch.Tensor, bins: int = MASS_BINS) -> float:
    return adaptive_ece(conf, correct, bins)


def smooth_ece(conf: torch.Tensor, correct: torch.Tensor) -> float:
    import relplot

    return float(relplot.smECE(conf.double().numpy(), correct.double().numpy()))


def auroc(conf: torch.Tensor, correct: torch.Tensor) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = correct.numpy() > 0.5
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, conf.numpy()))


def ranking(conf: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Dense rank of each question by calibrated confidence (to TIE_DECIMALS), ties broken by `margin` (the
    uncalibrated top-1 minus top-2 log-likelihood): what AUROC and AURC rank on, so a calibrator that flattens
    every confidence to the same value is ranked by the model's own scores, not by float rounding."""
    pairs = np.stack([conf.double().numpy().round(TIE_DECIMALS), margin.double().numpy()], axis=1)
    _, rank = np.unique(pairs, axis=0, return_inverse=True)  # rows sorted by confidence, then margin
    return torch.from_numpy(rank.reshape(-1).astype(np.float64))


def uniform_share(conf: torch.Tensor, choices: torch.Tensor) -> float:
    """Share of questions whose top-choice confidence is within UNIFORM_TOLERANCE of 1/choices."""
    return float(((conf.double() - 1 / choices.double()).abs() <= UNIFORM_TOLERANCE).double().mean())


def risk_coverage(conf: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage, risk) when answering the k most confident questions, k = 1..n (ties in a stable order)."""
    order = torch.argsort(conf.double(), descending=True, stable=True)
    errors = (1 - correct.double()[order]).cumsum(0)
    k = torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    return k / conf.numel(), errors / k


def curve(conf: torch.Tensor, correct: torch.Tensor, points: int = 50) -> dict[str, list[float]]:
    """The risk-coverage curve at about `points` evenly spaced coverages (for a plot)."""
    coverage, risk = risk_coverage(conf, correct)
    idx = torch.unique(torch.linspace(0, coverage.numel() - 1, min(points, coverage.numel())).round().long())
    return {"coverage": [round(float(c), 4) for c in coverage[idx]], "risk": [round(float(r), 4) for r in risk[idx]]}


def aurc(conf: torch.Tensor, correct: torch.Tensor) -> float:
    return float(risk_coverage(conf, correct)[1].mean())


def _resampled(conf, correct, statistic, n_boot: int, seed: int) -> list[float] | None:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = torch.from_numpy(rng.integers(0, conf.numel(), conf.numel()))
        value = statistic(conf[idx], correct[idx])
        if value is not None:
            values.append(value)
    if not values:
        return None
    return [float(v) for v in np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])]


def summary(probabilities: torch.Tensor, answers: AnswerSet, bins: int = 15, n_boot: int = 1000,
            seed: int = 0) -> dict:
    """Every answer-level number of one task x calibrator (`probabilities` on `answers`, whose uncalibrated scores
    break ties), with 95% bootstrap intervals, and the risk-coverage curve."""
    conf, correct = top_choice(probabilities, answers.gold)
    top2 = answers.scores().topk(2, dim=1).values
    rank = ranking(conf, top2[:, 0] - top2[:, 1])
    choices = torch.tensor([len(row) for row in answers.loglikelihoods])
    slow = min(n_boot, SLOW_BOOT)
    share = uniform_share(conf, choices)
    out = {"n": conf.numel(), "accuracy": float(correct.mean()), "confidence": float(conf.mean()),
           "ece": ece(conf, correct, bins), "brier": brier_top_label(conf, correct),
           **calibration_intervals(conf, correct, bins, n_boot, seed),
           "ece_mass": ece_mass(conf, correct), "smece": smooth_ece(conf, correct),
           "auroc": auroc(rank, correct), "aurc": aurc(rank, correct),
           "confidence_std": float(conf.std()) if conf.numel() > 1 else 0.0, "uniform_share": share,
           "collapsed": share >= COLLAPSED_SHARE, "risk_coverage": curve(rank, correct),
           "bootstrap": {"replicates": n_boot, "replicates_resampled": slow, "level": LEVEL, "seed": seed}}
    out["ece_mass_ci"] = _resampled(conf, correct, ece_mass, slow, seed)
    out["smece_ci"] = _resampled(conf, correct, smooth_ece, slow, seed)
    out["auroc_ci"] = _resampled(rank, correct, auroc, slow, seed)
    out["aurc_ci"] = _resampled(rank, correct, aurc, slow, seed)
    return out


def against_chance(answers: AnswerSet, n_boot: int = 1000, seed: int = 0) -> dict:
    """Uncalibrated top-choice accuracy with its bootstrap interval against chance (the mean over questions of
    gold choices / choices), and `at_chance`: the interval reaches chance or lies below it."""
    _, correct = top_choice(answers.probabilities(), answers.gold)
    chance = sum(len(g) / len(row) for g, row in zip(answers.gold, answers.loglikelihoods, strict=True)) / len(answers)
    n = correct.numel()
    interval = bootstrap(n, {"ci": lambda w: w @ correct / n}, n_boot, seed)["ci"]
    return {"n": n, "accuracy": float(correct.mean()), "accuracy_ci": interval, "chance": chance,
            "at_chance": interval[0] <= chance}


def fit_threshold(conf: torch.Tensor, correct: torch.Tensor, target: float) -> float | None:
    """The lowest threshold c (a confidence seen in the fit data) such that the questions with confidence >= c
    reach `target` accuracy: the largest coverage that meets the target. None when no threshold does."""
    order = torch.argsort(conf.double(), descending=True, stable=True)
    sorted_conf = conf.double()[order]
    accuracy = correct.double()[order].cumsum(0) / torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    # only cut between distinct confidences: everything tied with the last answered question is answered too
    last_of_tie = torch.ones(conf.numel(), dtype=torch.bool)
    last_of_tie[:-1] = sorted_conf[1:] < sorted_conf[:-1]
    ok = torch.nonzero((accuracy >= target) & last_of_tie).flatten()
    return float(sorted_conf[ok[-1]]) if ok.numel() else None


def apply_threshold(conf: torch.Tensor, correct: torch.Tensor, threshold: float | None, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """Coverage and accuracy of "answer only when confidence >= threshold", with bootstrap intervals."""
    if threshold is None:
        return {"coverage": 0.0, "coverage_ci": [0.0, 0.0], "accuracy": None, "accuracy_ci": None, "answered": 0}
    answered = (conf.double() >= threshold).double()
    hits = answered * correct.double()
    n = conf.numel()
    k = int(answered.sum())
    ci = bootstrap(n, {"coverage_ci": lambda w: w @ answered / n,
                       "accuracy_ci": lambda w: (w @ hits) / (w @ answered).clamp(min=1e-12)}, n_boot, seed)
    return {"coverage": k / n, "coverage_ci": ci["coverage_ci"], "accuracy": float(hits.sum()) / k if k else None,
            "accuracy_ci": ci["accuracy_ci"] if k else None, "answered": k}


def selective_report(fit_probabilities: list[torch.Tensor], fit_gold: list[list[list[int]]],
                     evaluation: dict[str, tuple[torch.Tensor, list[list[int]]]], targets: list[float],
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """{target: {"threshold": fitted on the fit tasks pooled, "tasks": {task: apply_threshold}}}."""
    pairs = [top_choice(p, g) for p, g in zip(fit_probabilities, fit_gold, strict=True)]
    conf = torch.cat([c for c, _ in pairs])
    correct = torch.cat([k for _, k in pairs])
    out = {}
    for target in targets:
        threshold = fit_threshold(conf, correct, target)
        out[str(target)] = {"threshold": threshold, "tasks": {
            task: apply_threshold(*top_choice(p, g), threshold, n_boot, seed) for task, (p, g) in evaluation.items()}}
    return out


def bands(conf: torch.Tensor, correct: torch.Tensor, edges: tuple[float, float] = (0.5, 0.8)) -> list[dict]:
    """Low (< edges[0]), medium, high (>= edges[1]) confidence: count, mean confidence, measured accuracy."""
    rows = []
    for name, lo, hi in (("low", 0.0, edges[0]), ("medium", edges[0], edges[1]), ("high", edges[1], 1.0 + 1e-9)):
        inside = (conf >= lo) & (conf < hi)
        k = int(inside.sum())
        rows.append({"band": name, "lo": lo, "hi": min(hi, 1.0), "count": k,
                     "confidence": float(conf[inside].mean()) if k else None,
                     "accuracy": float(correct[inside].mean()) if k else None})
    return rows
