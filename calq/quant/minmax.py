"""Min-max quantization through llm-compressor's QuantizationModifier.

W4A16: round-to-nearest int4 weights with group-wise min-max scales (no data needed).
W8A8: per-channel int8 weights and int8 activations; static per-tensor activation scales are
observed on the calibration samples.
"""

from __future__ import annotations

import torch

from calq.quant import llmc
from calq.quant.schemes import config_groups
from calq.recipe import VariantSpec


def needs_data(v: VariantSpec) -> bool:
    return v.scheme == "w8a8" and not v.dynamic_activations


def quantize(model, samples: torch.Tensor | None, variant: VariantSpec, where: str):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    modifier = QuantizationModifier(config_groups=config_groups(variant, where), ignore=list(variant.ignore))
    return llmc.run_oneshot(model, [modifier], samples)
