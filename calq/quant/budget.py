"""Mixed precision under a size budget: the bytes of a Linear at each precision (one function, `linear_bytes`), a
variant's footprint, and the choice of each Linear's precision.

The choice reads the sensitivity table (calq.stage_kinds.sensitivity: the mean KLD from the baseline when a Linear
alone is quantized with the variant's scheme, or with `objective: ece` what is left of it after the best global
temperature) and keeps at higher precision the Linears whose summed KLD is the most
that fits in the budget (a knapsack, `select`). A w4a16 variant promotes to int8 (`w8a16`: the Linear joins the
variant's `int8_layers`, a second compressed-tensors config group, GGUF Q8_0, ONNX MatMulNBits 8 bits); a w8a8 variant
promotes to unquantized (`float`: the Linear joins `ignore`, exported as float16). autoawq and awq refuse a budget.
With `demote` (5-bit variants) there are three levels, as in llama.cpp's K-quant mixes: 4 bits (`int4_layers`, a
third config group, GGUF Q4_0/Q4_1), 5 bits and int8, read from two tables (the 5-bit and the 4-bit scheme), so the
least sensitive Linears pay for the int8 ones. With `embedding: auto` the token embedding / output head is one more
item of the same knapsack: int4 (Q4_0 blocks), int8 (Q8_0) or float16, at the divergence the sensitivity stage
measured for each (`sensitivity/embedding`), so a budget spends its bytes on the head when that removes more KLD per
byte than any Linear does.

No torch here: the recipe schema imports `Budget`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calq.errors import CalqError
from calq.quant import embedding

FLOAT_BYTES = 2  # unquantized parameters are counted as float16, as the exporters store them


class Budget(BaseModel):
    """A size budget for one variant; exactly one of `bits_per_weight` and `size_mb`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits_per_weight: float | None = Field(None, gt=0, description="mean bits per weight of the Linears the variant "
                                                                  "quantizes (scales and zero points included)")
    size_mb: float | None = Field(None, gt=0, description="the whole model in MiB: the quantized Linears at their "
                                                          "precision, every other parameter (embedding, norms, "
                                                          "ignored layers) as float16")
    objective: Literal["kld", "ece"] = Field(
        "kld", description="what the choice minimises, summed over the Linears: `kld` the mean KLD from the baseline; "
                           "`ece` the mean KLD left after the best global temperature (what a temperature calibrator "
                           "cannot repair; by Pinsker's inequality it bounds how far the calibrated variant's "
                           "probabilities, and so its confidence, can move from the baseline's)")
    demote: bool = Field(False, description="bits: 5 variants: also hold the least sensitive Linears at 4 bits (the "
                                            "same groups; GGUF Q4_0/Q4_1) to pay for more int8 ones, a three-level "
                                            "mix as llama.cpp's K-quant types are; the sensitivity stage then "
                                            "measures the 4-bit scheme too")

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
    """Bytes of one Linear's weight at `precision`, as the deployed files hold it: w4a16 packs `bits` (4 or 5) per
    weight with a float16 scale (and a float16 zero point when asymmetric) per group of `group_size` inputs, as GGUF's
    blocks of 32 hold them (Q4_0 4.5, Q4_1 5, Q5_0 5.5, Q5_1 6 bits per weight); w8a16 one byte per weight with a
    float16 scale per block of 32 inputs (GGUF's Q8_0, 8.5 bits per weight); w8a8 one byte per weight and a float16
    scale per output channel; float is float16."""
    n, k = out_features, in_features
    if precision == "w4a16":
        groups = n * math.ceil(k / (group_size or 128))
        return math.ceil(n * k * bits / 8) + groups * FLOAT_BYTES * (1 if symmetric else 2)
    if precision == "w8a16":
        return n * k + n * math.ceil(k / 32) * FLOAT_BYTES
    if precision == "w8a8":
        return n * k + n * FLOAT_BYTES
    if precision == "float":
        return n * k * FLOAT_BYTES
    raise ValueError(f"unknown precision {precision!r}")


def promotion(variant) -> str:
    """What a promoted Linear of `variant` becomes: int8 weights (w8a16) for a w4a16 variant, else unquantized."""
    return "w8a16" if variant.scheme == "w4a16" else "float"


def demoted(variant):
    """`variant` at 4 bits: the scheme a budget with `demote` may hold its least sensitive Linears at."""
    return variant.model_copy(update={"bits": 4})


