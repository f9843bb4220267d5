"""Global temperature scaling: logits / T, one scalar T fitted by minimizing NLL (LBFGS on log T)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from calq.calib.base import Calibrator, FitData, register
from calq.calib.hidden import CachedLogits
from calq.errors import CalqError

FILE = "temperature.json"


@register
class Temperature(Calibrator):
    """The calibrator `logits / T` (hidden states unused)."""

    name = "temperature"
    fuse = "temperature"  # exporters divide the logits by its `temperature`
    needs_hidden = False

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.fit_info = {"temperature": temperature}

    @classmethod
    def fit(cls, data: FitData, config=None) -> Temperature:
        return cls(global_temperature(data))

    def scale(self, hidden, attention_mask=None):
        return hidden.new_full(hidden.shape[:2], 1 / self.temperature, dtype=torch.float32)

    def __call__(self, logits, hidden=None, attention_mask=None):
        return logits / self.temperature

    def save(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / FILE).write_text(json.dumps({"temperature": self.temperature}) + "\n")

    @classmethod
    def load(cls, folder: Path, model_config=None) -> Temperature:
        path = Path(folder) / FILE
        if not path.is_file():
            raise CalqError(f"no fitted temperature in {folder} (needs {FILE})", "calibrator", "fit it first")
        return cls(float(json.loads(path.read_text())["temperature"]))

    @classmethod
    def from_arg(cls, arg: str, model_config=None) -> Temperature:
        """`temperature:1.2` (a value) or `temperature:<folder>` (a fitted one)."""
        try:
            t = float(arg)
        except ValueError:
            return cls.load(Path(arg))
        if not t > 0:
            raise CalqError(f"temperature must be a positive number, got '{arg}'", "calibrator",
                            "e.g. calibrator=temperature:1.2")
        return cls(t)

    def __repr__(self) -> str:
        return f"Temperature({self.temperature:.4f})"


def global_temperature(data: FitData) -> float:
    """The NLL-optimal global T on the training records, fitted once per FitData (ATS starts from it too)."""
    if "temperature" not in data.memo:
        data.memo["temperature"] = fit_temperature(CachedLogits(data.cached, data.train, data.logits, data.chunk))
    return data.memo["temperature"]


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
