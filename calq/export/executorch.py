"""ExecuTorch for phones: a `.pte` program lowered to XNNPACK and its `.ptd` weights, calq's own integers, the
calibrator fused.

Route: the variant's float model (calq.export.variant) has each W4A16 Linear's weight replaced by torchao's
`IntxUnpackedToInt8Tensor` built directly from calq's integers (no re-quantization): the int4 values as int8
(q - 8, in -8..7), calq's group scales, block (1, group). `torch.export` traces it, ExecuTorch lowers it to XNNPACK
and writes model.pte (the methods) and model.ptd (every weight, each stored once) with the methods:
- `forward` (input_ids [1, S], cache_position [S]) -> logits [1, S, V], S up to `max_seq_len`: the KV-cache program
  (transformers' StaticCache of `max_seq_len` positions as the program's mutable buffers, the signature ExecuTorch's
  LLM runner calls). A call at position 0 is a prefill (scoring a whole window), then one token per call. Its logits
  carry the temperature (logits / T); with ATS they are the raw logits (the head attends over every earlier hidden
  state and has no cache of its own) and
- `score` (ATS only) input_ids [1, T] -> calibrated logits, the head in the program.
The weights go to model.ptd (ExecuTorch's program-data separation), both those XNNPACK packs at load time and the
constants the portable kernels read, in one store that keeps each content once. That is what stores a tied embedding
(SmolLM2's) once: the token lookup runs on the portable kernel (XNNPACK has no embedding lookup) and the output layer
on XNNPACK, and both read the same float32 bytes (inside one .pte, the lookup's constant and XNNPACK's copy would be
two). An `embedding: int8 | int4` variant's matrix is float32 on Q8_0's / Q4_0's grid, so it is stored as those float32
values: exact, but not smaller (XNNPACK has no kernel for weights with one scale per block of 32 along the rows).

What XNNPACK changes, stated in export.json's `changes` and measured by the re-verification:
- XNNPACK has no kernel for group-wise int4 weights with float activations (a weight-only program lowers to wrong
  numbers), so the activations of the int4 products are quantized to int8 per token at run time (torchao's
  int8_asym_per_token: 8da4w), like llama.cpp's 8-bit activations; the same bar applies (top-1 agreement >= 0.95).
- XNNPACK's group-wise int4 kernel is symmetric (it drops zero points) and keeps group scales as bfloat16. An
  asymmetric layer is kept exact in its zero points: w = (q - 8) * s - (z - 8) * s, so the program computes the
  symmetric int4 product and subtracts each group's input sum times (z - 8) * s, the sums taken on the same int8
  activations (an 8da4w layer of ones), so the layer computes int8(x) (q - z) s as a symmetric one would.
W8A8 is refused (XNNPACK quantizes activations asymmetrically, not calq's scheme; not built yet), and so are groups
that are not a multiple of XNNPACK's 32.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

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

PROGRAM_FILE = "model.pte"
DATA_FILE = "model.ptd"  # the weights: ExecuTorch's tensor data file, loaded beside the program
DATA_TAG = "model"  # write_tensor_data_to_file names the file <tag>.ptd
DECODE_METHOD = "forward"  # the name ExecuTorch's LLM runner calls: (input_ids, cache_position) -> logits
SCORE_METHOD = "score"  # with ATS only: input_ids -> calibrated logits, the head in the program
XNNPACK_GROUP = 32
MAX_SEQ_LEN = 512
RUNTIME_FIX = "reinstall executorch (pip install --force-reinstall executorch); `calq doctor` probes it"


class _ZeroPointLinear(nn.Module):
    """An asymmetric int4 layer on XNNPACK's symmetric kernel: x (q - 8)^T s minus each group's input sum times
    (z - 8) s, which is calq's (q - z) s exactly in the weights. The group sums are an 8da4w layer too (a 0/1 matrix
    [K / group, K], exact in int4 with scale 1), so they add up the same int8 activations the product reads: with
    float sums the correction would not cancel the activations' rounding in the (z - 8) s part of the weights (the
    README's ExecuTorch section measures what that cost). A linear layer also because XNNPACK has no
    kernel for a sum over the last dimension, and an operator it cannot run splits the program into one more delegate
    at every layer (slow to lower, slow to run)."""

    def __init__(self, symmetric: nn.Linear, zero_times_scale: torch.Tensor, group_size: int):
        super().__init__()
        self.symmetric = symmetric
        groups, k = zero_times_scale.shape[1], symmetric.in_features
        ones = (torch.arange(k) // group_size == torch.arange(groups)[:, None]).to(torch.int8)
        self.sums = nn.Linear(k, groups, bias=False)
        self.sums.weight = nn.Parameter(_int4_weight(ones, torch.ones(groups, groups), group_size),
                                        requires_grad=False)
        self.zero = nn.Linear(groups, zero_times_scale.shape[0], bias=False)
        self.zero.weight.data = zero_times_scale

    def forward(self, x):
        return self.symmetric(x) - self.zero(self.sums(x))


class _Decode(nn.Module):
    """The KV-cache program: (input_ids [1, S], cache_position [S]) -> logits [1, S, V], divided by the temperature if
    any. The cache is transformers' StaticCache of `max_seq_len` positions held as the program's mutable buffers
    (transformers' executorch recipe module); a call at cache_position 0 starts a new sequence (prefill), then one
    token per call. The ATS head is not here: it attends over every earlier hidden state and has no cache of its own,
    so with ATS this method gives the raw logits and the calibrated scores come from the `score` method."""

    def __init__(self, model: nn.Module, temperature: float | None, max_seq_len: int):
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        model.generation_config.cache_implementation = "static"
        self.cached = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_seq_len)
        self.temperature = temperature

    def forward(self, input_ids, cache_position):
        logits = self.cached(input_ids=input_ids, cache_position=cache_position)
        return logits if self.temperature is None else logits / self.temperature


def _int4_weight(signed: torch.Tensor, scale: torch.Tensor, group_size: int):
    """torchao's 8da4w weight: int4 values (int8 storage, -8..7) in groups of `group_size` with float32 scales, no zero
    points; XNNPACK quantizes the activations to int8 per token at run time."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    return IntxUnpackedToInt8Tensor(
        signed, scale.float(), torch.zeros_like(signed[:, ::group_size]), torch.int4, (1, group_size), torch.float32,
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)


