"""Per-layer sensitivity: how far the model's next-token distribution moves from the baseline's when one Linear alone
is quantized round-to-nearest with a variant's weight scheme (compressed-tensors' own min-max parameters and fake
quantization, as llm-compressor's min-max observer sets them), measured as calq.metrics.DivergenceStats, and as the
divergence left after the best global temperature (calq.metrics.tempered_kld: what a temperature calibrator cannot
repair, the cost a budget with `objective: ece` minimises).

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


COST = {"kld": "mean_kld", "ece": "tempered_kld"}  # what a budget's objective minimises, per table row


def costs(table: dict, objective: str = "kld") -> dict[str, float]:
    """{layer (or embedding level): its cost} of a table `measure` or `measure_embedding` wrote: the mean KLD, or
    with objective `ece` the mean KLD left after the best global temperature (`tempered_kld`)."""
    return {name: m[COST[objective]] for name, m in table["layers"].items()}


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
    modules = dict(model.named_modules())
    edits = {name: (lambda weight=modules[name].weight: [(weight, fake_quantize(weight.data, args))])
             for name in layers}
    return _measure(model, samples, edits, batch_size, progress)


def measure_embedding(model, samples: torch.Tensor, batch_size: int = 4,
                      progress: Callable[..., None] | None = None) -> dict:
    """The same for the token embedding and output head (one matrix when tied) alone in Q4_0 and Q8_0 blocks
    (calq.quant.embedding, what `embedding: int4 | int8` holds): {'layers': {'int4': .., 'int8': ..}, 'seconds'}."""
    from calq.quant import embedding

    matrices = list(embedding.matrices(model).values())
    edits = {f"int{bits}": (lambda bits=bits: [(w, embedding.dequantize(*embedding.blocks(w.data, bits)).to(w.dtype))
                                               for w in matrices])
             for bits in (4, 8)}
    return _measure(model, samples, edits, batch_size, progress)


def _measure(model, samples, edits: dict[str, Callable[[], list]], batch_size, progress) -> dict:
    """Each edit ({name: () -> [(parameter, replacement data)]}) applied alone, the model's divergence from its own
    logits measured, the parameters restored."""
    import torch

    from calq.metrics import DivergenceStats, tempered_kld

    model.eval()
    start = time.perf_counter()
    result = {}
    with torch.no_grad():
        batches = list(samples.split(batch_size))
        reference = [model(batch).logits[:, :-1].float() for batch in batches]
        for i, (name, edit) in enumerate(edits.items()):
            replaced = edit()
            originals = [parameter.data for parameter, _ in replaced]
            stats, outputs = DivergenceStats(), []
            try:
                for parameter, data in replaced:
                    parameter.data = data
                for batch, ref in zip(batches, reference):
                    outputs.append(model(batch).logits[:, :-1])
                    stats.update(ref, outputs[-1], batch[:, 1:])
            finally:
                for (parameter, _), original in zip(replaced, originals):
                    parameter.data = original
            s = stats.summary()
            temperature, tempered = tempered_kld(list(zip(reference, outputs)), s["mean_kld"])
            result[name] = {"mean_kld": s["mean_kld"], "p99_kld": s["p99_kld"], "same_top1": s["same_top1"],
                            "tempered_kld": tempered, "temperature": temperature, "shape": list(originals[0].shape)}
            if progress:
                progress(i + 1)
    return {"layers": result, "seconds": round(time.perf_counter() - start, 2)}