def measured_schemes(variant) -> list:
    """The schemes whose sensitivity tables a budgeted `variant` chooses by: its own, and 4 bits with `demote`."""
    return [variant, demoted(variant)] if variant.budget.demote else [variant]


def apply_choice(variant, chosen: dict):
    """`variant` with the Linears `chosen` by `select` held at their precision (promoted: joined to int8_layers, or to
    ignore; demoted: to int4_layers), the embedding at its chosen level (`embedding: auto`), under the same label."""
    key = "int8_layers" if promotion(variant) == "w8a16" else "ignore"
    return variant.model_copy(update={key: (*getattr(variant, key), *chosen["promoted"]),
                                      "int4_layers": (*variant.int4_layers, *chosen.get("demoted", ())),
                                      "embedding": chosen.get("embedding", variant.embedding),
                                      "name": variant.label})


def level_bytes(variant, shape: tuple[int, int], level: str) -> int:
    """Bytes of one Linear of `variant` at `level`: 'low' (4-bit groups), 'base' (the variant's scheme), 'high' (its
    promotion) or 'float'."""
    symmetric = bool(variant.symmetric) if variant.symmetric is not None else variant.scheme == "w8a8"
    precision = {"low": "w4a16", "base": variant.scheme, "high": promotion(variant), "float": "float"}[level]
    bits = 4 if level == "low" else variant.weight_bits
    return linear_bytes(*shape, precision, variant.group_size, symmetric, bits)


def variant_bytes(variant, shapes: dict[str, tuple[int, int]], promoted=(), demoted=(), level: str = "high") -> int:
    """Bytes of the Linears `shapes` ({name: (out, in)}) as `variant` stores them: those in `promoted` at `level`
    (default: the variant's promotion), those in `demoted` at 4 bits."""
    return sum(level_bytes(variant, shape, level if name in promoted else "low" if name in demoted else "base")
               for name, shape in shapes.items())


EMBEDDING_LEVELS = ("int4", "int8", "float")  # what `embedding: auto` chooses among, cheapest first


def embedding_bytes(numel: int, level: str) -> int:
    """Bytes of the embedding / head (`numel` weights) at `level`: Q4_0 or Q8_0 blocks (a float16 scale per 32
    values) or float16."""
    if level == "float":
        return numel * FLOAT_BYTES
    return numel * embedding.BITS[level] // 8 + numel // embedding.BLOCK * FLOAT_BYTES


def embedding_numel(model) -> int:
    """Weights of the input embedding and output head (tied weights counted once). Works on a meta-device model."""
    held = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None}
    return sum(held.values())


def footprint(model, variant) -> tuple[dict[str, tuple[int, int]], int]:
    """The Linears `variant` quantizes in `model` ({name: (out, in)}) and the bytes of every other parameter of the
    model: float16, but the embedding and output head in Q8_0 blocks (34 bytes per 32 weights) with `embedding: int8`,
    Q4_0 blocks (18 bytes) with `embedding: int4` and with `embedding: auto` (its cheapest level: `select` adds what
    a higher one costs). Works on a meta-device model."""
    layers = variant.quantized_layers({n: m for n, m in model.named_modules() if type(m).__name__ == "Linear"})
    shapes = {name: (m.out_features, m.in_features) for name, m in layers.items()}
    total = sum(p.numel() for p in model.parameters())
    held = embedding_numel(model) if variant.embedding != "float" else 0
    other = total - sum(n * k for n, k in shapes.values()) - held
    level = EMBEDDING_LEVELS[0] if variant.embedding == "auto" else variant.embedding
    return shapes, other * FLOAT_BYTES + (embedding_bytes(held, level) if held else 0)


def levels(variant) -> list[str]:
    """The levels a Linear of a budgeted `variant` may take, cheapest first."""
    return ["low", "base", "high"] if variant.budget.demote else ["base", "high"]


def check(variant, shapes: dict[str, tuple[int, int]], other_bytes: int) -> float:
    """The budget in bytes; a CalqError when even every Linear at the cheapest level does not fit in it."""
    budget = variant.budget
    limit = budget.limit_bytes(sum(n * k for n, k in shapes.values()), other_bytes)
    cheapest = levels(variant)[0]
    floor = (sum(level_bytes(variant, shape, cheapest) for shape in shapes.values())
             + (other_bytes if budget.counts_other() else 0))
    if floor > limit:
        need = (f"size_mb: {math.ceil(floor / 2**20 * 10) / 10}" if budget.counts_other()
                else f"bits_per_weight: {math.ceil(8 * floor / sum(n * k for n, k in shapes.values()) * 100) / 100}")
        raise CalqError(f"the budget ({limit / 2**20:,.1f} MiB) is below the size with every layer quantized "
                        f"({floor / 2**20:,.1f} MiB)", "budget", f"raise it to at least {need}, or remove budget")
    return limit


