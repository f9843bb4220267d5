"""Activation ranges: per-channel statistics of every Linear layer's input over the calibration samples."""

from __future__ import annotations

import inspect
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
        self.held: dict[str, torch.Tensor | None] = {}  # layers whose input the hook keeps instead of observing
        self.names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.held:
                self.held[name] = inputs[0].detach()
                return
            self.observe(name, inputs[0])

        return hook

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Add the activations `x` [..., features] entering layer `name` to its statistics."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
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
    """Run the samples through the model with hooks; returns {'<layer>.<stat>': tensor} (see STATS, plus .tokens).

    The output layer's input at every position is the model's last hidden state, so where the model can return
    logits for the last position only (`logits_to_keep`), its statistics are taken from the hidden states and the
    [batch, seq, vocabulary] logits, the largest tensor of the pass and a fifth of its work, are never computed.
    The first batch checks that the output layer did receive the last hidden state; if not, every position's
    logits are computed as before.
    """
    collector = RangeCollector(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head and n in collector.names), None)
    trim = head_name is not None and "logits_to_keep" in inspect.signature(model.forward).parameters
    try:
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start:start + batch_size]
            if trim:
                collector.held[head_name] = None
                out = model(input_ids=batch, logits_to_keep=1, output_hidden_states=True)
                seen, last = collector.held.pop(head_name), out.hidden_states[-1]
                trim = seen is not None and seen.shape == last[:, -1:].shape and torch.equal(seen, last[:, -1:])
                if trim:
                    collector.observe(head_name, last)
                elif start == 0:  # the output layer does not read the last hidden state as it is: start again
                    collector.stats.clear()
                    collector.tokens.clear()
                    model(input_ids=batch)
                else:
                    raise CalqError("the output layer's input stopped being the last hidden state", "calibration",
                                    "report this model's architecture to calq")
            else:
                model(input_ids=batch)
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
