"""ONNX for ONNX Runtime: the full-sequence scoring graph, the calibrator fused, calq's own integers.

Route: the variant's float model (each quantized Linear holding its dequantized weight) and the calibrator are
traced as one module by `torch.onnx.export(dynamo=True)` without graph optimization, so every Linear is still
`MatMul(x, Transpose(weight))` with the weight named after the layer. Each quantized layer's pair is then replaced:
- W4A16 -> com.microsoft MatMulNBits (bits 4): calq's unsigned int4 values, group scales and zero points as they
  are (compressed-tensors stores q + 8 and z + 8; (q + 8) - (z + 8) = q - z, so nothing is re-derived). The block
  is the largest power of two (16..128) dividing the group; a larger group repeats its scale and zero point over
  its blocks, which is exact. accuracy_level 0: float32 activations, as in PyTorch.
- W8A8 -> int8 weights in MatMulInteger (int8 x int8 -> int32), the activations quantized in the graph the way
  compressed-tensors does it: per token, scale = max|x| / 127.5 (dynamic), or calq's static per-tensor input
  scale; round half to even, clip to [-128, 127]; then the int32 sums times activation scale times channel scale.
  (onnxruntime's DynamicQuantizeLinear is per-tensor uint8, which is not calq's scheme.)
Outputs: `logits` (calibrated: logits / T, or the ATS head on the last hidden state) and `raw_logits`.
There is no decode graph with a KV cache: the artifact scores whole sequences (the ATS head attends over every
earlier position and has no cache of its own).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calq.errors import CalqError
from calq.export import variant as variants
from calq.export.base import Exporter, calibrator_kind, directory_size, register, require, write_info

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MAX_BLOCK = 128


class _Scoring(nn.Module):
    """input_ids [B, T] -> (calibrated logits, raw logits), both [B, T, V] float32."""

    def __init__(self, model: nn.Module, calibrator):
        super().__init__()
        self.model = model
        self.head = calibrator if isinstance(calibrator, nn.Module) else None
        self.temperature = getattr(calibrator, "temperature", None)

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=self.head is not None, use_cache=False)
        raw = out.logits
        if self.head is not None:
            calibrated = self.head(raw, out.hidden_states[-1])
        elif self.temperature is not None:
            calibrated = raw / self.temperature
        else:
            calibrated = raw * 1.0  # a node of its own, so the two outputs are distinct values
        return calibrated, raw


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


def _int4_nodes(g: _Graph, prefix: str, x: str, y: str, layer: variants.Int4Layer, accuracy_level: int) -> list:
    from onnx import helper

    n, k = layer.q.shape
    block = block_size(layer.group_size)
    repeat = layer.group_size // block
    blocks = k // block
    q = layer.q.numpy().reshape(n, blocks, block // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)  # element 2i in the low nibble, 2i + 1 in the high
    scales = np.repeat(layer.scale.numpy().astype(np.float32), repeat, axis=1)
    inputs = [x, g.constant(f"{prefix}.qweight", packed), g.constant(f"{prefix}.scales", scales)]
    if not layer.symmetric:  # MatMulNBits' default zero point is 8, calq's symmetric zero point
        zeros = np.repeat(layer.zero.numpy(), repeat, axis=1)
        zeros = np.pad(zeros, ((0, 0), (0, blocks % 2)), constant_values=8).reshape(n, -1, 2)
        inputs.append(g.constant(f"{prefix}.zeros", (zeros[..., 0] | (zeros[..., 1] << 4)).astype(np.uint8)))
    return [helper.make_node("MatMulNBits", inputs, [y], name=f"{prefix}.MatMulNBits", domain="com.microsoft",
                             K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)]


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

    def __init__(self, accuracy_level: int = 0):
        """accuracy_level of MatMulNBits: 0 computes with float32 activations (calq's numbers); 4 lets onnxruntime
        quantize the activations to int8 per block (faster, and the re-verification measures what it changes)."""
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise CalqError(f"accuracy_level {accuracy_level} is not one of 0-4", "export.onnx.accuracy_level",
                            "use 0 (float32 activations) or 4 (int8 activations)")
        self.accuracy_level = accuracy_level

    def check(self, checkpoint_dir, calibrator=None) -> None:
        super().check(checkpoint_dir, calibrator)
        qc = variants.quantization_config(checkpoint_dir) or {}
        for group_name, group in (qc.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            size = weights.get("group_size")
            if weights.get("num_bits") == 4 and weights.get("strategy") == "group" and not block_size(size or 0):
                raise CalqError(f"group size {size} has no MatMulNBits block (a power of two >= 16 dividing it)",
                                f"{checkpoint_dir}/config.json: config_groups.{group_name}",
                                "quantize with group_size 32, 64 or 128")

    def export(self, checkpoint_dir, out_dir, calibrator=None) -> dict:
        self.check(checkpoint_dir, calibrator)
        import onnx
        import onnxscript

        start = time.perf_counter()
        variant = variants.read(checkpoint_dir)
        vocab = variant.model.config.get_text_config().vocab_size
        example = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        program = torch.onnx.export(_Scoring(variant.model, calibrator).eval(), (example,), dynamo=True, optimize=False,
                                    input_names=["input_ids"], output_names=["logits", "raw_logits"],
                                    dynamic_shapes=({0: "batch", 1: "sequence"},), verbose=False)
        proto = program.model_proto
        graph = _Graph(proto.graph)
        blocks = set()
        for name, layer in variant.layers.items():
            weight = f"model.{name}.weight"
            _, matmul = graph.linear(weight)
            x, y = matmul.input[0], matmul.output[0]
            if isinstance(layer, variants.Int4Layer):
                blocks.add(block_size(layer.group_size))
                nodes = _int4_nodes(graph, weight, x, y, layer, self.accuracy_level)
            else:
                nodes = _int8_nodes(graph, weight, x, y, layer)
            graph.replace(weight, nodes)
        if variant.layers:
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        proto = onnxscript.optimizer.optimize(proto)

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / MODEL_FILE, out_dir / DATA_FILE):
            stale.unlink(missing_ok=True)
        onnx.save_model(proto, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        return write_info(out_dir, {
            "format": self.name, "scheme": variant.scheme, "calibrator": calibrator_kind(calibrator),
            "files": [MODEL_FILE, DATA_FILE], "bytes": directory_size(out_dir),
            "seconds": time.perf_counter() - start, "outputs": ["logits", "raw_logits"],
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "changes": _changes(variant, blocks, calibrator, self.accuracy_level),
            "decode_graph": "not exported: the artifact scores whole sequences (no KV cache)"})

    def session(self, out_dir, threads: int = 1) -> OnnxSession:
        return OnnxSession(Path(out_dir) / MODEL_FILE, threads)


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


def _changes(variant: variants.Variant, blocks: set[int], calibrator, accuracy_level: int) -> list[str]:
    changes = []
    int4 = [layer for layer in variant.layers.values() if isinstance(layer, variants.Int4Layer)]
    int8 = [layer for layer in variant.layers.values() if isinstance(layer, variants.Int8Layer)]
    if int4:
        groups = sorted({layer.group_size for layer in int4})
        changes.append(f"W4A16: {len(int4)} layers as MatMulNBits with calq's int4 values, scales and zero points "
                       f"(groups {groups} in blocks {sorted(blocks)}: exact); accuracy_level {accuracy_level}")
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
