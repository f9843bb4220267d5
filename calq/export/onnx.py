"""ONNX for ONNX Runtime: the full-sequence scoring graph, the calibrator fused, calq's own integers.

Route: the variant's float model (each quantized Linear holding its dequantized weight) and the calibrator are
traced as one module by `torch.onnx.export(dynamo=True)` without graph optimization, so every Linear is still
`MatMul(x, Transpose(weight))` with the weight named after the layer. Each quantized layer's pair is then replaced:
- W4A16 -> com.microsoft MatMulNBits (bits 4): calq's unsigned int4 values, group scales and zero points as they
  are (compressed-tensors stores q + 8 and z + 8; (q + 8) - (z + 8) = q - z, so nothing is re-derived). The block
  is the largest power of two (16..128) dividing the group; a larger group repeats its scale and zero point over
  its blocks, which is exact. Its `accuracy_level` is the export option of that name (recipe
  `export.onnx_accuracy_level`): 0 (default) computes with float32 activations, as in PyTorch; 4 lets ONNX Runtime
  quantize the activations to int8 per block and multiply in int8 (faster on CPUs, as llama.cpp's kernels do; the
  re-verification measures what it changes); 1, 2, 3: float32, float16, bfloat16 compute where the CPU has it.
  MatMulNBits takes its scales in the activations' type (float32). The export option `scale_dtype` (recipe
  `export.onnx_scale_dtype`): float32 (default) stores calq's scales as they are; float16 stores them as GGUF's
  blocks do (2 bytes a group instead of 4: 4.5 bits per weight at groups of 32 instead of 5, the size calq's budget
  counts), cast to float32 in the graph (ONNX Runtime folds the Cast when it loads the graph); the re-verification
  measures the rounding.
- 5-bit groups (`bits: 5`) -> MatMulNBits bits 8: ONNX Runtime 1.32's CPU kernel runs bits 2, 4 and 8 only ("Only
  2b, 4b and 8b quantization is supported"), so each unsigned 5-bit value is stored in a byte as q + 112 (zero point
  z + 112; 128, the 8-bit default, when symmetric): exact, but 8 bits per weight in the file instead of 5.
- W8A16 (the int8 layers of a mixed checkpoint, `int8_layers`) -> MatMulNBits bits 8: calq's int8 values + 128 and
  channel scales, exact; the same `accuracy_level`.
- An int8 / int4 embedding / head (`embedding: int8 | int4`) -> its integers (int4: two to a byte) and float16 block
  scales (Q8_0's / Q4_0's layout) as initializers, dequantized in the graph (Cast, Mul, Reshape; inserted after the
  optimizer, which would fold them back into a float32 matrix) for the Gather and the output MatMul that share it.
- W8A8 -> int8 weights in MatMulInteger (int8 x int8 -> int32), the activations quantized in the graph the way
  compressed-tensors does it: per token, scale = max|x| / 127.5 (dynamic), or calq's static per-tensor input
  scale; round half to even, clip to [-128, 127]; then the int32 sums times activation scale times channel scale.
  (onnxruntime's DynamicQuantizeLinear is per-tensor uint8, which is not calq's scheme.)
Two graphs in one folder, with the same quantized layers:
- model.onnx scores whole sequences: input_ids [B, T] -> `logits` (calibrated: logits / T, or the ATS head on the
  last hidden state) and `raw_logits`, both [B, T, V].
- decode.onnx generates with a KV cache (transformers' DynamicCache, built from flat tensors inside the traced
  wrapper): input_ids [B, S], attention_mask [B, P + S], position_ids [B, S], past_key_values.<i>.key/value
  [B, H_kv, P, D] -> `logits` [B, S, V] and present.<i>.key/value [B, H_kv, P + S, D]. Prefill passes an empty cache
  (P = 0), then one token per call. Its `logits` carry only the global temperature (logits / T): the ATS head
  attends over every earlier hidden state and has no cache of its own, so with an ATS calibrator decode.onnx gives
  the raw logits and calibrated scoring is model.onnx's. Its weights point into model.onnx.data (no second copy).
`OnnxExporter.verify_generation` checks the decode graph: greedy tokens against the PyTorch variant's, and every
decode step's logits against model.onnx's on the same sequence.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calq import isolation
from calq.errors import CalqError
from calq.export import variant as variants
from calq.export.base import (
    INFO_FILE,
    Exporter,
    FusedScoring,
    calibrator_kind,
    directory_size,
    generation_check,
    greedy_reference,
    register,
    require,
    write_info,
)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DYNAMIC_ROPE_TYPES = ("longrope", "dynamic")  # transformers' dynamic_rope_update: frequencies from the length
DECODE_FILE = "decode.onnx"
DECODE_DATA_FILE = "decode.onnx.data"
MAX_BLOCK = 128
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' compute type: unset (float32), float32, float16, bfloat16, int8
SCALE_DTYPES = ("float32", "float16")  # MatMulNBits' scales as stored in the file


class _Decode(nn.Module):
    """(input_ids [B, S], attention_mask [B, P + S], position_ids [B, S], past keys and values [B, H_kv, P, D], two per
    layer) -> (logits [B, S, V] divided by the temperature if any, present keys and values [B, H_kv, P + S, D])."""

    def __init__(self, model: nn.Module, temperature: float | None):
        super().__init__()
        self.model = model  # the attribute name FusedScoring uses: the initializers get the same names in both graphs
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        logits = out.logits if self.temperature is None else out.logits / self.temperature
        return logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers causal LM config."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def past_names(layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def block_size(group_size: int) -> int:
    """The MatMulNBits block for a group: the largest power of two <= MAX_BLOCK dividing it (0: none >= 16)."""
    block = MAX_BLOCK
    while block >= 16 and group_size % block:
        block //= 2
    return block if block >= 16 else 0


class _Graph:
    """Node and initializer edits on an onnx GraphProto."""

    def __init__(self, graph):
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def linear(self, weight: str) -> tuple:
        """(Transpose node, MatMul node) of the Linear layer whose weight initializer is `weight`."""
        users = self.consumers.get(weight, [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            raise CalqError(f"the traced graph does not use {weight} as MatMul(x, Transpose(weight))", "export.onnx",
                            "report this: the torch.onnx exporter's output changed")
        transpose = users[0]
        matmuls = self.consumers.get(transpose.output[0], [])
        if len(matmuls) != 1 or matmuls[0].op_type != "MatMul":
            raise CalqError(f"{weight} feeds {[n.op_type for n in matmuls]}, not one MatMul", "export.onnx",
                            "report this: the torch.onnx exporter's output changed")
        return transpose, matmuls[0]

    def replace(self, weight: str, nodes: list) -> None:
        """Put `nodes` (which write the old MatMul's output) where the Linear's Transpose and MatMul were."""
        transpose, matmul = self.linear(weight)
        position = list(self.graph.node).index(matmul)
        for node in (matmul, transpose):
            self.graph.node.remove(node)
        position -= 1  # the transpose came before the matmul
        for offset, node in enumerate(nodes):
            self.graph.node.insert(position + offset, node)
        self.graph.initializer.remove(self.initializers.pop(weight))


def _group_nodes(g: _Graph, prefix: str, x: str, y: str, layer: variants.GroupLayer, accuracy_level: int) -> list:
    """4-bit groups as MatMulNBits bits 4; 5-bit ones as bits 8, each value shifted so that the symmetric zero point is
    the 8-bit default 128 (module docstring)."""
    from onnx import helper

    n, k = layer.q.shape
    block = block_size(layer.group_size)
    repeat = layer.group_size // block
    blocks = k // block
    scales = np.repeat(layer.scale.numpy().astype(np.float32), repeat, axis=1)
    zeros = np.repeat(layer.zero.numpy(), repeat, axis=1)
    if layer.bits == 4:
        q = layer.q.numpy().reshape(n, blocks, block // 2, 2)
        packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)  # element 2i in the low nibble, 2i + 1 in the high
        zeros = np.pad(zeros, ((0, 0), (0, blocks % 2)), constant_values=8).reshape(n, -1, 2)
        zeros = (zeros[..., 0] | (zeros[..., 1] << 4)).astype(np.uint8)
        bits = 4
    else:
        shift = 128 - (1 << (layer.bits - 1))
        packed = (layer.q.numpy().astype(np.int16) + shift).astype(np.uint8).reshape(n, blocks, block)
        zeros = (zeros.astype(np.int16) + shift).astype(np.uint8)
        bits = 8
    inputs = [x, g.constant(f"{prefix}.qweight", packed), g.constant(f"{prefix}.scales", scales)]
    if not layer.symmetric:  # MatMulNBits' default zero point (8 or 128) is calq's symmetric one
        inputs.append(g.constant(f"{prefix}.zeros", zeros))
    return [helper.make_node("MatMulNBits", inputs, [y], name=f"{prefix}.MatMulNBits", domain="com.microsoft",
                             K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)]


def _int8_weight_nodes(g: _Graph, prefix: str, x: str, y: str, layer: variants.Int8WeightLayer,
                       accuracy_level: int) -> list:
    """W8A16 as MatMulNBits bits 8 (ONNX Runtime 1.32 runs it on the CPU): calq's int8 values stored as q + 128
    (MatMulNBits' default zero point for 8 bits is 128), the channel scale repeated over the row's blocks: exact."""
    from onnx import helper

    n, k = layer.q.shape
    block = block_size(k)
    if not block:
        raise CalqError(f"{prefix}: input width {k} has no MatMulNBits block (a power of two >= 16 dividing it)",
                        "export.onnx", "keep this layer at int4 (remove it from int8_layers) or export to gguf")
    unsigned = (layer.q.numpy().astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)
    scales = np.repeat(layer.scale.numpy().astype(np.float32)[:, None], k // block, axis=1)
    inputs = [x, g.constant(f"{prefix}.qweight", unsigned), g.constant(f"{prefix}.scales", scales)]
    return [helper.make_node("MatMulNBits", inputs, [y], name=f"{prefix}.MatMulNBits", domain="com.microsoft",
                             K=k, N=n, bits=8, block_size=block, accuracy_level=accuracy_level)]


def _matrix_nodes(g: _Graph, weight: str, matrix: variants.BlockMatrix) -> list:
    """The int8 / int4 embedding / head (Q8_0 / Q4_0 layout) in place of its float initializer: its integers and
    float16 block scales stored, dequantized in the graph (q * d, exact in float32) for the Gather and the output
    MatMul that read it. int4 values are stored two to a byte (q + 8: weight j of a block in the low nibble of byte j,
    weight j + 16 in the high one, Q4_0's order) and unpacked with float arithmetic (high = floor(byte / 16),
    low = byte - 16 * high: exact)."""
    from onnx import TensorProto, helper

    rows, width = matrix.q.shape
    d = g.constant(f"{weight}.d", matrix.d.numpy().reshape(rows, width // 32, 1))
    shape = g.constant(f"{weight}.shape", np.array([rows, width], dtype=np.int64))
    g.graph.initializer.remove(g.initializers.pop(weight))
    if matrix.bits == 8:
        q = g.constant(f"{weight}.q8", matrix.q.numpy().reshape(rows, width // 32, 32))
        values = [helper.make_node("Cast", [q], [f"{weight}.qf"], to=TensorProto.FLOAT)]
    else:
        packed = g.constant(f"{weight}.q4", variants.nibbles((matrix.q.numpy() + 8).astype(np.uint8)))
        c = {name: g.constant(f"{weight}.{name}", np.array(value, dtype=np.float32))
             for name, value in {"sixteen": 16.0, "eight": 8.0}.items()}
        values = [helper.make_node("Cast", [packed], [f"{weight}.bytes"], to=TensorProto.FLOAT),
                  helper.make_node("Div", [f"{weight}.bytes", c["sixteen"]], [f"{weight}.div"]),
                  helper.make_node("Floor", [f"{weight}.div"], [f"{weight}.high"]),
                  helper.make_node("Mul", [f"{weight}.high", c["sixteen"]], [f"{weight}.high16"]),
                  helper.make_node("Sub", [f"{weight}.bytes", f"{weight}.high16"], [f"{weight}.low"]),
                  helper.make_node("Concat", [f"{weight}.low", f"{weight}.high"], [f"{weight}.unsigned"], axis=-1),
                  helper.make_node("Sub", [f"{weight}.unsigned", c["eight"]], [f"{weight}.qf"])]
    return [*values,
            helper.make_node("Cast", [d], [f"{weight}.df"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{weight}.qf", f"{weight}.df"], [f"{weight}.blocks"]),
            helper.make_node("Reshape", [f"{weight}.blocks", shape], [weight])]


def _initializer_of(g: _Graph, model: nn.Module, parameter: str) -> str:
    """The graph's initializer for a model parameter: a tied matrix is traced once, under any of its names."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    names = [f"model.{name}" for name, tensor in tensors.items() if tensor is tensors[parameter]]
    found = next((name for name in names if name in g.initializers), None)
    if found is None:
        raise CalqError(f"the traced graph has no initializer for {parameter}", "export.onnx",
                        "report this: the torch.onnx exporter's output changed")
    return found


def _int8_nodes(g: _Graph, prefix: str, x: str, y: str, layer: variants.Int8Layer) -> list:
    from onnx import TensorProto, helper

    def out(name: str) -> str:
        return f"{prefix}.{name}"

    c = {name: g.constant(out(name), np.array(value, dtype=np.float32))
         for name, value in {"lo": -128.0, "hi": 127.0, "one": 1.0, "zero": 0.0, "qmax": 127.5}.items()}
    nodes = []
    if layer.input_scale is None:
        axes = g.constant(out("axes"), np.array([-1], dtype=np.int64))
        nodes += [helper.make_node("Abs", [x], [out("abs")]),
                  helper.make_node("ReduceMax", [out("abs"), axes], [out("absmax")], keepdims=1),
                  helper.make_node("Div", [out("absmax"), c["qmax"]], [out("raw_scale")]),
                  helper.make_node("Equal", [out("raw_scale"), c["zero"]], [out("is_zero")]),
                  helper.make_node("Where", [out("is_zero"), c["one"], out("raw_scale")], [out("x_scale")])]
        x_scale = out("x_scale")
    else:
        x_scale = g.constant(out("x_scale"), np.array(layer.input_scale, dtype=np.float32))
    weight = g.constant(out("qweight"), layer.q.numpy().T.copy())  # [K, N] int8
    w_scale = g.constant(out("w_scale"), layer.scale.numpy().astype(np.float32))
    nodes += [helper.make_node("Div", [x, x_scale], [out("x_div")]),
              helper.make_node("Round", [out("x_div")], [out("x_round")]),  # half to even, as torch.round
              helper.make_node("Clip", [out("x_round"), c["lo"], c["hi"]], [out("x_clip")]),
              helper.make_node("Cast", [out("x_clip")], [out("x_q")], to=TensorProto.INT8),
              helper.make_node("MatMulInteger", [out("x_q"), weight], [out("acc")]),
              helper.make_node("Cast", [out("acc")], [out("acc_f")], to=TensorProto.FLOAT),
              helper.make_node("Mul", [x_scale, w_scale], [out("scale")]),
              helper.make_node("Mul", [out("acc_f"), out("scale")], [y])]
    return nodes


@register
class OnnxExporter(Exporter):
    name = "onnx"
    packages = ("onnx", "onnxscript")
    runtime = "onnxruntime"
    runtime_name = "ONNX Runtime"
    crash_fix = isolation.ONNXRUNTIME_FIX

    def check(self, checkpoint_dir, calibrator=None) -> None:
        super().check(checkpoint_dir, calibrator)
        from transformers import AutoConfig

        self.check_config(AutoConfig.from_pretrained(checkpoint_dir).get_text_config(),
                          f"{checkpoint_dir}/config.json")
        qc = variants.quantization_config(checkpoint_dir) or {}
        for group_name, group in (qc.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            size = weights.get("group_size")
            if weights.get("num_bits") in (4, 5) and weights.get("strategy") == "group" and not block_size(size or 0):
                raise CalqError(f"group size {size} has no MatMulNBits block (a power of two >= 16 dividing it)",
                                f"{checkpoint_dir}/config.json: config_groups.{group_name}",
                                "quantize with group_size 32, 64 or 128")

    def check_config(self, config, where: str) -> None:
        """transformers' dynamic RoPE types choose their frequencies from the sequence length at run time (LongRoPE:
        the long factors past original_max_position_embeddings); torch.export cannot trace that choice."""
        rope = getattr(config, "rope_parameters", None) or {}
        for params in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
            if params.get("rope_type") in DYNAMIC_ROPE_TYPES:
                raise CalqError(f"the ONNX graph cannot hold this model's '{params['rope_type']}' rope: transformers "
                                "chooses its frequencies from the sequence length at run time, which torch.onnx "
                                "cannot trace", where, "export it to gguf")

    def options(self, recipe) -> dict:
        return {"accuracy_level": recipe.export.onnx_accuracy_level, "scale_dtype": recipe.export.onnx_scale_dtype}

    def export(self, checkpoint_dir, out_dir, calibrator=None, accuracy_level: int = 0,
               scale_dtype: str = "float32") -> dict:
        """`accuracy_level`: MatMulNBits' (module docstring); 4 computes the int4 products with int8 activations.
        `scale_dtype`: float16 stores MatMulNBits' scales in half the bytes (module docstring)."""
        if accuracy_level not in ACCURACY_LEVELS:
            raise CalqError(f"accuracy_level {accuracy_level} is not one of {', '.join(map(str, ACCURACY_LEVELS))}",
                            "export.onnx_accuracy_level", "use 0 (float32 activations) or 4 (int8 activations)")
        if scale_dtype not in SCALE_DTYPES:
            raise CalqError(f"scale_dtype {scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}",
                            "export.onnx_scale_dtype", "use float32 (calq's scales) or float16 (GGUF's size)")
        self.check(checkpoint_dir, calibrator)
        start = time.perf_counter()
        variant = variants.read(checkpoint_dir)
        config = variant.model.config
        vocab = config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(0)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (MODEL_FILE, DATA_FILE, DECODE_FILE, DECODE_DATA_FILE):
            (out_dir / stale).unlink(missing_ok=True)

        example = torch.randint(0, vocab, (2, 16), generator=generator)
        proto, blocks = self._quantized_graph(
            FusedScoring(variant.model, calibrator, with_raw=True), (example,), variant, input_names=["input_ids"],
            output_names=["logits", "raw_logits"], dynamic_shapes=({0: "batch", 1: "sequence"},),
            accuracy_level=accuracy_level, scale_dtype=scale_dtype)
        _save(proto, out_dir, MODEL_FILE, DATA_FILE)
        scoring_seconds = time.perf_counter() - start

        # Example sizes all different and above 1, so torch.export keeps every dimension symbolic; an empty past
        # (prefill) runs on the exported graph too.
        layers, kv_heads, head_dim = cache_shape(config)
        batch, new, past = 2, 3, 5
        example = (torch.randint(0, vocab, (batch, new), generator=generator),
                   torch.ones(batch, past + new, dtype=torch.long),
                   torch.arange(past, past + new).expand(batch, -1),
                   [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * layers)])
        temperature = getattr(calibrator, "temperature", None) if calibrator_kind(calibrator) == "temperature" \
            else None
        proto, _ = self._quantized_graph(
            _Decode(variant.model, temperature), example, variant,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(layers)],
            output_names=["logits", *past_names(layers, "present")],
            dynamic_shapes=({0: "batch", 1: "sequence"}, {0: "batch", 1: "total_sequence"},
                            {0: "batch", 1: "sequence"}, [{0: "batch", 2: "past_sequence"}] * (2 * layers)),
            accuracy_level=accuracy_level, scale_dtype=scale_dtype)
        shared = _point_at_stored(proto, out_dir, MODEL_FILE)
        _save(proto, out_dir, DECODE_FILE, DECODE_DATA_FILE)
        kind = calibrator_kind(calibrator)
        decode_logits = "raw / temperature" if kind == "temperature" else "raw"
        return write_info(out_dir, {
            "format": self.name, "scheme": variant.scheme, "calibrator": kind,
            "files": [name for name in (MODEL_FILE, DATA_FILE, DECODE_FILE, DECODE_DATA_FILE)
                      if (out_dir / name).is_file()],
            "bytes": directory_size(out_dir), "seconds": time.perf_counter() - start,
            "seconds_scoring_graph": scoring_seconds, "outputs": ["logits", "raw_logits"],
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "accuracy_level": accuracy_level, "scale_dtype": scale_dtype,
            "changes": _changes(variant, blocks, calibrator, accuracy_level, scale_dtype),
            "decode_graph": {
                "file": DECODE_FILE, "logits": decode_logits, "weights_shared_with_model_onnx": shared,
                "cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "float32"},
                "note": _decode_note(kind)}})

    def _quantized_graph(self, module: nn.Module, args: tuple, variant: variants.Variant, accuracy_level: int,
                         scale_dtype: str, **names) -> tuple:
        """`module` traced by torch.onnx (dynamo), each quantized Linear's MatMul replaced by calq's integers, then
        optimized by onnxscript: (ModelProto, MatMulNBits block sizes used)."""
        import onnx
        import onnxscript

        program = torch.onnx.export(module.eval(), args, dynamo=True, optimize=False, verbose=False, **names)
        proto = program.model_proto
        graph = _Graph(proto.graph)
        blocks = set()
        for name, layer in variant.layers.items():
            weight = f"model.{name}.weight"
            _, matmul = graph.linear(weight)
            x, y = matmul.input[0], matmul.output[0]
            if isinstance(layer, variants.GroupLayer):
                blocks.add(block_size(layer.group_size))
                nodes = _group_nodes(graph, weight, x, y, layer, accuracy_level)
            elif isinstance(layer, variants.Int8WeightLayer):
                nodes = _int8_weight_nodes(graph, weight, x, y, layer, accuracy_level)
            else:
                nodes = _int8_nodes(graph, weight, x, y, layer)
            graph.replace(weight, nodes)
        if variant.layers:
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        proto = onnxscript.optimizer.optimize(proto)
        for node in proto.graph.node:  # torch.onnx's trace-back to the PyTorch source: about 1.5 kB a node
            del node.metadata_props[:]
        if scale_dtype == "float16":  # after the optimizer, which would fold the Cast back into float32 scales
            _float16_scales(proto)
        if variant.matrices:  # after the optimizer, which would fold the dequantization back into a float32 matrix
            graph = _Graph(proto.graph)
            for name, matrix in variant.matrices.items():
                for offset, node in enumerate(_matrix_nodes(graph, _initializer_of(graph, variant.model, name),
                                                               matrix)):
                    proto.graph.node.insert(offset, node)
            shapes = {tuple(m.q.shape) for m in variant.matrices.values()}
            left = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                    and (tuple(i.dims) in shapes or tuple(i.dims)[::-1] in shapes)]
            if left:
                raise CalqError(f"the optimized graph keeps a float copy of the quantized embedding/head ({left[0]})",
                                "export.onnx", "report this: the onnxscript optimizer's output changed")
        return proto, blocks

    def session(self, out_dir, threads: int = 1) -> OnnxSession:
        return OnnxSession(Path(out_dir) / MODEL_FILE, threads)

    def decoder(self, out_dir, threads: int = 1) -> OnnxDecoder:
        return OnnxDecoder(Path(out_dir) / DECODE_FILE, threads)

    @torch.no_grad()
    def verify_generation(self, out_dir, reference_logits, prompt: torch.Tensor, new_tokens: int,
                          threads: int = 1) -> dict:
        """decode.onnx against the PyTorch reference and against model.onnx: greedy generation of `new_tokens` after
        `prompt` (token ids [T]) on ONNX Runtime vs greedy tokens from `reference_logits` (input_ids [B, T] -> logits
        [B, T, V], recomputed over the whole sequence each step), and the logits of every prefill and decode step vs
        model.onnx's on the same sequence (its `logits`, or `raw_logits` when decode.onnx carries no calibrator)."""
        out_dir = Path(out_dir)
        decode_logits = json.loads((out_dir / INFO_FILE).read_text())["decode_graph"]["logits"]
        with self.isolated(self.decoder, out_dir, threads) as decoder:
            tokens, step_logits, seconds = decoder.generate(prompt, new_tokens)
        with self.isolated(self.session, out_dir, threads) as session:
            calibrated, raw = session.run(torch.cat([prompt, tokens[:-1]])[None])
        full = raw[0] if decode_logits == "raw" else calibrated[0]
        return generation_check(tokens, greedy_reference(reference_logits, prompt, new_tokens), decode_logits,
                                step_logits, full, seconds, threads)


