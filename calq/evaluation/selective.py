"""Answer-level metrics beyond ECE-15, and selective prediction ("answer only when confidence >= c").

On (confidence, correct) per question:
- `ece_mass`: ECE with 10 equal-mass bins (HELM's convention, `metrics.adaptive_ece`);
- `smooth_ece`: smooth ECE (Błasiok & Nakkiran), relplot's `smECE` (automatic kernel bandwidth);
- `auroc`: how well confidence separates right from wrong answers (scikit-learn's roc_auc_score; None when
  all answers are right or all wrong);
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

from calq.calib.answer_features import top_choice
from calq.evaluation.answers import LEVEL, calibration_intervals
from calq.metrics import adaptive_ece, brier_top_label, ece

MASS_BINS = 10  # HELM: ECE with 10 equal-mass bins
SLOW_BOOT = 200  # replicates for the statistics computed one replicate at a time (smooth ECE, AUROC, AURC)


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


def summary(probabilities: torch.Tensor, gold: list[list[int]], bins: int = 15, n_boot: int = 1000,
            seed: int = 0) -> dict:
    """Every answer-level number of one task x calibrator, with 95% bootstrap intervals."""
    conf, correct = top_choice(probabilities, gold)
    slow = min(n_boot, SLOW_BOOT)
    out = {"n": conf.numel(), "accuracy": float(correct.mean()), "confidence": float(conf.mean()),
           "ece": ece(conf, correct, bins), "brier": brier_top_label(conf, correct),
           **calibration_intervals(conf, correct, bins, n_boot, seed),
           "ece_mass": ece_mass(conf, correct), "smece": smooth_ece(conf, correct),
           "auroc": auroc(conf, correct), "aurc": aurc(conf, correct),
           "bootstrap": {"replicates": n_boot, "replicates_resampled": slow, "level": LEVEL, "seed": seed}}
    out["ece_mass_ci"] = _resampled(conf, correct, ece_mass, slow, seed)
    out["smece_ci"] = _resampled(conf, correct, smooth_ece, slow, seed)
    out["auroc_ci"] = _resampled(conf, correct, auroc, slow, seed)
    out["aurc_ci"] = _resampled(conf, correct, aurc, slow, seed)
    return out


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
    from calq.evaluation.answers import bootstrap

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
