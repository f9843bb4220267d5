"""AutoAWQ (W4A16), an optional extra (`pip install calq[autoawq]`, autoawq==0.2.9), saved in the same
compressed-tensors `pack-quantized` layout as llm-compressor's W4A16.

AutoAWQ runs with `export_compatible=True`: it searches and applies its scales and clipping on the
calibration samples but leaves the weights in floating point. llm-compressor's W4A16 QuantizationModifier
then attaches the compressed-tensors scheme (and the `save_pretrained(save_compressed=True)` path), and
its weight scales and zero points are overwritten with those AutoAWQ's own quantizer computes for the
same weights, so the checkpoint holds exactly AutoAWQ's int4 values. AutoAWQ's zero points are unsigned
(0..15) and compressed-tensors' signed (-8..7): zp = z - 8 gives the same dequantized weights.
AutoAWQ's scaling and clipping touch every Linear of the decoder layers; `ignore` applies to the int4 step.
On a CPU, AutoAWQ's scale search corrupts the weights it means to restore; `_snapshots_that_copy` is the workaround.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import field_validator

from calq.errors import CalqError
from calq.quant import llmc
from calq.quant.base import MethodConfig, MethodUnavailable, register

if TYPE_CHECKING:
    import torch


@register
class AutoAwq(MethodConfig):
    method: Literal["autoawq"] = "autoawq"
    schemes: ClassVar = ("w4a16",)
    version: ClassVar = 2  # the CPU fix (_snapshots_that_copy) changed what it produces
    no_int8_layers: ClassVar = ("AutoAWQ's search scales and clips every decoder Linear for int4, and calq writes "
                                "AutoAWQ's int4 scales into each one")

    @field_validator("bits")
    @classmethod
    def _four_bits(cls, bits):
        if bits not in (None, 4):
            raise ValueError(f"autoawq quantizes with AutoAWQ's 4-bit search (w_bit 4), not {bits} bits; use method "
                             "awq, gptq or minmax for bits: 5")
        return bits

    def check_model(self, config) -> None:
        check_model(config)

    def quantize(self, model, samples):
        quantizer = scale_and_clip(model, samples, self)
        llmc.run_oneshot(model, [self.quantization_modifier()], None)
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                _, scales, zeros = quantizer.pseudo_quantize_tensor(module.weight.data)
                module.weight_scale.data.copy_(scales)
                if zeros is not None:
                    module.weight_zero_point.data.copy_(zeros - 8)
        return model


def _model_map() -> dict:
    """AutoAWQ's model type -> model class map; MethodUnavailable when autoawq cannot be imported."""
    try:
        # Its import warns at length that AutoAWQ is deprecated, and turns DeprecationWarnings on for the
        # whole process; recording restores the filters afterwards and keeps the notice off the console.
        with warnings.catch_warnings(record=True):
            from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    except ImportError as exc:
        raise MethodUnavailable(f"method autoawq needs the optional package autoawq, which cannot be imported ({exc})",
                                "method", "pip install 'calq[autoawq]' (autoawq==0.2.9), or use method awq") from None
    return AWQ_CAUSAL_LM_MODEL_MAP


def check_model(config) -> None:
    model_map = _model_map()
    if config.model_type not in model_map:
        raise CalqError(f"AutoAWQ 0.2.9 does not handle model type '{config.model_type}'", "method",
                        "use method awq (llm-compressor)")
    import torch
    from awq.utils.module import get_named_linears
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # AutoAWQ's clip search walks output channels in batches of 64 (or 256) and asserts they divide evenly;
    # it skips the query and key projections.
    widths = {name: linear.out_features for layer in model_map[config.model_type].get_model_layers(model)
              for name, linear in get_named_linears(layer).items()
              if not any(s in name for s in ("q_", "k_", "query", "key", "Wqkv"))}
    bad = sorted({f"{name} ({w})" for name, w in widths.items() if w % 64})
    if bad:
        raise CalqError(f"AutoAWQ's clip search needs output widths that are multiples of 64; not: {', '.join(bad)}",
                        "method", "use method awq (llm-compressor has no such limit)")


def scale_and_clip(model, samples: torch.Tensor, variant: AutoAwq, clip: bool = True):
    """AutoAWQ's search, applied to `model` in floating point (scales folded into the preceding norms and layers,
    then weight clipping); returns AutoAWQ's quantizer, whose rounding the int4 export reuses."""
    model_type = model.config.model_type
    awq_model = _model_map()[model_type](model, model_type, False, model.config, None, None)  # first: checks the import
    from awq.utils.utils import get_best_device

    device = model.device
    zero_point = not variant.symmetric if variant.symmetric is not None else True
    with _snapshots_that_copy() if get_best_device() == "cpu" else nullcontext():
        awq_model.quantize(None, {"w_bit": 4, "q_group_size": variant.group_size or 128, "zero_point": zero_point,
                                  "version": "gemm"},
                           calib_data=samples.tolist(), max_calib_samples=samples.shape[0],
                           max_calib_seq_len=samples.shape[1], export_compatible=True, apply_clip=clip)
    model.to(device)  # AutoAWQ leaves the layers on the GPU when there is one
    return awq_model.quantizer


@contextmanager
def _snapshots_that_copy():
    """AutoAWQ 0.2.9's scale search keeps a block's weights as `{k: v.cpu() for k, v in state_dict().items()}`, scales
    them in place for each candidate and restores them from that snapshot. `.cpu()` copies a GPU tensor but returns a
    CPU tensor itself, so on a CPU the snapshot is the live weights: the first candidate's scales stay in them and
    every later candidate and the final scaling start from corrupted weights (measured on SmolLM2-135M: perplexity
    30.1 -> 242,906 after the search, before any rounding). While AutoAWQ runs on the CPU, the snapshot is a copy."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def search_with_a_copied_snapshot(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        live = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {name: t.clone() for name, t in live(*a, **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    AwqQuantizer._compute_best_scale = search_with_a_copied_snapshot
    try:
        yield
    finally:
        AwqQuantizer._compute_best_scale = search