def _save(proto, out_dir: Path, model_file: str, data_file: str) -> None:
    import onnx

    onnx.save_model(proto, str(out_dir / model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)


def _float16_scales(proto) -> None:
    """Each MatMulNBits' scales stored as float16 and cast to float32 in front of it (ONNX Runtime folds the Cast
    into a float32 initializer when it loads the graph, before MatMulNBits packs its weights)."""
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(proto.graph)
    casts = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or node.input[2] not in g.initializers:
            continue
        stored = g.initializers.pop(node.input[2])
        g.graph.initializer.remove(stored)
        half = g.constant(f"{stored.name}.float16", numpy_helper.to_array(stored).astype(np.float16))
        casts.append(helper.make_node("Cast", [half], [stored.name], to=TensorProto.FLOAT))
    for offset, cast in enumerate(casts):
        proto.graph.node.insert(offset, cast)


def _point_at_stored(proto, out_dir: Path, model_file: str) -> int:
    """Point each initializer of `proto` whose type, shape and bytes equal a tensor stored in `model_file`'s external
    data at that data (decode.onnx reads model.onnx.data instead of holding a second copy of the weights). Matched by
    content: the optimizer names the folded (transposed) weights differently in each graph. Returns the count."""
    import hashlib

    from onnx import TensorProto, load_model
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    def key(tensor, data: bytes) -> tuple:
        return tensor.data_type, tuple(tensor.dims), hashlib.blake2b(data).digest()

    stored = {}
    for reference in load_model(str(out_dir / model_file), load_external_data=False).graph.initializer:
        if uses_external_data(reference):
            info = ExternalDataInfo(reference)
            with open(out_dir / info.location, "rb") as data:
                data.seek(info.offset or 0)
                stored[key(reference, data.read(info.length))] = reference
    shared = 0
    for init in proto.graph.initializer:
        reference = stored.get(key(init, init.raw_data)) if init.HasField("raw_data") else None
        if reference is not None:
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.extend(reference.external_data)
            shared += 1
    return shared


def _decode_note(kind: str) -> str:
    if kind == "ats":
        return ("decode.onnx gives the raw logits: the ATS head attends over every earlier hidden state and has no "
                "KV cache of its own; calibrated scores come from model.onnx")
    if kind == "temperature":
        return "decode.onnx's logits are divided by the global temperature (the whole calibrator)"
    return "decode.onnx gives the model's logits (no calibrator)"


class OnnxSession:
    def __init__(self, path: Path, threads: int = 1):
        ort = require("onnxruntime", "onnx")
        if not path.is_file():
            raise CalqError(f"no ONNX model at {path}", str(path), "export the variant first")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated logits, raw logits)."""
        calibrated, raw = self.session.run(["logits", "raw_logits"], {"input_ids": input_ids.numpy().astype(np.int64)})
        return torch.from_numpy(calibrated), torch.from_numpy(raw)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], {"input_ids": input_ids.numpy().astype(np.int64)})[0])


class OnnxDecoder:
    """decode.onnx in ONNX Runtime: one prefill call with an empty cache, then one token per call."""

    def __init__(self, path: Path, threads: int = 1):
        ort = require("onnxruntime", "onnx")
        if not path.is_file():
            raise CalqError(f"no ONNX decode graph at {path}", str(path), "export the variant again with this calq")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [name.replace("past_key_values", "present") for name in (i.name for i in self.past)]

    def step(self, input_ids: np.ndarray, cache: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids [B, S] after `cache` (None: empty) -> (logits [B, S, V], the cache extended by S positions)."""
        batch, new = input_ids.shape
        if cache is None:
            cache = [np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past]
        past = cache[0].shape[2]
        feeds = {"input_ids": input_ids.astype(np.int64),
                 "attention_mask": np.ones((batch, past + new), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + new, dtype=np.int64), (batch, new)).copy()}
        feeds.update({i.name: tensor for i, tensor in zip(self.past, cache)})
        logits, *present = self.session.run(["logits", *self.present], feeds)
        return logits, present

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Greedy: (new token ids [new_tokens], logits of every position fed [T + new_tokens - 1, V], the seconds of
        the prefill and of the decode steps)."""
        start = time.perf_counter()
        logits, cache = self.step(prompt.numpy()[None], None)
        seconds = {"prefill": time.perf_counter() - start}
        rows, tokens = [logits[0]], []
        for i in range(new_tokens):
            tokens.append(int(rows[-1][-1].argmax()))
            if i + 1 < new_tokens:
                logits, cache = self.step(np.array([[tokens[-1]]]), cache)
                rows.append(logits[0])
        seconds["decode"] = time.perf_counter() - start - seconds["prefill"]
        return torch.tensor(tokens), torch.from_numpy(np.concatenate(rows)), seconds


COMPUTE = {0: " (float32 activations, as PyTorch)", 1: " (float32 activations, as PyTorch)",
           2: ": float16 compute where the CPU has it", 3: ": bfloat16 compute where the CPU has it",
           4: ": int8 compute, ONNX Runtime quantizing the activations to int8 per block where its CPU kernels can, "
              "as llama.cpp's 8-bit activations do (faster; the re-verification measures what it changes)"}


def _changes(variant: variants.Variant, blocks: set[int], calibrator, accuracy_level: int,
             scale_dtype: str = "float32") -> list[str]:
    changes = []
    grouped = [layer for layer in variant.layers.values() if isinstance(layer, variants.GroupLayer)]
    int4 = [layer for layer in grouped if layer.bits == 4]
    int5 = [layer for layer in grouped if layer.bits == 5]
    int8 = [layer for layer in variant.layers.values() if isinstance(layer, variants.Int8Layer)]
    groups = sorted({layer.group_size for layer in grouped})
    if int4:
        changes.append(f"W4A16: {len(int4)} layers as MatMulNBits with calq's int4 values, scales and zero points "
                       f"(groups {groups} in blocks {sorted(blocks)}: exact); accuracy_level {accuracy_level}"
                       + COMPUTE[accuracy_level])
    if int5:
        changes.append(f"5-bit groups: {len(int5)} layers as MatMulNBits bits 8 (ONNX Runtime's CPU kernel runs 2, 4 "
                       "and 8 bits): calq's 5-bit values, scales and zero points exact, but stored in a byte each "
                       f"(8 bits per weight, not 5); groups {groups} in blocks {sorted(blocks)}; accuracy_level "
                       f"{accuracy_level}" + COMPUTE[accuracy_level])
    int8_weights = [layer for layer in variant.layers.values() if isinstance(layer, variants.Int8WeightLayer)]
    if int8_weights:
        changes.append(f"W8A16: {len(int8_weights)} int8 weight-only layers as MatMulNBits bits 8 with calq's int8 "
                       f"values and channel scales (exact); accuracy_level {accuracy_level}" + COMPUTE[accuracy_level])
    if scale_dtype == "float16" and (grouped or int8_weights):
        changes.append("MatMulNBits scales stored as float16 (as GGUF's blocks), cast to float32 in the graph: each "
                       "scale rounded to 11 significant bits, so the weights differ from calq's by up to 1/2048 "
                       "relative (the values above are exact up to that rounding)")
    for name, matrix in variant.matrices.items():
        changes.append(f"{name} held as int{matrix.bits} with float16 scales per block of 32 ({matrix.gguf_type}'s "
                       "layout), dequantized in the graph: exactly the weight the PyTorch variant evaluated")
    if int8:
        static = sum(layer.input_scale is not None for layer in int8)
        changes.append(f"W8A8: {len(int8)} layers as MatMulInteger on calq's int8 weights; activations quantized in "
                       f"the graph as calq does ({len(int8) - static} per-token dynamic, {static} static per-tensor)")
    if not variant.layers:
        changes.append("float32 graph: no change")
    kind = calibrator_kind(calibrator)
    if kind != "none":
        changes.append(f"{kind} calibrator fused: output 'logits' is calibrated, 'raw_logits' is the model's")
    return changes