def select(variant, shapes: dict[str, tuple[int, int]], other_bytes: int, kld: dict[str, float],
           kld_low: dict[str, float] | None = None, steps: int = 65536, embedding_kld: dict[str, float] | None = None,
           embedding_weights: int = 0) -> dict:
    """The level of each Linear that minimises the summed KLD within the budget: `kld` is the sensitivity table at the
    variant's scheme, `kld_low` at 4 bits (with `demote`; at least `kld`), and the promotion counts as removing all of
    it. With `embedding: auto`, the embedding / head (`embedding_weights` weights, counted in `other_bytes` at int4)
    is one more item at int4, int8 or float16 with the KLD `embedding_kld` ({'int4': .., 'int8': ..}) measured at
    each. A multiple-choice knapsack, solved exactly by dynamic programming over the bytes above each item's cheapest
    level, in units of the costs' greatest common divisor, or of 1/`steps` of the room when that is finer (costs
    rounded up, so the choice always fits). Returns the promoted names (most KLD removed per extra byte first), the
    demoted ones, the embedding's level (with `embedding: auto`), the bytes used and the budget in bytes."""
    import numpy as np

    limit = check(variant, shapes, other_bytes)
    names, options = list(shapes), levels(variant)
    at = {"low": lambda n: max((kld_low or {}).get(n, 0.0), kld.get(n, 0.0)), "base": lambda n: kld.get(n, 0.0),
          "high": lambda n: 0.0}
    items = [(options, [at[level](n) for level in options],
              [level_bytes(variant, shapes[n], level) for level in options]) for n in names]
    if variant.embedding == "auto":
        if not embedding_kld:
            raise ValueError("embedding: auto chooses by the embedding's sensitivity table: pass embedding_kld")
        measured = {**embedding_kld, "float": 0.0}
        items.append((EMBEDDING_LEVELS, [measured[level] for level in EMBEDDING_LEVELS],
                      [embedding_bytes(embedding_weights, level) for level in EMBEDDING_LEVELS]))
        other_bytes -= embedding_bytes(embedding_weights, EMBEDDING_LEVELS[0])  # footprint counted it: now an item
    other = other_bytes if variant.budget.counts_other() else 0
    floor = sum(costs[0] for _, _, costs in items) + other
    extras = [np.array(costs) - costs[0] for _, _, costs in items]
    unit = max(float(np.gcd.reduce(np.concatenate(extras))), (limit - floor) / steps, 1.0)
    room = int((limit - floor) // unit)
    best, choices = np.zeros(room + 1), []  # best[j]: the least summed KLD of the items so far within j units
    for (levels_i, loss, _), extra in zip(items, extras):
        extra = np.ceil(extra / unit).astype(int)
        candidates = np.full((len(levels_i), room + 1), np.inf)
        for o, e in enumerate(extra):
            if e <= room:
                candidates[o, e:] = best[: room + 1 - e] + loss[o]
        # ties go to the cheaper level: what moves nothing buys nothing
        choices.append((candidates.argmin(0).astype(np.uint8), extra))
        best = candidates.min(0)
    levels_chosen, j = [], room
    for (levels_i, _, costs), (choice, extra) in reversed(list(zip(items, choices))):
        o = int(choice[j])
        levels_chosen.append((levels_i[o], costs[o]))
        j -= extra[o]
    levels_chosen.reverse()
    chosen = {n: level for n, (level, _) in zip(names, levels_chosen)}
    promoted = sorted((n for n in names if chosen[n] == "high"), reverse=True,
                      key=lambda n: kld.get(n, 0.0) / (level_bytes(variant, shapes[n], "high")
                                                        - level_bytes(variant, shapes[n], "base")))
    used = sum(cost for _, cost in levels_chosen) + other
    result = {"promoted": promoted, "demoted": [n for n in names if chosen[n] == "low"], "bytes": int(used),
              "limit_bytes": int(limit)}
    if variant.embedding == "auto":
        result["embedding"] = levels_chosen[-1][0]
    return result
