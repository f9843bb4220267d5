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


class DivergenceStats:
    """Streaming divergence of a model from a reference model (the unquantized baseline) on the same positions.

    The definitions are llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp): per
    position KLD = sum_i p_ref(i) (log p_ref(i) - log p(i)), KL(reference || model); "same top" when both argmaxes
    (the first maximal index) agree; Δp = p(correct token) - p_ref(correct token), RMS Δp = sqrt(mean Δp²); the
    median and percentiles interpolate linearly between order statistics at q·(n - 1). One difference: llama.cpp
    stores the reference's log-probabilities in 16 bits and drops p_ref < e^-16 from the sum; here they are exact.

    Memory does not grow with the number of positions: the sums are scalars, and the percentiles come from a
    histogram of `cells` equal cells of log KLD on [`LOW`, `HIGH`] (a relative error of width/2 in a percentile,
    0.1% with the defaults; KLD below LOW counts as 0). Logits are taken `chunk_elements` values at a time, so one
    chunk of probabilities exists at once whatever the vocabulary (a 262k one included).
    """

    LOW, HIGH = 1e-12, 1e4

    def __init__(self, cells: int = 1 << 14, chunk_elements: int = 1 << 22):
        self.cells, self.chunk_elements = cells, chunk_elements
        self.log_low = math.log(self.LOW)
        self.width = (math.log(self.HIGH) - self.log_low) / cells
        self.count = torch.zeros(cells + 1, dtype=torch.float64)  # cell 0: KLD below LOW
        self.n = 0
        self.kld_sum = 0.0
        self.kld_max = -math.inf
        self.same_top = 0
        self.dp_sum = 0.0
        self.dp2_sum = 0.0

    def update(self, reference_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Logits [..., V] of the reference and of the model for the same positions, next-token targets [...];
        positions with target -100 are skipped."""
        vocab = logits.shape[-1]
        ref, model = _rows(reference_logits), _rows(logits)
        targets = targets.reshape(ref.shape[:2]).to(ref.device)  # the two models may sit on different devices
        step = max(1, self.chunk_elements // vocab)
        for row in range(ref.shape[0]):
            for start in range(0, ref.shape[1], step):
                t = targets[row, start:start + step]
                keep = t != -100
                if not bool(keep.any()):
                    continue
                chunk = model[row, start:start + step].to(ref.device)
                self._add(ref[row, start:start + step][keep], chunk[keep], t[keep])

    def _add(self, reference_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        ref_logp = torch.log_softmax(reference_logits.float(), dim=-1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        # p_ref (log p_ref - log p) in one pass, summed in float32: several times faster than exp, subtract,
        # multiply and a float64 sum, and within 1e-6 of it (tests/test_metrics.py)
        kld = torch.nn.functional.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(-1)
        kld = kld.double().cpu()
        self.same_top += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        picked = targets[:, None]
        dp = (logp.gather(-1, picked).double().exp() - ref_logp.gather(-1, picked).double().exp()).flatten().cpu()
        self.n += kld.numel()
        self.kld_sum += float(kld.sum())
        self.kld_max = max(self.kld_max, float(kld.max()))
        self.dp_sum += float(dp.sum())
        self.dp2_sum += float((dp * dp).sum())
        cell = ((kld.clamp(min=self.LOW).log() - self.log_low) / self.width).floor().long() + 1
        cell = torch.where(kld < self.LOW, 0, cell.clamp(1, self.cells))
        self.count.index_add_(0, cell, torch.ones_like(kld))

    def _order_statistic(self, k: int, cumulative: torch.Tensor) -> float:
        """The (k+1)-th smallest KLD, placed inside its cell by its rank among the cell's values."""
        cell = int(torch.searchsorted(cumulative, float(k), right=True))
        if cell == 0:
            return 0.0
        before = float(cumulative[cell - 1])
        inside = (k - before + 0.5) / float(self.count[cell])
        return min(math.exp(self.log_low + (cell - 1 + inside) * self.width), self.kld_max)

    def quantile(self, q: float) -> float:
        if self.n == 0:
            raise ValueError("no positions were accumulated")
        rank = q * (self.n - 1)
        k = int(rank)
        cumulative = self.count.cumsum(0)
        low = self._order_statistic(k, cumulative)
        return low + (rank - k) * (self._order_statistic(min(k + 1, self.n - 1), cumulative) - low)

    def summary(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no positions were accumulated")
        return {"tokens": self.n, "mean_kld": self.kld_sum / self.n, "median_kld": self.quantile(0.5),
                "p99_kld": self.quantile(0.99), "max_kld": self.kld_max, "same_top1": self.same_top / self.n,
                "mean_delta_p": self.dp_sum / self.n, "rms_delta_p": math.sqrt(self.dp2_sum / self.n)}


def tempered_kld(pairs: list[tuple[torch.Tensor, torch.Tensor]], untempered: float | None = None,
                 steps: int = 8) -> tuple[float, float]:
    """(T, mean KL(reference || softmax(logits / T))) at the T that minimises it: the divergence one global
    temperature cannot remove. `pairs`: (reference logits, logits) [..., V] for the same positions, all of them scored.

    Newton's method on log T: with u = logits / T, d KL / d log T = E_ref[u] - E_model[u] and the second derivative
    is E_model[u] - E_ref[u] + Var_model[u] (per position, averaged); E_ref[u] is E_ref[logits] / T, computed once.
    T stays within [e^-3, e^3]; the KL is computed as DivergenceStats computes it, at T and at 1 (`untempered`, when the
    caller has it from DivergenceStats), and the result is never worse than T = 1."""
    rows = [(ref_rows, model_rows) for ref, model in pairs for ref_rows, model_rows in zip(_rows(ref), _rows(model))]
    ref_mean = [(torch.softmax(ref.float(), -1) * model.float()).sum(-1) for ref, model in rows]  # E_ref[logits]
    n = sum(m.numel() for m in ref_mean)

    def newton_step(log_t: float) -> float:
        grad = hess = 0.0
        scale = math.exp(-log_t)
        for (_, model), mean in zip(rows, ref_mean):
            u = model.float() * scale
            qu = torch.softmax(u, -1) * u
            e_q = qu.sum(-1)
            e_ref = mean * scale
            grad += float((e_ref - e_q).sum())
            hess += float((e_q - e_ref + (qu * u).sum(-1) - e_q * e_q).sum())
        return grad / hess if hess > 0 else math.copysign(0.5, grad)

    def kl(log_t: float) -> float:
        total = 0.0
        for ref, model in rows:
            logq = torch.log_softmax(model.float() * math.exp(-log_t), -1)
            ref_logp = torch.log_softmax(ref.float(), -1)
            total += float(torch.nn.functional.kl_div(logq, ref_logp, reduction="none", log_target=True).sum())
        return total / n

    log_t = 0.0
    for _ in range(steps):
        step = newton_step(log_t)
        log_t = min(max(log_t - step, -3.0), 3.0)
        if abs(step) < 1e-4:
            break
    untempered = kl(0.0) if untempered is None else untempered
    tempered = kl(log_t)
    return (math.exp(log_t), tempered) if tempered < untempered else (1.0, untempered)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., T, V] as [rows, T, V], a view for [B, T, V] (logits[:, :-1] is not contiguous: flattening it to
    [-1, V] would copy the whole batch)."""
    return logits[None] if logits.dim() == 2 else logits.reshape(-1, *logits.shape[-2:])
