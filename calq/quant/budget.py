"""Mixed precision under a size budget: the bytes of a Linear at each precision (one function, `linear_bytes`), a
variant's footprint, and the greedy choice of the Linears kept at higher precision.

The choice reads the sensitivity table (calq.stage_kinds.sensitivity: the mean KLD from the baseline when a Linear
alone is quantized with the variant's scheme) and promotes Linears in order of KLD removed per extra byte while the
budget holds. A w4a16 variant promotes to int8 (`w8a16`: the Linear joins the variant's `int8_layers`, a second
compressed-tensors config group, GGUF Q8_0, ONNX MatMulNBits 8 bits); a w8a8 variant promotes to unquantized
(`float`: the Linear joins `ignore`, exported as float16). autoawq refuses a budget.

No torch here: the recipe schema imports `Budget`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calq.errors import CalqError

FLOAT_BYTES = 2  # unquantized parameters are counted as float16, as the exporters store them


class Budget(BaseModel):
    """A size budget for one variant; exactly one of `bits_per_weight` and `size_mb`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits_per_weight: float | None = Field(None, gt=0, description="mean bits per weight of the Linears the variant "
                                                                  "quantizes (scales and zero points included)")
    size_mb: float | None = Field(None, gt=0, description="the whole model in MiB: the quantized Linears at their "
                                                          "precision, every other parameter (embedding, norms, "
                                                          "ignored layers) as float16")
    objective: Literal["kld"] = Field("kld", description="what the promoted layers minimise: the mean KLD from the "
                                                         "baseline (`ece`, token ECE after calibration, is not built)")

    @model_validator(mode="after")
    def _one_limit(self):
        if (self.bits_per_weight is None) == (self.size_mb is None):
            raise ValueError("set exactly one of bits_per_weight and size_mb")
        return self

    def limit_bytes(self, weights: int, other_bytes: int) -> float:
        """The budget in bytes of the quantized Linears (`weights` of them) plus, for size_mb, `other_bytes`."""
        if self.bits_per_weight is not None:
            return self.bits_per_weight * weights / 8
        return self.size_mb * 2**20

    def counts_other(self) -> bool:
        return self.size_mb is not None


def linear_bytes(out_features: int, in_features: int, precision: str, group_size: int | None = None,
                 symmetric: bool = False, bits: int = 4) -> int:
    """Bytes of one Linear's weight at `precision`: w4a16 packs `bits` (4 or 5) per weight with a float16 scale (and a
    float16 zero point when asymmetric) per group of `group_size` inputs, as GGUF's blocks of 32 hold them (Q4_0 4.5,
    Q4_1 5, Q5_0 5.5, Q5_1 6 bits per weight); w8a8 (and w8a16) one byte per weight and a float16 scale per output
    channel; float is float16."""
    n, k = out_features, in_features
    if precision == "w4a16":
        groups = n * math.ceil(k / (group_size or 128))
        return math.ceil(n * k * bits / 8) + groups * FLOAT_BYTES * (1 if symmetric else 2)
    if precision in ("w8a8", "w8a16"):
        return n * k + n * FLOAT_BYTES
    if precision == "float":
        return n * k * FLOAT_BYTES
    raise ValueError(f"unknown precision {precision!r}")


def promotion(variant) -> str:
    """What a promoted Linear of `variant` becomes: int8 weights (w8a16) for a w4a16 variant, else unquantized."""
    return "w8a16" if variant.scheme == "w4a16" else "float"


def promote(variant, names: list[str]):
    """`variant` with `names` held at its promotion precision (joined to int8_layers, or to ignore)."""
    key = "int8_layers" if promotion(variant) == "w8a16" else "ignore"
    return variant.model_copy(update={key: (*getattr(variant, key), *names)})


def variant_bytes(variant, shapes: dict[str, tuple[int, int]], promoted=(), precision: str | None = None) -> int:
    """Bytes of the Linears `shapes` ({name: (out, in)}) as `variant` stores them, those in `promoted` at
    `precision` (default: the variant's promotion)."""
    symmetric = bool(variant.symmetric) if variant.symmetric is not None else variant.scheme == "w8a8"
    higher = precision or promotion(variant)
    return sum(linear_bytes(n, k, higher if name in promoted else variant.scheme, variant.group_size, symmetric,
                            variant.weight_bits) for name, (n, k) in shapes.items())


def footprint(model, variant) -> tuple[dict[str, tuple[int, int]], int]:
    """The Linears `variant` quantizes in `model` ({name: (out, in)}) and the bytes of every other parameter of the
    model as float16 (tied weights counted once). Works on a meta-device model."""
    layers = variant.quantized_layers({n: m for n, m in model.named_modules() if type(m).__name__ == "Linear"})
    shapes = {name: (m.out_features, m.in_features) for name, m in layers.items()}
    total = sum(p.numel() for p in model.parameters())
    return shapes, (total - sum(n * k for n, k in shapes.values())) * FLOAT_BYTES


def check(variant, shapes: dict[str, tuple[int, int]], other_bytes: int) -> float:
    """The budget in bytes; a CalqError when even every Linear quantized does not fit in it."""
    budget = variant.budget
    limit = budget.limit_bytes(sum(n * k for n, k in shapes.values()), other_bytes)
    floor = variant_bytes(variant, shapes) + (other_bytes if budget.counts_other() else 0)
    if floor > limit:
        need = (f"size_mb: {math.ceil(floor / 2**20 * 10) / 10}" if budget.counts_other()
                else f"bits_per_weight: {math.ceil(8 * floor / sum(n * k for n, k in shapes.values()) * 100) / 100}")
        raise CalqError(f"the budget ({limit / 2**20:,.1f} MiB) is below the size with every layer quantized "
                        f"({floor / 2**20:,.1f} MiB)", "budget", f"raise it to at least {need}, or remove budget")
    return limit


def select(variant, shapes: dict[str, tuple[int, int]], other_bytes: int, kld: dict[str, float]) -> dict:
    """The Linears to promote: greedily by mean KLD removed per extra byte, skipping one that no longer fits.
    Returns the promoted names (most sensitive per byte first), the bytes used and the budget in bytes."""
    limit = check(variant, shapes, other_bytes)
    used = variant_bytes(variant, shapes) + (other_bytes if variant.budget.counts_other() else 0)
    extra = {name: variant_bytes(variant, {name: shape}, (name,)) - variant_bytes(variant, {name: shape})
             for name, shape in shapes.items()}
    promoted = []
    for name in sorted((n for n in shapes if kld.get(n, 0) > 0), key=lambda n: kld[n] / extra[n], reverse=True):
        if used + extra[name] <= limit:
            promoted.append(name)
            used += extra[name]
    return {"promoted": promoted, "bytes": used, "limit_bytes": int(limit)}
