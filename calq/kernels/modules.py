"""Kernel-backed Linear layers, and a loader that puts them into a transformers model.

`load_quantized` reads a compressed-tensors checkpoint folder (config.json `quantization_config` plus safetensors
files) directly, without llm-compressor or compressed-tensors: it builds the model skeleton without weights, swaps
every quantized nn.Linear for a `W4A16Linear` (pack-quantized int4), `W8A16Linear` (pack-quantized int8 weights,
16-bit activations: the int8 layers of a mixed checkpoint), `GroupWeightLinear` (pack-quantized weights of another
width, 5 bits: no Triton kernel, dequantized for torch's matmul) or `W8A8Linear` (int-quantized int8), and loads the
remaining tensors (embeddings, norms, lm_head) as they are.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from calq.errors import CalqError
from calq.kernels import w4a16, w8a8


class W4A16Linear(nn.Module):
    """int4 weights in the kernel layout of `w4a16.repack`; forward runs the calq::w4a16_linear op."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[0] * 8, qweight.shape[1]
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype) -> W4A16Linear:
        """From one layer's checkpoint tensors (weight_packed, weight_scale, [weight_zero_point], [bias])."""
        qweight, scales, zeros = w4a16.repack(tensors["weight_packed"], tensors["weight_scale"],
                                              tensors.get("weight_zero_point"), group_size, dtype)
        bias = tensors.get("bias")
        return cls(qweight, scales, zeros, group_size, None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16.w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class W8A8Linear(nn.Module):
    """int8 weights [N, K] with float32 per-channel scales [N]; int8 activations with per-token dynamic scales,
    or the static per-tensor `input_scale` when given."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> W8A8Linear:
        """From one layer's checkpoint tensors (weight, weight_scale, [input_scale], [bias])."""
        input_scale, bias = tensors.get("input_scale"), tensors.get("bias")
        return cls(tensors["weight"], tensors["weight_scale"].float().reshape(-1),
                   None if input_scale is None else input_scale.float().reshape(1),
                   None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8.w8a8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)

    def extra_repr(self) -> str:
        static = "static" if self.input_scale is not None else "dynamic per-token"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={static}"


class W8A16Linear(nn.Module):
    """Weight-only int8: int8 weights [N, K] with float32 per-channel scales [N], activations left in 16/32-bit. calq
    has no Triton kernel for it: forward dequantizes the weight (q * scale) and runs torch's matmul."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> W8A16Linear:
        """From one layer's pack-quantized tensors (weight_packed: 4 int8 values per int32, weight_scale, [bias])."""
        out_features, in_features = (int(n) for n in tensors["weight_shape"])
        bias = tensors.get("bias")
        return cls(unpack_int8(tensors["weight_packed"], in_features), tensors["weight_scale"].float().reshape(-1),
                   None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(x.dtype)
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, 16-bit activations"


class GroupWeightLinear(nn.Module):
    """Weight-only integers of a width the Triton kernels do not run (5 bits): unsigned values q [N, K] (0..2^bits - 1,
    as compressed-tensors stores them), float32 scales and unsigned zero points per group of inputs [N, K/G] (2^(bits
    - 1) when symmetric). calq has no kernel for them: forward dequantizes, (q - zero) * scale, and runs torch's
    matmul, so it computes what the checkpoint holds, at float speed."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size, self.bits = group_size, bits
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                        dtype: torch.dtype) -> GroupWeightLinear:
        """From one layer's pack-quantized tensors (weight_packed, weight_scale, [weight_zero_point], [bias]): values
        packed densely along K, zero points along N, each stored as value + 2^(bits - 1)."""
        n, k = (int(size) for size in tensors["weight_shape"])
        scales = tensors["weight_scale"].float().reshape(n, -1)
        packed_zeros, bias = tensors.get("weight_zero_point"), tensors.get("bias")
        zeros = (torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=scales.device)
                 if packed_zeros is None else unpack_bits(packed_zeros.t().contiguous(), bits, n).t().contiguous())
        return cls(unpack_bits(tensors["weight_packed"], bits, k), scales, zeros, group_size, bits,
                   None if bias is None else bias.to(dtype))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        zeros = self.zeros.repeat_interleave(self.group_size, 1).float()
        return (self.q.float() - zeros) * self.scales.repeat_interleave(self.group_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"{self.bits}-bit weights dequantized (no kernel)")


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned `bits`-wide values (uint8) from compressed-tensors' dense pack-quantized int32 words along the last
    dim: value i holds bits [i * bits, (i + 1) * bits) of the words read as one little-endian bit stream."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, device=packed.device) * bits
    word, offset = start // 32, start % 32
    following = (word + 1).clamp(max=words.shape[-1] - 1)  # a value that crosses into the next word
    pair = words[..., word] | (words[..., following] << 32)
    return ((pair >> offset) & ((1 << bits) - 1)).to(torch.uint8)


def unpack_int8(packed: torch.Tensor, count: int) -> torch.Tensor:
    """int8 values from compressed-tensors' pack-quantized int32 words (4 per word, low byte first, each stored as
    value + 128) along the last dim."""
    return (unpack_bits(packed, 8, count).to(torch.int16) - 128).to(torch.int8)


def load_quantized(folder: str | Path, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A transformers causal LM (eval mode) from a compressed-tensors checkpoint saved by calq, its quantized
    Linear layers running the Triton kernels on `device`; every other tensor is cast to `dtype`.
    On the CPU the kernels run only through Triton's interpreter (TRITON_INTERPRET=1), which is for tests."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder, device = Path(folder), torch.device(device)
    qconfig = _quantization_config(folder)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config  # or transformers would hand the model to compressed-tensors
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(f), "pt", device=str(device))) for f in _weight_files(folder)]
        by_module: dict[str, dict] = defaultdict(dict)
        for file in files:
            for key in file.keys():
                module, _, leaf = key.rpartition(".")
                by_module[module][leaf] = file

        def tensors_of(module: str) -> dict[str, torch.Tensor]:
            return {leaf: file.get_tensor(f"{module}.{leaf}") for leaf, file in by_module.pop(module, {}).items()}

        for name, module in list(model.named_modules()):
            scheme = _scheme_for(name, module, qconfig) if isinstance(module, nn.Linear) else None
            if scheme is not None:
                model.set_submodule(name, _kernel_linear(name, tensors_of(name), scheme, dtype, folder))
        rest = {f"{m}.{leaf}": t for m in list(by_module) for leaf, t in tensors_of(m).items()}

    rest = {k: t.to(dtype) if t.is_floating_point() else t for k, t in rest.items()}
    unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise CalqError(f"the checkpoint has tensors the model does not: {', '.join(unexpected[:5])}", str(folder),
                        "check that config.json and the safetensors files belong to the same save")
    model.tie_weights()
    model.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CalqError(f"no weights in the checkpoint for: {', '.join(left[:5])}", str(folder),
                        "save the model again with save_pretrained(..., save_compressed=True)")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval().requires_grad_(False)


def _quantization_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CalqError(f"no config.json in {folder}", str(folder), "give a folder written by save_pretrained")
    qc = json.loads(config_file.read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise CalqError("config.json has no compressed-tensors quantization_config", str(config_file),
                        "give a checkpoint saved with save_pretrained(..., save_compressed=True) after quantization")
    if qc.get("quantization_status") != "compressed":
        raise CalqError(f"quantization_status is '{qc.get('quantization_status')}', not 'compressed'", str(config_file),
                        "save the model with save_pretrained(..., save_compressed=True)")
    return qc


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise CalqError(f"no safetensors weights in {folder}", str(folder), "save the model with save_pretrained")


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' rule: a 're:' regex matched against the module name, an exact name, or a class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def _scheme_for(name: str, module: nn.Module, qc: dict) -> dict | None:
    """The config group that quantizes this Linear layer (with its format), or None when it stays unquantized. When
    several groups match, compressed-tensors' precedence: an exact name, then a regex, then a class name."""
    if any(_matches(name, module, ignored) for ignored in qc.get("ignore") or []):
        return None
    matches = [(0 if target == name else 1 if target.startswith("re:") else 2, group_name)
               for group_name, group in (qc.get("config_groups") or {}).items()
               for target in group.get("targets", []) if _matches(name, module, target)]
    if not matches:
        return None
    group_name = min(matches, key=lambda match: match[0])[1]
    group = qc["config_groups"][group_name]
    return {"name": group_name, "format": group.get("format") or qc.get("format"), **group}


def _kernel_linear(name: str, tensors: dict[str, torch.Tensor], scheme: dict, dtype: torch.dtype,
                   folder: Path) -> nn.Module:
    weights, acts = scheme.get("weights") or {}, scheme.get("input_activations")
    where = f"{folder / 'config.json'}: config_groups.{scheme['name']}"
    if _is_w4a16(scheme["format"], weights, acts):
        if "weight_packed" not in tensors:
            raise CalqError(f"layer {name} has no weight_packed tensor", str(folder), "check the checkpoint files")
        in_features = int(tensors["weight_shape"][1])
        group_size = weights["group_size"] if weights["strategy"] == "group" else in_features
        return W4A16Linear.from_checkpoint(tensors, group_size, dtype)
    if _is_w8a16(scheme["format"], weights, acts):
        if "weight_packed" not in tensors:
            raise CalqError(f"layer {name} has no weight_packed tensor", str(folder), "check the checkpoint files")
        return W8A16Linear.from_checkpoint(tensors, dtype)
    if _is_group_weights(scheme["format"], weights, acts):
        if "weight_packed" not in tensors:
            raise CalqError(f"layer {name} has no weight_packed tensor", str(folder), "check the checkpoint files")
        in_features = int(tensors["weight_shape"][1])
        group_size = weights["group_size"] if weights["strategy"] == "group" else in_features
        return GroupWeightLinear.from_checkpoint(tensors, weights["num_bits"], group_size, dtype)
    if _is_w8a8(scheme["format"], weights, acts):
        if "weight" not in tensors or tensors["weight"].dtype != torch.int8:
            raise CalqError(f"layer {name} has no int8 weight tensor", str(folder), "check the checkpoint files")
        return W8A8Linear.from_checkpoint(tensors, dtype)
    raise CalqError(f"unsupported quantization scheme (format {scheme['format']}, weights {weights}, "
                    f"input_activations {acts})", where,
                    "the kernels run pack-quantized int4 group/channel weights with 16-bit activations, "
                    "pack-quantized symmetric int8 per-channel weights with 16-bit activations, other pack-quantized "
                    "widths (5 bits) dequantized, and "
                    "int-quantized symmetric int8 per-channel weights with symmetric int8 per-token dynamic "
                    "or per-tensor static activations")


def _is_w4a16(fmt: str, w: dict, a: dict | None) -> bool:
    return _is_group_weights(fmt, w, a) and w.get("num_bits") == 4


def _is_group_weights(fmt: str, w: dict, a: dict | None) -> bool:
    # GPTQ's actorder static (alias weight) only changes the order it rounds columns in: groups stay contiguous;
    # actorder group needs a per-column group index (weight_g_idx), which the kernels do not read
    return (fmt == "pack-quantized" and a is None and w.get("type") == "int" and 2 <= (w.get("num_bits") or 0) <= 8
            and w.get("strategy") in ("group", "channel") and w.get("actorder") in (None, "static", "weight")
            and not w.get("dynamic"))


def _is_w8a16(fmt: str, w: dict, a: dict | None) -> bool:
    return (fmt == "pack-quantized" and a is None and w.get("type") == "int" and w.get("num_bits") == 8
            and w.get("strategy") == "channel" and w.get("symmetric") and not w.get("dynamic"))


def _is_w8a8(fmt: str, w: dict, a: dict | None) -> bool:
    if fmt != "int-quantized" or a is None:
        return False
    weights_ok = (w.get("type") == "int" and w.get("num_bits") == 8 and w.get("strategy") == "channel"
                  and w.get("symmetric") and not w.get("dynamic"))
    acts_ok = (a.get("type") == "int" and a.get("num_bits") == 8 and a.get("symmetric")
               and (a.get("strategy"), bool(a.get("dynamic"))) in (("token", True), ("tensor", False)))
    return weights_ok and acts_ok
