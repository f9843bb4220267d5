"""GPTQ through llm-compressor's GPTQModifier: each Linear's weight columns are rounded one block at a time, and the
rounding error of each column is spread over the columns not yet rounded, weighted by the inverse Hessian of the
layer's inputs (X^T X on the calibration samples). Same schemes and checkpoint layout as minmax.

`actorder` is the order in which columns are rounded. calq offers the orders that keep each quantization group a
contiguous run of columns ('static', llm-compressor's default: by decreasing Hessian diagonal, with the groups' scales
fixed beforehand in natural order; or none: natural order). actorder 'group' regroups the columns by activation
order and stores a per-column group index (weight_g_idx): neither calq's kernels nor the formats it exports
(ONNX MatMulNBits blocks, GGUF blocks of 32) hold one, so it is refused when the recipe is read.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from calq.quant import llmc
from calq.quant.base import MethodConfig, register


@register
class Gptq(MethodConfig):
    method: Literal["gptq"] = "gptq"
    actorder: Literal["static", "weight", "group", "dynamic"] | None = Field(
        "static", description="order in which GPTQ rounds the weight columns: static (by activation size, groups kept "
                              "in natural order; 'weight' is the same), or null (natural order)")
    dampening_frac: float = Field(0.01, description="added to the Hessian's diagonal before inverting it, as a "
                                                    "fraction of its mean (GPTQ's percdamp, 0 < x < 1); raise it "
                                                    "(e.g. 0.1) when the Cholesky factorization fails")

    @field_validator("actorder")
    @classmethod
    def _contiguous_groups(cls, order):
        if order in ("group", "dynamic"):
            raise ValueError(f"actorder '{order}' stores a per-column group index (weight_g_idx) that calq's kernels "
                             "and exporters (ONNX MatMulNBits, GGUF) cannot hold; use actorder: static")
        return order

    @field_validator("dampening_frac")
    @classmethod
    def _dampening(cls, fraction):
        if not 0 < fraction < 1:
            raise ValueError("dampening_frac must lie strictly between 0 and 1 (0.01 is usual)")
        return fraction

    def quantization_modifier(self):
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=self.config_groups(), ignore=list(self.ignore), actorder=self.actorder,
                            dampening_frac=self.dampening_frac)

    def quantize(self, model, samples):
        return llmc.run_oneshot(model, [self.quantization_modifier()], samples)
