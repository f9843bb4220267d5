"""A variant checkpoint as the exporters need it: a float transformers model plus calq's own integers per layer.

The integers are read with calq's kernel loader (`calq.kernels.load_quantized`, which reads compressed-tensors
folders directly), so every format packs exactly the values, scales and zero points the report measured. The float
model has each quantized Linear replaced by an nn.Linear holding the dequantized weight: it is the graph exporters
trace (W4A16: it computes what the PyTorch variant computes; W8A8: its activations are not quantized yet, each
format adds that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calq.errors import CalqError


@dataclass
class GroupLayer:
    """W4A16 (and its 5-bit form): w[n, k] = (q[n, k] - zero[n, k // group]) * scale[n, k // group]; q and zero
    unsigned 0..2^bits - 1."""

    q: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # float32 [N, K / group]
    zero: torch.Tensor  # uint8 [N, K / group]; 2^(bits - 1) everywhere when symmetric (8 for int4)
    group_size: int
    symmetric: bool
    bits: int = 4

    def dequantize(self) -> torch.Tensor:
        zero = self.zero.repeat_interleave(self.group_size, 1).float()
        return (self.q.float() - zero) * self.scale.repeat_interleave(self.group_size, 1)


@dataclass
class Int8Layer:
    """W8A8: w[n, k] = q[n, k] * scale[n]; activations quantized per token (dynamic) or with `input_scale`."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]
    input_scale: float | None  # static per-tensor activation scale; None: per-token dynamic

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


@dataclass
class Int8WeightLayer:
    """W8A16 (the int8 layers of a mixed checkpoint): w[n, k] = q[n, k] * scale[n]; activations not quantized."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [N, K/32, 16]: the low four bits of unsigned values q [N, K], weight j of a block of 32 in the low nibble
    of byte j, weight j + 16 in the high one (ggml's Q4 / Q5 layout; the ONNX export packs an int4 embedding so)."""
    n, k = q.shape
    q = q.reshape(n, k // 32, 2, 16)
    return ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).astype(np.uint8)


@dataclass
class BlockMatrix:
    """An embedding or output head held as Q8_0 or Q4_0 (`embedding: int8 | int4`, calq/quant/embedding.py):
    w = q * d per block of 32 along a row."""

    q: torch.Tensor  # int8 [V, H]: -127..127 (bits 8) or -8..7 (bits 4)
    d: torch.Tensor  # float16 [V, H / 32]
    bits: int = 8

    @property
    def gguf_type(self) -> str:
        from calq.quant.embedding import GGUF_TYPE

        return GGUF_TYPE[self.bits]


@dataclass
class Variant:
    model: nn.Module  # float32 transformers causal LM, eval mode
    layers: dict[str, GroupLayer | Int8Layer | Int8WeightLayer]  # by module name in `model`; empty for the baseline
    folder: Path
    matrices: dict[str, BlockMatrix] = field(default_factory=dict)  # by parameter name: the int8/int4 embedding

    @property
    def scheme(self) -> str:
        kinds = {type(layer) for layer in self.layers.values()}
        bits = {layer.bits for layer in self.layers.values() if isinstance(layer, GroupLayer)}
        return ("baseline" if not kinds else f"w{bits.pop()}a16" if kinds == {GroupLayer} and len(bits) == 1
                else "w8a8" if kinds == {Int8Layer} else "mixed")


def block_matrices(model: nn.Module) -> dict[str, BlockMatrix]:
    """The embedding and output head that `embedding: int8 | int4` put on the Q8_0 / Q4_0 grid
    (calq/quant/embedding.py: they are recognised by lying exactly on it), as their integers and float16 block
    scales."""
    from calq.quant import embedding

    found = {}
    for name, weight in embedding.matrices(model).items():
        held = embedding.on_grid(weight)
        if held is not None:
            found[name] = BlockMatrix(*held)
    return found


def quantization_config(folder: str | Path) -> dict | None:
    """config.json's quantization_config, or None for an unquantized checkpoint."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CalqError(f"no config.json in {folder}", str(folder), "give a variant folder written by calq")
    return json.loads(config_file.read_text()).get("quantization_config")


def read(folder: str | Path) -> Variant:
    """The variant in `folder` (a compressed-tensors checkpoint, or an unquantized model folder)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if quantization_config(folder) is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return Variant(model.eval().requires_grad_(False), {}, folder, block_matrices(model))

    # triton (behind calq.kernels) is an optional package: the edge and gpu extras bring it
    from calq.kernels import GroupWeightLinear, W4A16Linear, W8A8Linear, W8A16Linear, load_quantized
    from calq.kernels.w4a16 import unpack_int4

    model = load_quantized(folder, "cpu", torch.float32)  # raises CalqError for schemes calq does not write
    layers: dict[str, GroupLayer | Int8Layer | Int8WeightLayer] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, W4A16Linear):
            # kernel layout: qweight [K/8, N] int32, scales and zeros [K/G, N]
            layer = GroupLayer(unpack_int4(module.qweight.t().contiguous(), module.in_features),
                               module.scales.t().float().contiguous(), module.zeros.t().contiguous(),
                               module.group_size, symmetric=bool((module.zeros == 8).all()))
        elif isinstance(module, GroupWeightLinear):
            layer = GroupLayer(module.q, module.scales, module.zeros, module.group_size,
                               symmetric=bool((module.zeros == 1 << (module.bits - 1)).all()), bits=module.bits)
        elif isinstance(module, W8A8Linear):
            static = module.input_scale
            layer = Int8Layer(module.weight, module.weight_scale.float(), None if static is None else float(static))
        elif isinstance(module, W8A16Linear):
            layer = Int8WeightLayer(module.weight, module.weight_scale.float())
        else:
            continue
        layers[name] = layer
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = layer.dequantize()
        if module.bias is not None:
            linear.bias.data = module.bias.float()
        model.set_submodule(name, linear)
    return Variant(model.requires_grad_(False), layers, folder, block_matrices(model))
