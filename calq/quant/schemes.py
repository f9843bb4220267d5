"""Quantization schemes as compressed-tensors config groups (the format vLLM and transformers load)."""

from __future__ import annotations

import torch

from calq.errors import CalqError
from calq.recipe import VariantSpec

SCHEMES = ("w8a8", "w4a16")


def config_groups(v: VariantSpec, where: str) -> dict:
    """The variant's config groups; first checks that its method exists and can do its scheme."""
    from calq.quant import methods  # methods imports the method modules, which import this one

    methods.check(v, where)
    if v.scheme == "w8a8":
        if v.group_size:
            raise CalqError("w8a8 uses per-channel int8 weights and takes no group_size", where, "remove group_size")
        activations = {"num_bits": 8, "type": "int", "symmetric": True,
                       "strategy": "token" if v.dynamic_activations else "tensor", "dynamic": v.dynamic_activations}
        weights = {"num_bits": 8, "type": "int", "symmetric": True if v.symmetric is None else v.symmetric, "strategy": "channel"}
        return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}}
    if v.scheme == "w4a16":
        weights = {"num_bits": 4, "type": "int", "symmetric": False if v.symmetric is None else v.symmetric,
                   "strategy": "group", "group_size": v.group_size or 128}
        return {"group_0": {"targets": ["Linear"], "weights": weights}}
    raise CalqError(f"unknown scheme '{v.scheme}'", where, f"use one of: {', '.join(SCHEMES)}")


def needs_calibration_data(v: VariantSpec) -> bool:
    """Whether the variant's method reads the calibration samples (the pipeline keys the quantize stage on them then)."""
    from calq.quant import methods

    return methods.needs_data(v)


def calibration_samples(samples: torch.Tensor, v: VariantSpec) -> torch.Tensor:
    """The shared calibration samples cut to the variant's `max_samples` and `max_seq_len` (the first ones)."""
    return samples[: v.max_samples, : v.max_seq_len]


def check_group_size(v: VariantSpec, widths: dict[str, int], where: str) -> None:
    """Group size must divide the input width of every quantized layer; name the layers and a size that works."""
    if v.scheme != "w4a16":
        return
    group = v.group_size or 128
    bad = sorted(name for name, w in widths.items() if w % group)
    if not bad:
        return
    sizes = sorted(set(widths.values()))
    working = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in sizes)]
    shown = ", ".join(f"{n} ({widths[n]})" for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    fix = f"set group_size: {working[0]}" if working else "set group_size to a divisor of " + ", ".join(map(str, sizes))
    raise CalqError(f"group_size {group} does not divide the input width of {len(bad)} layers: {shown}", f"{where}.group_size", fix)
