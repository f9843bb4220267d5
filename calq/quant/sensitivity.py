"""Per-layer sensitivity: how far the model's next-token distribution moves from the baseline's when one Linear alone
is quantized round-to-nearest with a variant's weight scheme (compressed-tensors' own min-max parameters and fake
quantization, as llm-compressor's min-max observer sets them), measured as calq.metrics.DivergenceStats.

Activations are not quantized: for w8a8 this measures the per-channel int8 weights only. torch is imported inside
the functions: calq.quant.methods imports every module of this package while the recipe is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def scheme_key(variant) -> str:
    """What the measurement depends on in a variant's scheme: variants with the same key share one measurement."""
    weights = variant.config_groups()["group_0"]["weights"]
    group = f"-g{weights['group_size']}" if weights.get("group_size") else ""
    return f"{variant.scheme_name}{group}-{'sym' if weights['symmetric'] else 'asym'}"


def weight_args(variant):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**variant.config_groups()["group_0"]["weights"])


def fake_quantize(weight: torch.Tensor, args) -> torch.Tensor:
    """`weight` [out, in] quantized and dequantized round-to-nearest: min-max per output channel, or per group of
    `args.group_size` inputs."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    if args.strategy == "group":
        grouped = w.reshape(w.shape[0], -1, args.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
    else:
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale, zero = calculate_qparams(low, high, args)
    return ct_fake_quantize(w, scale, zero, args).to(weight.dtype)


def measure(model, samples: torch.Tensor, layers: list[str], args, batch_size: int = 4,
            progress: Callable[..., None] | None = None) -> dict:
    """{layer: DivergenceStats summary} on `samples` [n, seq] for each named Linear quantized alone, plus the seconds
    it took. The baseline's logits are computed once and kept (samples x seq x vocab float32)."""
    import torch

    with torch.no_grad():
        return _measure(model, samples, layers, args, batch_size, progress)


def _measure(model, samples, layers, args, batch_size, progress) -> dict:
    from calq.metrics import DivergenceStats

    model.eval()
    start = time.perf_counter()
    batches = list(samples.split(batch_size))
    reference = [model(batch).logits[:, :-1].float() for batch in batches]
    modules = dict(model.named_modules())
    result = {}
    for i, name in enumerate(layers):
        linear = modules[name]
        original = linear.weight.data
        linear.weight.data = fake_quantize(original, args)
        stats = DivergenceStats()
        try:
            for batch, ref in zip(batches, reference):
                stats.update(ref, model(batch).logits[:, :-1], batch[:, 1:])
        finally:
            linear.weight.data = original
        s = stats.summary()
        result[name] = {"mean_kld": s["mean_kld"], "p99_kld": s["p99_kld"], "same_top1": s["same_top1"],
                        "shape": list(original.shape)}
        if progress:
            progress(i + 1)
    return {"layers": result, "seconds": round(time.perf_counter() - start, 2)}
