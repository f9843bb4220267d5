"""Global temperature scaling: logits / T, one scalar T fitted by minimizing NLL (Newton's method on 1/T)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from calq.calib.base import Calibrator, FitData, register
from calq.calib.hidden import CachedLogits
from calq.errors import CalqError

FILE = "temperature.json"
MIN_SCALE, MAX_SCALE = math.exp(-5), math.exp(5)  # bounds of 1/T


@register
class Temperature(Calibrator):
    """The calibrator `logits / T` (hidden states unused)."""

    name = "temperature"
    version = 2  # 2: fitted by Newton's method to the NLL's minimum (1: L-BFGS, stopping up to 0.1% of T short)
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

    The NLL is convex in s = 1/T: its derivative is E_p[z] - z_target and its second derivative Var_p[z] (p the
    tempered softmax, z the logits), so Newton's method on s converges in a few passes over `chunks` (each pass one
    chunk of logits in memory; 3 on the bundled model, where L-BFGS took 6 to 22). A step that would leave s <= 0 halves
    s instead; s stays within [e^-5, e^5] (T from 0.0067 to 148).
    """
    s = 1.0
    for _ in range(max_iter):
        grad = hess = 0.0
        count = 0
        for logits, targets in chunks:
            keep = targets != -100
            z = logits[keep].float()
            p = torch.softmax(z * s, -1)
            mean = (p * z).sum(-1, keepdim=True)
            grad += float((mean.squeeze(-1) - z.gather(-1, targets[keep, None]).squeeze(-1)).sum())
            hess += float((p * (z - mean).square()).sum())
            count += int(keep.sum())
        if count == 0:
            raise ValueError("no scored positions to fit a temperature on")
        if hess <= 0:  # every position's logits are flat: the NLL does not depend on T
            break
        newton = s - grad / hess
        moved = min(max(newton if newton > 0 else s / 2, MIN_SCALE), MAX_SCALE)
        # the error left after a Newton step is of the order of its square; at a bound the NLL keeps falling past it
        # (a model with no signal wants T -> infinity)
        done = abs(moved - s) < 1e-4 * s or moved == s
        s = moved
        if done:
            break
    return 1 / s
