"""AutoAWQ (W4A16), an optional extra (`pip install calq[autoawq]`, autoawq==0.2.9), saved in the same
compressed-tensors `pack-quantized` layout as llm-compressor's W4A16.

AutoAWQ runs with `export_compatible=True`: it searches and applies its scales and clipping on the
calibration samples but leaves the weights in floating point. llm-compressor's W4A16 QuantizationModifier
then attaches the compressed-tensors scheme (and the `save_pretrained(save_compressed=True)` path), and
its weight scales and zero points are overwritten with those AutoAWQ's own quantizer computes for the
same weights, so the checkpoint holds exactly AutoAWQ's int4 values. AutoAWQ's zero points are unsigned
(0..15) and compressed-tensors' signed (-8..7): zp = z - 8 gives the same dequantized weights.
AutoAWQ's scaling and clipping touch every Linear of the decoder layers; `ignore` applies to the int4 step.
"""

from __future__ import annotations

import warnings

import torch

from calq.errors import CalqError
from calq.quant import llmc
from calq.quant.schemes import config_groups
from calq.recipe import VariantSpec


def _model_map(where: str) -> dict:
    """AutoAWQ's model type -> model class map; MethodUnavailable when autoawq cannot be imported."""
    try:
        # Its import warns at length that AutoAWQ is deprecated, and turns DeprecationWarnings on for the
        # whole process; recording restores the filters afterwards and keeps the notice off the console.
        with warnings.catch_warnings(record=True):
            from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    except ImportError as exc:
        from calq.quant.methods import MethodUnavailable

        raise MethodUnavailable(f"method autoawq needs the optional package autoawq, which cannot be imported ({exc})",
                                f"{where}.method", "pip install 'calq[autoawq]' (autoawq==0.2.9), or use method awq") from None
    return AWQ_CAUSAL_LM_MODEL_MAP


def check_model(config, variant: VariantSpec, where: str) -> None:
    model_map = _model_map(where)
    if config.model_type not in model_map:
        raise CalqError(f"AutoAWQ 0.2.9 does not handle model type '{config.model_type}'", f"{where}.method",
                        "use method awq (llm-compressor)")
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
                        f"{where}.method", "use method awq (llm-compressor has no such limit)")


def quantize(model, samples: torch.Tensor, variant: VariantSpec, where: str):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model_type = model.config.model_type
    awq_model = _model_map(where)[model_type](model, model_type, False, model.config, None, None)
    device = model.device
    zero_point = not variant.symmetric if variant.symmetric is not None else True
    awq_model.quantize(None, {"w_bit": 4, "q_group_size": variant.group_size or 128, "zero_point": zero_point, "version": "gemm"},
                       calib_data=samples.tolist(), max_calib_samples=samples.shape[0], max_calib_seq_len=samples.shape[1],
                       export_compatible=True)
    model.to(device)  # AutoAWQ leaves the layers on the GPU when there is one

    modifier = QuantizationModifier(config_groups=config_groups(variant, where), ignore=list(variant.ignore))
    llmc.run_oneshot(model, [modifier], None)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            _, scales, zeros = awq_model.quantizer.pseudo_quantize_tensor(module.weight.data)
            module.weight_scale.data.copy_(scales)
            if zeros is not None:
                module.weight_zero_point.data.copy_(zeros - 8)
    return model
