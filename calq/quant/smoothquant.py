"""SmoothQuant (W8A8): move activation outliers into the weights, then quantize as minmax W8A8 does.

llm-compressor's SmoothQuantModifier divides each input channel j of the layers after a norm by
s_j = max|X_j|^a / max|W_j|^(1-a) (a = `smoothing_strength`) and folds s_j into the norm's weight,
so the model computes the same function while the activations it quantizes have a smaller absmax
spread. The QuantizationModifier that follows is the same W8A8 config as minmax.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from calq.quant import llmc
from calq.quant.base import MethodConfig, register

if TYPE_CHECKING:
    import torch

SPREAD_SAMPLES = 32  # calibration samples on which the effect on the activation spread is measured


@register
class SmoothQuant(MethodConfig):
    method: Literal["smoothquant"] = "smoothquant"
    schemes: ClassVar = ("w8a8",)
    smoothing_strength: float = Field(0.8, description="how much of the activation outliers moves into the weights "
                                                       "(alpha, 0 < x < 1)")

    @field_validator("smoothing_strength")
    @classmethod
    def _strength(cls, v):
        if not 0 < v < 1:
            raise ValueError("smoothing_strength must lie strictly between 0 and 1 "
                             "(SmoothQuant's alpha; 0.5-0.8 is usual)")
        return v

    def quantize(self, model, samples):
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        smoothing = SmoothQuantModifier(smoothing_strength=self.smoothing_strength)
        return llmc.run_oneshot(model, [smoothing, self.quantization_modifier()], samples)

    def extra_outputs(self, quantized, samples, load_base):
        """The activation absmax spread per layer, unquantized model vs the smoothed and quantized one, same samples.

        The hooks see each Linear's input before its activation quantizer, so the spread 'after' is what
        SmoothQuant left for the int8 activation scale to cover."""
        from calq.calib import ranges

        samples = samples[:SPREAD_SAMPLES]
        before = ranges.by_layer(ranges.collect(load_base(), samples))
        after = ranges.by_layer(ranges.collect(quantized, samples))
        return {"smoothing": outlier_reduction(before, after)}


def _spread(absmax: torch.Tensor) -> float:
    median = absmax.float().median().item()
    return absmax.max().item() / median if median > 0 else math.inf


def outlier_reduction(before: dict[str, dict[str, torch.Tensor]],
                      after: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
    """Range dicts as `calq.calib.ranges.load` returns them. Per layer (in both), the absmax spread (max channel
    absmax / median channel absmax) before and after smoothing and by what factor smoothing reduced it; strongest
    outliers first. Layers that SmoothQuant does not smooth (o_proj, down_proj in Llama) keep a factor near 1."""
    rows = []
    for layer in before.keys() & after.keys():
        b, a = _spread(before[layer]["absmax"]), _spread(after[layer]["absmax"])
        rows.append({"layer": layer, "spread_before": round(b, 2), "spread_after": round(a, 2),
                     "reduction": round(b / a, 2) if 0 < a < math.inf else None})
    rows.sort(key=lambda r: (-r["spread_before"], r["layer"]))
    return rows
