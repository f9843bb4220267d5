"""Activation ranges: per-channel statistics of every Linear layer's input over the calibration samples."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calq.errors import CalqError

STATS = ("min", "max", "absmax", "mean_abs")


class RangeCollector:
    """Forward hooks on every nn.Linear input; running per-channel min, max, absmax, sum|x| and token count."""

    def __init__(self, model: torch.nn.Module):
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        ]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if not torch.isfinite(x).all():
                raise CalqError(f"non-finite activations (NaN/inf) entering layer {name}", "calibration",
                                "check the model weights and dtype (float16 overflows: use float32 or bfloat16)")
            lo, hi, mag = x.amin(0), x.amax(0), x.abs()
            s = self.stats.get(name)
            if s is None:
                self.stats[name] = {"min": lo, "max": hi, "absmax": mag.amax(0), "sum_abs": mag.sum(0)}
                self.tokens[name] = x.shape[0]
            else:
                torch.minimum(s["min"], lo, out=s["min"])
                torch.maximum(s["max"], hi, out=s["max"])
                torch.maximum(s["absmax"], mag.amax(0), out=s["absmax"])
                s["sum_abs"] += mag.sum(0)
                self.tokens[name] += x.shape[0]

        return hook

    def close(self):
        for h in self._handles:
            h.remove()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in self.stats.items():
            n = self.tokens[name]
            out[f"{name}.min"], out[f"{name}.max"], out[f"{name}.absmax"] = s["min"], s["max"], s["absmax"]
            out[f"{name}.mean_abs"] = s["sum_abs"] / n
            out[f"{name}.tokens"] = torch.tensor([n], dtype=torch.int64)
        return out


@torch.no_grad()
def collect(model, samples: torch.Tensor, batch_size: int = 8, progress=None) -> dict[str, torch.Tensor]:
    """Run the samples through the model with hooks; returns {'<layer>.<stat>': tensor} (see STATS, plus .tokens)."""
    collector = RangeCollector(model)
    try:
        for start in range(0, samples.shape[0], batch_size):
            model(input_ids=samples[start:start + batch_size])
            if progress:
                progress(min(start + batch_size, samples.shape[0]))
    finally:
        collector.close()
    return collector.tensors()


def save(ranges: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in ranges.items()}, str(path), metadata=metadata)


def by_layer(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'<layer>.<stat>': tensor} -> {layer: {stat: tensor}}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        layer, stat = key.rsplit(".", 1)
        layers.setdefault(layer, {})[stat] = value
    return layers


def load(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {stat: tensor}} from a saved ranges file."""
    return by_layer(load_file(str(path)))


def outlier_summary(layers: dict[str, dict[str, torch.Tensor]], top_k: int = 10) -> list[dict]:
    """Layers ranked by outlier strength: max channel absmax / median channel absmax."""
    rows = []
    for name, s in layers.items():
        absmax = s["absmax"].float()
        median = absmax.median().item()
        ratio = absmax.max().item() / median if median > 0 else math.inf
        rows.append({
            "layer": name,
            "ratio": round(ratio, 2),
            "absmax": round(absmax.max().item(), 4),
            "median_absmax": round(median, 4),
            "channel": int(absmax.argmax()),
            "channels": absmax.numel(),
            "tokens": int(s["tokens"].item()),
        })
    rows.sort(key=lambda r: r["ratio"], reverse=True)
    return rows[:top_k]
