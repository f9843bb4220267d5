"""SmoothQuant (W8A8): move activation outliers into the weights, then quantize as minmax W8A8 does.

llm-compressor's SmoothQuantModifier divides each input channel j of the layers after a norm by
s_j = max|X_j|^a / max|W_j|^(1-a) (a = `smoothing_strength`) and folds s_j into the norm's weight,
so the model computes the same function while the activations it quantizes have a smaller absmax
spread. The QuantizationModifier that follows is the same W8A8 config as minmax.
"""

from __future__ import annotations

import math

import torch

from calq.quant import llmc
from calq.quant.schemes import config_groups
from calq.recipe import VariantSpec


def smoothing(variant: VariantSpec):
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    return SmoothQuantModifier(smoothing_strength=variant.smoothing_strength)


def quantize(model, samples: torch.Tensor, variant: VariantSpec, where: str):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    quantization = QuantizationModifier(config_groups=config_groups(variant, where), ignore=list(variant.ignore))
    return llmc.run_oneshot(model, [smoothing(variant), quantization], samples)


def _spread(absmax: torch.Tensor) -> float:
    median = absmax.float().median().item()
    return absmax.max().item() / median if median > 0 else math.inf


def outlier_reduction(before: dict[str, dict[str, torch.Tensor]], after: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
    """Range dicts as `calq.calib.ranges.load` returns them. Per layer (in both), the absmax spread (max channel absmax / median channel absmax) before and after
    smoothing and by what factor smoothing reduced it; strongest outliers first. Layers that SmoothQuant does
    not smooth (o_proj, down_proj in Llama) keep a factor near 1."""
    rows = []
    for layer in before.keys() & after.keys():
        b, a = _spread(before[layer]["absmax"]), _spread(after[layer]["absmax"])
        rows.append({"layer": layer, "spread_before": round(b, 2), "spread_after": round(a, 2),
                     "reduction": round(b / a, 2) if 0 < a < math.inf else None})
    rows.sort(key=lambda r: (-r["spread_before"], r["layer"]))
    return rows
