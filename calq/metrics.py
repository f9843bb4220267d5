"""Calibration metrics as pure functions on (confidence, correct) pairs, plus a streaming accumulator.

`CalibrationStats` keeps fixed-size histograms, so memory does not grow with the number of
predictions: each of the `bins` equal-width bins is split into `cells` fine cells, so equal-width
ECE is exact and adaptive (equal-mass) ECE places its bin edges to within 1/(bins*cells).
"""

from __future__ import annotations

import math

import torch


def ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width bins on [0, 1]: sum_b |B|/N * |acc(B) - conf(B)|."""
    confidence, correct = confidence.double().flatten(), correct.double().flatten()
    idx = torch.clamp((confidence * bins).long(), max=bins - 1)  # right-closed last bin: 1.0 lands in bin bins-1
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    return float((conf_sum - acc_sum).abs().sum() / confidence.numel())


def adaptive_ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE with `bins` equal-mass bins: sorted predictions split into groups of (nearly) equal size."""
    order = confidence.double().flatten().argsort()
    conf, acc = confidence.double().flatten()[order], correct.double().flatten()[order]
    total = 0.0
    for chunk_c, chunk_a in zip(conf.tensor_split(bins), acc.tensor_split(bins)):
        if chunk_c.numel():
            total += abs(chunk_c.sum().item() - chunk_a.sum().item())
    return total / conf.numel()


def brier_top_label(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Brier score of the top label: mean (confidence - correct)^2."""
    return float(((confidence.double() - correct.double()) ** 2).mean())


class CalibrationStats:
    """Streaming accumulator of top-label predictions: NLL, accuracy, confidence, ECE, adaptive ECE, Brier."""

    def __init__(self, bins: int = 15, cells: int = 1000):
        self.bins, self.fine_bins = bins, bins * cells
        self.count = torch.zeros(self.fine_bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(self.fine_bins, dtype=torch.float64)
        self.acc_sum = torch.zeros(self.fine_bins, dtype=torch.float64)
        self.n = 0
        self.nll_sum = 0.0
        self.brier_sum = 0.0

    def update(self, confidence: torch.Tensor, correct: torch.Tensor, nll: torch.Tensor | None = None) -> None:
        confidence, correct = confidence.double().flatten().cpu(), correct.double().flatten().cpu()  # model on a GPU
        idx = torch.clamp((confidence * self.fine_bins).long(), 0, self.fine_bins - 1)
        self.count.index_add_(0, idx, torch.ones_like(confidence))
        self.conf_sum.index_add_(0, idx, confidence)
        self.acc_sum.index_add_(0, idx, correct)
        self.n += confidence.numel()
        self.brier_sum += float(((confidence - correct) ** 2).sum())
        if nll is not None:
            self.nll_sum += float(nll.double().sum())

    def update_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [..., V] for next-token targets [...]; positions with target -100 are skipped."""
        keep = targets != -100
        logp = torch.log_softmax(logits[keep].float(), dim=-1)
        t = targets[keep]
        conf, pred = logp.max(dim=-1)
        self.update(conf.exp(), pred == t, -logp.gather(-1, t[:, None])[:, 0])

    def _coarse(self, edges: list[int]) -> float:
        total = 0.0
        for lo, hi in zip(edges[:-1], edges[1:]):
            total += abs(self.conf_sum[lo:hi].sum().item() - self.acc_sum[lo:hi].sum().item())
        return total / self.n

    def summary(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no predictions were accumulated")
        width = self.fine_bins // self.bins
        equal_width = [i * width for i in range(self.bins + 1)]
        cum = self.count.cumsum(0)
        targets = [self.n * k / self.bins for k in range(1, self.bins)]
        mass_edges = [0] + [int(torch.searchsorted(cum, t).item()) + 1 for t in targets] + [self.fine_bins]
        mean_nll = self.nll_sum / self.n
        return {
            "tokens": self.n,
            "nll": mean_nll,
            "ppl": math.exp(mean_nll) if mean_nll < 700 else math.inf,
            "accuracy": self.acc_sum.sum().item() / self.n,
            "confidence": self.conf_sum.sum().item() / self.n,
            "ece": self._coarse(equal_width),
            "adaptive_ece": self._coarse(sorted(set(mass_edges))),
            "brier": self.brier_sum / self.n,
        }

    def reliability(self) -> list[dict[str, float]]:
        """Equal-width bins: count, mean confidence, accuracy (for reliability diagrams)."""
        rows = []
        for b in range(self.bins):
            width = self.fine_bins // self.bins
            lo, hi = b * width, (b + 1) * width
            n = self.count[lo:hi].sum().item()
            rows.append({"lo": b / self.bins, "hi": (b + 1) / self.bins, "count": int(n),
                         "confidence": self.conf_sum[lo:hi].sum().item() / n if n else None,
                         "accuracy": self.acc_sum[lo:hi].sum().item() / n if n else None})
        return rows
