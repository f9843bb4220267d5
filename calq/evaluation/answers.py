"""Answer-level calibration of multiple-choice tasks, with seeded bootstrap confidence intervals.

Per question: probabilities = softmax over the choices' log-likelihoods, confidence = the top choice's
probability, correct = the top choice is a gold choice (TruthfulQA MC2 has several). Over questions: accuracy,
ECE (equal-width bins) and top-label Brier score, each with a percentile bootstrap interval over questions.
Every row uses the same seed, so intervals of different variants resample the same questions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from calq.metrics import CalibrationStats, brier_top_label, ece

LEVEL = 0.95  # two-sided percentile intervals
CHUNK = 100  # bootstrap replicates per block, so a full MMLU run holds about 10 MB of weights at a time


def confidences(loglikelihoods: list[list[float]], gold: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) per question, float64."""
    conf, correct = [], []
    for lls, answers in zip(loglikelihoods, gold, strict=True):
        probs = torch.softmax(torch.tensor(lls, dtype=torch.float64), dim=0)
        top = int(probs.argmax())
        conf.append(float(probs[top]))
        correct.append(float(top in answers))
    return torch.tensor(conf, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64)


def bootstrap(n: int, statistics: dict[str, Callable[[torch.Tensor], torch.Tensor]], n_boot: int = 1000,
              seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals of statistics over n questions resampled with replacement.

    A replicate is a weight per question (how often it was drawn), and each statistic maps a block of
    weights [replicates, n] to one value per replicate: weighted sums instead of one Python-level metric
    call per replicate, so a full MMLU run takes milliseconds.
    """
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in statistics}
    for start in range(0, n_boot, CHUNK):
        draws = torch.randint(n, (min(CHUNK, n_boot - start), n), generator=generator)
        weights = torch.zeros(draws.shape, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(draws.shape, dtype=torch.float64))
        for name, statistic in statistics.items():
            values[name].append(statistic(weights))
    q = torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.float64)
    return {name: [float(v) for v in torch.quantile(torch.cat(parts), q)] for name, parts in values.items()}


def calibration_intervals(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15, n_boot: int = 1000,
                          seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap intervals of accuracy, ECE (metrics.ece's formula, weighted) and top-label Brier."""
    n = conf.numel()
    gap = conf - correct
    bin_of = torch.clamp((conf * bins).long(), max=bins - 1)
    gap_by_bin = torch.zeros(n, bins, dtype=torch.float64).scatter_(1, bin_of[:, None], gap[:, None])
    return bootstrap(n, {"accuracy_ci": lambda w: w @ correct / n,
                         "ece_ci": lambda w: (w @ gap_by_bin).abs().sum(1) / n,
                         "brier_ci": lambda w: w @ gap**2 / n}, n_boot, seed)


def answer_calibration(loglikelihoods: list[list[float]], gold: list[list[int]], bins: int = 15, n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """Accuracy, confidence, ECE and Brier of the top choice, with intervals and reliability bins."""
    return calibration_summary(*confidences(loglikelihoods, gold), bins, n_boot, seed)


def generative_confidences(logprobs: list[float | None], tokens: list[int], per_token: bool = False) -> torch.Tensor:
    """Confidence of each generated answer: its sequence probability exp(log p), or per token exp(log p / tokens).
    An empty answer (None) has confidence 0: the model said nothing it could be right about."""
    return torch.tensor([0.0 if lp is None else math.exp(lp / max(n, 1) if per_token else lp)
                         for lp, n in zip(logprobs, tokens, strict=True)], dtype=torch.float64)


def calibration_summary(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15, n_boot: int = 1000,
                        seed: int = 0) -> dict:
    """Accuracy, confidence, ECE and Brier of (confidence, correct) pairs, with intervals and reliability bins."""
    stats = CalibrationStats(bins)
    stats.update(conf, correct)
    return {"n": conf.numel(), "accuracy": float(correct.mean()), "confidence": float(conf.mean()),
            "ece": ece(conf, correct, bins), "brier": brier_top_label(conf, correct),
            **calibration_intervals(conf, correct, bins, n_boot, seed), "reliability": stats.reliability()}


def task_rows(variant: str, results: dict, bins: int = 15, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Report rows (one per task x calibrator) from `harness.run_tasks` output for one variant.

    `accuracy` is the task's headline metric (lm-eval's; MC2's is the probability mass on true answers) with a
    bootstrap interval over questions; multiple-choice tasks add the answer-level calibration of the top choice
    (`top1_accuracy`, `confidence`, `ece`, `brier` with intervals, `reliability`); generative tasks (run_tasks'
    `answer_logprobs`) the same with confidence = the greedy answer's sequence probability, correct = the task's
    metric (exact match), and `per_token` with the per-token-normalized probability; other tasks have None there.
    """
    rows = []
    for task, entry in results["tasks"].items():
        for calibrator, res in entry["calibrators"].items():
            scores = torch.tensor(res["scores"], dtype=torch.float64)
            n = scores.numel()
            row = {"variant": variant, "calibrator": calibrator, "task": task, "metric": entry["metric"], "n": n,
                   "accuracy": float(scores.mean()),
                   "accuracy_ci": bootstrap(n, {"ci": lambda w: w @ scores / n}, n_boot, seed)["ci"],
                   "top1_accuracy": None, "confidence": None, "ece": None, "ece_ci": None, "brier": None,
                   "brier_ci": None,
                   "reliability": None}
            answers = None
            if res["loglikelihoods"] is not None:
                answers = answer_calibration(res["loglikelihoods"], entry["gold"], bins, n_boot, seed)
            elif entry.get("answer_logprobs"):  # generative: confidence = the greedy answer's sequence probability
                conf = generative_confidences(entry["answer_logprobs"][calibrator], entry["answer_tokens"])
                answers = calibration_summary(conf, scores, bins, n_boot, seed)
                per_token = generative_confidences(entry["answer_logprobs"][calibrator], entry["answer_tokens"], True)
                row["per_token"] = {k: v for k, v in calibration_summary(per_token, scores, bins, n_boot, seed).items()
                                    if k in ("confidence", "ece", "ece_ci", "brier", "brier_ci")}
            if answers is not None:
                row.update(top1_accuracy=answers["accuracy"], **{k: answers[k] for k in (
                    "confidence", "ece", "ece_ci", "brier", "brier_ci", "reliability")})
            rows.append(row)
    return rows


def tasks_section(per_variant: dict[str, dict], bins: int, n_boot: int, seed: int, lm_eval_version: str) -> dict:
    """report.json's `tasks`: {"settings": ..., "results": rows} from {variant: run_tasks output}."""
    first = next(iter(per_variant.values()))
    settings = {"limit": first["limit"], "data_dir": first["data_dir"], "calibrators": first["calibrators"],
                "bins": bins, "bootstrap": n_boot, "level": LEVEL, "seed": seed, "lm_eval": lm_eval_version}
    return {"settings": settings,
            "results": [row for variant, res in per_variant.items()
                        for row in task_rows(variant, res, bins, n_boot, seed)]}
