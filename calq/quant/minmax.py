"""Min-max quantization through llm-compressor's QuantizationModifier.

W4A16: round-to-nearest int4 weights with group-wise min-max scales (no data needed).
W8A8: per-channel int8 weights and int8 activations; static per-tensor activation scales are
observed on the calibration samples (per-token dynamic scales with `dynamic_activations`).
"""

from __future__ import annotations

from typing import Literal

from calq.quant import llmc
from calq.quant.base import MethodConfig, register


@register
class MinMax(MethodConfig):
    method: Literal["minmax"] = "minmax"

    def needs_data(self) -> bool:
        return self.scheme == "w8a8" and not self.dynamic_activations

    def quantize(self, model, samples):
        return llmc.run_oneshot(model, [self.quantization_modifier()], samples)