def _int4_linear(linear: nn.Linear, layer: variants.GroupLayer) -> nn.Module:
    signed = (layer.q.to(torch.int16) - 8).to(torch.int8)
    linear.weight = nn.Parameter(_int4_weight(signed, layer.scale, layer.group_size), requires_grad=False)
    if layer.symmetric:
        return linear
    return _ZeroPointLinear(linear, (layer.zero.float() - 8) * layer.scale.float(), layer.group_size)


@register
class ExecuTorchExporter(Exporter):
    name = "executorch"
    packages = ("executorch", "torchao")
    runtime = "executorch.runtime"
    runtime_name = "ExecuTorch"
    crash_fix = RUNTIME_FIX
    # 2: the KV-cache method (generation); 3: the weights in model.ptd, a tied embedding once; 4: the zero-point sums
    # on the int8 activations
    version = 4

    def check(self, checkpoint_dir, calibrator=None) -> None:
        super().check(checkpoint_dir, calibrator)
        qc = variants.quantization_config(checkpoint_dir) or {}
        where = f"{checkpoint_dir}/config.json"
        for group_name, group in (qc.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            if weights.get("num_bits") != 4 or group.get("input_activations"):
                activations = " and quantized activations" if group.get("input_activations") else ""
                raise CalqError(f"the executorch format holds W4A16 variants and the baseline only, not "
                                f"{weights.get('num_bits')}-bit weights{activations}",
                                f"{where}: config_groups.{group_name}", "export W8A8 variants as onnx or gguf")
            size = weights.get("group_size")
            if weights.get("strategy") != "group" or not size or size % XNNPACK_GROUP:
                raise CalqError(f"int4 {weights.get('strategy')} weights with group size {size}: XNNPACK needs groups "
                                f"of a multiple of {XNNPACK_GROUP}", f"{where}: config_groups.{group_name}",
                                "quantize with group_size 32, 64 or 128")

    def options(self, recipe) -> dict:
        return {"max_seq_len": recipe.evaluation.tokens.seq_len}  # the program's longest input: the verified window

    def export(self, checkpoint_dir, out_dir, calibrator=None, max_seq_len: int = MAX_SEQ_LEN) -> dict:
        self.check(checkpoint_dir, calibrator)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.devtools.backend_debug import get_delegation_info
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

        start = time.perf_counter()
        variant = variants.read(checkpoint_dir)
        config = variant.model.config.get_text_config()
        max_seq_len = min(max_seq_len, getattr(config, "max_position_embeddings", max_seq_len))
        for name, layer in variant.layers.items():
            variant.model.set_submodule(name, _int4_linear(variant.model.get_submodule(name), layer))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (PROGRAM_FILE, DATA_FILE):
            (out_dir / name).unlink(missing_ok=True)

        kind = calibrator_kind(calibrator)
        temperature = calibrator.temperature if kind == "temperature" else None
        example = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        sequence = torch.export.Dim("sequence", min=1, max=max_seq_len)
        with torch.no_grad():
            # strict: the static cache's in-place updates trace as buffer mutations only under dynamo
            methods = {DECODE_METHOD: torch.export.export(
                _Decode(variant.model, temperature, max_seq_len).eval(), (example, torch.arange(example.shape[1])),
                dynamic_shapes=({1: sequence}, {0: sequence}), strict=True)}
            if kind == "ats":
                methods[SCORE_METHOD] = torch.export.export(
                    FusedScoring(variant.model, calibrator).eval(), (example,),
                    dynamic_shapes=({1: torch.export.Dim("sequence", min=2, max=max_seq_len)},), strict=False)
        lowered = to_edge_transform_and_lower(methods, transform_passes=[_weights_to_data_file],
                                              partitioner=[XnnpackPartitioner()])
        delegation = get_delegation_info(lowered.exported_program(DECODE_METHOD).graph_module)
        program = lowered.to_executorch(ExecutorchBackendConfig(external_constants=lambda node: DATA_TAG))
        (out_dir / PROGRAM_FILE).write_bytes(program.buffer)
        program.write_tensor_data_to_file(out_dir)
        return write_info(out_dir, {
            "format": self.name, "scheme": variant.scheme, "calibrator": kind,
            "files": [PROGRAM_FILE, DATA_FILE], "bytes": directory_size(out_dir),
            "seconds": time.perf_counter() - start,
            "methods": list(methods), "outputs": ["logits"], "max_seq_len": max_seq_len, "backend": "XNNPACK",
            "decode_graph": {"method": DECODE_METHOD, "logits": "raw" if temperature is None else "raw / temperature",
                             "kv_cache": f"static, {max_seq_len} positions"},
            "executorch": _version(), "delegation": _delegation(delegation), "bytes_by_part": _parts(out_dir),
            "changes": _changes(variant, calibrator)})

    def session(self, out_dir, threads: int = 1) -> ExecuTorchSession:
        return ExecuTorchSession(Path(out_dir) / PROGRAM_FILE, threads)

    @torch.no_grad()
    def verify_generation(self, out_dir, reference_logits, prompt: torch.Tensor, new_tokens: int,
                          threads: int = 1) -> dict:
        """The decode method against the PyTorch reference and against itself without a cache: greedy generation of
        `new_tokens` after `prompt` (token ids [T]) vs greedy tokens from `reference_logits`, and the logits of every
        prefill and decode step vs one prefill call over the same whole sequence."""
        decode_logits = json.loads((Path(out_dir) / INFO_FILE).read_text())["decode_graph"]["logits"]
        with self.isolated(self.session, out_dir, threads) as session:
            tokens, step_logits, seconds = session.generate(prompt, new_tokens)
            full = session.step(torch.cat([prompt, tokens[:-1]])[None], 0)[0]
        return generation_check(tokens, greedy_reference(reference_logits, prompt, new_tokens), decode_logits,
                                step_logits, full, seconds, threads)


class ExecuTorchSession:
    """model.pte with its weights model.ptd on ExecuTorch's Python runtime (XNNPACK and the portable kernels)."""

    def __init__(self, path: Path, threads: int = 1):
        runtime = require("executorch.runtime", "executorch")
        data = path.with_name(DATA_FILE)
        if not path.is_file() or not data.is_file():
            raise CalqError(f"no ExecuTorch program with its weights at {path.parent} ({PROGRAM_FILE} and "
                            f"{DATA_FILE})", str(path.parent), "export the variant again with this calq")
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
        program = runtime.Runtime.get().load_program(path, data_path=data)
        if DECODE_METHOD not in program.method_names:
            raise CalqError(f"{path} has no KV-cache method '{DECODE_METHOD}'", str(path),
                            "export the variant again with this calq")
        self.decode = program.load_method(DECODE_METHOD)
        self.scoring = program.load_method(SCORE_METHOD) if SCORE_METHOD in program.method_names else None
        self.max_seq_len = self.decode.metadata.input_tensor_meta(0).sizes()[1]

    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """input_ids [1, S] at positions start.. of the cache (0: a new sequence) -> logits [1, S, V]."""
        if start + input_ids.shape[1] > self.max_seq_len:
            raise CalqError(f"{start + input_ids.shape[1]} tokens exceed the program's max_seq_len {self.max_seq_len}",
                            "export.executorch", "export again with a larger max_seq_len or use shorter sequences")
        positions = torch.arange(start, start + input_ids.shape[1])
        return self.decode.execute([input_ids.to(torch.long).contiguous(), positions])[0].float()

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Calibrated logits [B, T, V]: the `score` method (ATS), else one prefill call per row."""
        if input_ids.shape[1] > self.max_seq_len:
            raise CalqError(f"{input_ids.shape[1]} tokens exceed the program's max_seq_len {self.max_seq_len}",
                            "export.executorch", "export again with a larger max_seq_len or verify shorter windows")
        rows = [self.scoring.execute([row[None].to(torch.long).contiguous()])[0].float() if self.scoring is not None
                else self.step(row[None], 0) for row in input_ids]
        return torch.cat(rows)

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Greedy: (new token ids [new_tokens], logits of every position fed [T + new_tokens - 1, V], the seconds of
        the prefill and of the decode steps)."""
        start = time.perf_counter()
        rows, tokens = [self.step(prompt[None], 0)[0]], []
        seconds = {"prefill": time.perf_counter() - start}
        for i in range(new_tokens):
            tokens.append(int(rows[-1][-1].argmax()))
            if i + 1 < new_tokens:
                rows.append(self.step(torch.tensor([[tokens[-1]]]), prompt.numel() + i)[0])
        seconds["decode"] = time.perf_counter() - start - seconds["prefill"]
        return torch.tensor(tokens), torch.cat(rows), seconds


def _version() -> str:
    from importlib.metadata import version

    return version("executorch")


def _weights_to_data_file(graph_module: torch.fx.GraphModule):
    """A pass on the edge graph, before XNNPACK takes its part: every input carries model.ptd's tag, which XNNPACK
    reads only for the weights it stores (its `delegate_constant_tag`). On the edge graph, not the exported one: there
    torchao's int4 weights are already the int8 values and scales XNNPACK packs. The constants left to the portable
    kernels go to model.ptd by `external_constants` when the program is written; buffers (the KV cache) stay."""
    from executorch.exir.pass_base import PassResult

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
    return PassResult(graph_module, True)


def _parts(out_dir: Path) -> dict:
    """What the files' bytes hold: model.pte (the programs, the XNNPACK graphs, anything left inside) and model.ptd
    (the weights, each content once: `shared_weights` counts the buffers that more than one name reads, a tied
    embedding's lookup table and output layer among them)."""
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    data = FlatTensorSerializer().deserialize(Cord((out_dir / DATA_FILE).read_bytes()))
    readers = [0] * len(data.buffers)
    for entry in data.named_data.values():
        readers[entry.buffer_index] += 1
    return {"program": (out_dir / PROGRAM_FILE).stat().st_size, "weights": (out_dir / DATA_FILE).stat().st_size,
            "weight_buffers": len(data.buffers), "largest_weight": max(map(len, data.buffers), default=0),
            "shared_weights": sum(count > 1 for count in readers)}


def _delegation(info) -> dict:
    """What XNNPACK ran: delegated and non-delegated node counts, by operator."""
    return {"subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
            "non_delegated_nodes": info.num_non_delegated_nodes,
            "by_operator": {op: {"delegated": b.delegated, "non_delegated": b.non_delegated}
                            for op, b in sorted(info.delegation_by_operator.items())}}


def _bfloat16_change(scale: torch.Tensor) -> float:
    """The largest relative change of a float32 scale tensor rounded to bfloat16, as XNNPACK stores it."""
    scale = scale.float()
    return ((scale.bfloat16().float() - scale).abs() / scale.abs().clamp(min=1e-30)).max().item()


def _changes(variant: variants.Variant, calibrator) -> list[str]:
    changes = []
    layers = list(variant.layers.values())
    if layers:
        groups = sorted({layer.group_size for layer in layers})
        asymmetric = sum(not layer.symmetric for layer in layers)
        changes.append(f"W4A16: {len(layers)} layers hold calq's int4 values and group scales (groups {groups}) on "
                       "XNNPACK's group-wise int4 kernel, which keeps the scales as bfloat16")
        moved = [_bfloat16_change(layer.scale) for layer in layers]
        if any(moved):
            changes.append(f"{sum(m > 0 for m in moved)} layers' group scales rounded to bfloat16 (up to "
                           f"{max(moved):.1e} relative): quantize with `scale_dtype: bfloat16` to keep them exact")
        else:
            changes.append("every group scale is a bfloat16 value (`scale_dtype: bfloat16`): the weights are exact")
        changes.append("8da4w: XNNPACK has no kernel for group-wise int4 weights with float activations, so the "
                       "activations of the int4 products are quantized to int8 per token at run time "
                       "(the llama.cpp-like bar applies: top-1 agreement >= 0.95)")
        if asymmetric:
            changes.append(f"{asymmetric} asymmetric layers: calq's zero points as a correction (each group's sum "
                           "of the int8 activations times (z - 8) * scale), since XNNPACK's int4 kernel is symmetric")
    else:
        changes.append("float32 program on XNNPACK: no change")
    kind = calibrator_kind(calibrator)
    if kind == "ats":
        changes.append("ats calibrator fused in the `score` method (the head on the last hidden state); the KV-cache "
                       "method `forward` gives the raw logits: the head attends over every earlier hidden state and "
                       "has no cache of its own")
    elif kind == "temperature":
        changes.append(f"temperature {calibrator.temperature:.4f} fused: logits / T")
    return changes
