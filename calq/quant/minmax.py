"""Min-max quantization through llm-compressor's QuantizationModifier.

W4A16: round-to-nearest int4 weights with group-wise min-max scales (no data needed).
W8A8: per-channel int8 weights and int8 activations; static per-tensor activation scales are
observed on the calibration samples.
"""

from __future__ import annotations

import torch

from calq.quant import llmc
from calq.quant.schemes import config_groups, needs_calibration_data
from calq.recipe import VariantSpec


def quantize(model, samples: torch.Tensor, variant: VariantSpec, where: str):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    modifier = QuantizationModifier(config_groups=config_groups(variant, where), ignore=list(variant.ignore))
    return llmc.run_oneshot(model, [modifier], samples if needs_calibration_data(variant) else None)
