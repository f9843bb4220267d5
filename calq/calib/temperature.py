"""Global temperature scaling: logits / T, one scalar T fitted by minimizing NLL (LBFGS on log T)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


class Temperature:
    """The calibrator `logits / T` (hidden states unused)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return logits / self.temperature

    def __repr__(self) -> str:
        return f"Temperature({self.temperature:.4f})"


def fit_temperature(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], max_iter: int = 50) -> float:
    """T minimizing the mean NLL over `chunks`, a re-iterable of (logits [n, V], targets [n]; -100 is skipped).

    Every LBFGS evaluation streams `chunks` once and backpropagates chunk by chunk, so memory is one chunk of logits.
    """
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        total, count = 0.0, 0
        for logits, targets in chunks:
            inv_t = torch.exp(-log_t).to(logits.device, torch.float32)
            loss = F.cross_entropy(logits.float() * inv_t, targets, reduction="sum", ignore_index=-100)
            loss.backward()
            total += loss.item()
            count += int((targets != -100).sum())
        if count == 0:
            raise ValueError("no scored positions to fit a temperature on")
        log_t.grad /= count
        return torch.tensor(total / count, dtype=torch.float64)

    opt.step(closure)
    return float(log_t.detach().exp())
