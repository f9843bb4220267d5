"""GGUF for llama.cpp (written with the `gguf` package, run with llama-cpp-python), calq's own integers inside.

Block formats, each 32 weights along a row (ggml's layout):
- W4A16 -> Q4_1 {d, m float16; 16 bytes: weight j in the low nibble of byte j, weight j + 16 in the high one},
  y = q * d + m. calq's weight (q - z) * s, with q and z the unsigned 0..15 values compressed-tensors stores, is
  d = s, m = -z * s with the same q; a group of G = 32 * b weights is b blocks sharing d and m. When every zero
  point is 8 (symmetric) -> Q4_0 {d; 16 bytes}, y = (q - 8) * d, d = s.
- 5-bit groups (`bits: 5`, q and z unsigned 0..31) the same way -> Q5_1 {d, m; qh: 4 bytes, bit j the fifth bit of
  weight j; the low four bits as Q4's 16 bytes} (6 bits per weight), or Q5_0 {d; qh; 16 bytes}, y = (q - 16) * d,
  when every zero point is 16 (5.5 bits per weight).
- W8A8 -> Q8_0 {d float16; 32 int8}, y = q * d: calq's int8 values with d = the row's channel scale in every block.
  The int8 layers of a mixed checkpoint (W8A16, `int8_layers`) the same way: one file, a type per tensor.
- An int8 / int4 embedding / head (`embedding: int8 | int4`) -> Q8_0 / Q4_0 with its own integers and float16 block
  scales: exactly the weight the PyTorch variant evaluated (`embedding_exact` in the info, checked on gguf's
  dequantization).
What changes: d and m are float16 in GGUF (calq's scales are float32): each weight moves by at most a few 1e-4 of
its group's scale (`max_weight_change` in the info, measured against calq's dequantized weights); llama.cpp's CPU
kernels quantize the activations of Q4/Q8 products to 8 bits per block of 32 (W8A8: that replaces calq's
per-token or static activation scales); unquantized matrices (embeddings) are written as `float_type`.
Temperature: logits / T = W (g / T * norm(h)), so T is folded into output_norm.weight (exact; the output matrix
stays tied to the embeddings). The ATS head cannot go into GGUF: llama.cpp's graph is fixed per architecture.
Tokenizer: the source GGUF's tokenizer.* metadata is copied when the model came from a GGUF file (the bundled
model did); otherwise gguf's own converters read the transformers tokenizer (GPT-2 BPE, Llama/SentencePiece); a
tokenizer they cannot read gives tokenizer model 'no_vocab' (llama.cpp loads it; scoring uses token ids).
Architectures: `ARCHITECTURES` maps a transformers model type to the gguf package's MODEL_ARCH, whose TensorNameMap
names every tensor and whose MODEL_TENSORS says which ones llama.cpp reads, plus what convert_hf_to_gguf.py changes
in the weights (q/k row order for Llama and Mistral, Gemma's norm + 1). `unsupported` lists, from the config alone,
what llama.cpp's graph would compute differently (a Mistral sliding window, a RoPE scaling the table does not list
for the family, ...): the plan refuses it. RoPE scaling is written as convert_hf_to_gguf.py writes it: Gemma 3's
linear as metadata, Llama 3.x's llama3 as the rope_freqs tensor, Phi-3's LongRoPE as the rope_factors_long /
rope_factors_short tensors and its attention factor (`rope_factors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calq import gguf_reading, isolation
from calq.errors import CalqError
from calq.export import variant as variants
from calq.export.base import Exporter, calibrator_kind, register, require, write_info

MODEL_FILE = "model.gguf"
BLOCK = 32


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp's convert_hf_to_gguf.py writes one transformers model type: the gguf package's MODEL_ARCH
    (whose TensorNameMap and MODEL_TENSORS name the tensors), and what the converter changes in the weights."""

    arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # LlamaModel reorders q/k rows: llama.cpp's llama rotates adjacent pairs (NEOX archs not)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores w + 1 (convert's `+ 1`)
    rope_types: tuple[str, ...] = ("default",)  # transformers rope_type values written the way llama.cpp's graph reads


# transformers model_type -> Architecture. A family llama.cpp knows is one entry here (plus its metadata in
# `_write_hparams` when it has keys beyond the shared ones).
ARCHITECTURES = {
    # llama3: Llama 3.x's frequency-dependent scaling, as the rope_freqs tensor
    "llama": Architecture("LLAMA", permute_qk=True, rope_types=("default", "llama3")),
    # convert registers MistralForCausalLM as a LlamaModel
    "mistral": Architecture("LLAMA", permute_qk=True, rope_types=("default", "llama3")),
    "qwen2": Architecture("QWEN2"),
    "qwen3": Architecture("QWEN3"),
    # longrope: Phi-3 128k, Phi-3.5 and Phi-4-mini, as the rope_factors_long / rope_factors_short tensors
    "phi3": Architecture("PHI3", rope_types=("default", "longrope")),
    "gemma2": Architecture("GEMMA2", norm_offset=1.0),
    "gemma3_text": Architecture("GEMMA3", norm_offset=1.0, rope_types=("default", "linear")),
}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}  # llama.cpp scales queries by 1/sqrt(hidden / heads) only there


def architecture(config, where: str) -> Architecture:
    """The table entry for a text config, or a CalqError naming the families calq writes."""
    found = ARCHITECTURES.get(config.model_type)
    if found is None:
        raise CalqError(f"the GGUF exporter cannot write the '{config.model_type}' architecture yet", where,
                        f"export it to onnx, or use a model of: {', '.join(ARCHITECTURES)}")
    return found


def unsupported(config) -> str | None:
    """What in this config llama.cpp's graph for its architecture would compute differently, in words (None: all
    fits). Checked on the config alone, before any weight is read."""
    kind = config.model_type
    rope_type = rope_parameters(config).get("rope_type", "default")
    written = ARCHITECTURES[kind].rope_types if kind in ARCHITECTURES else ("default",)
    if rope_type not in written:
        return f"rope_type '{rope_type}' (calq writes {' and '.join(written)} rope for {kind})"
    if getattr(config, "mlp_bias", False) or (kind != "qwen2" and getattr(config, "attention_bias", False)):
        return "biases on the attention or MLP projections (llama.cpp reads them for qwen2 only)"
    if kind == "mistral" and getattr(config, "sliding_window", None):
        return (f"a sliding window of {config.sliding_window} tokens (llama.cpp's llama graph attends to the whole "
                "context)")
    if kind == "qwen2" and getattr(config, "use_sliding_window", False):
        return "use_sliding_window (llama.cpp's qwen2 graph attends to the whole context)"
    if kind in GEMMA_27B_LAYERS:
        head_dim = config.head_dim
        scalar = config.query_pre_attn_scalar
        if scalar != head_dim and not (scalar == config.hidden_size // config.num_attention_heads
                                       and config.num_hidden_layers == GEMMA_27B_LAYERS[kind]):
            return (f"query_pre_attn_scalar {scalar} (llama.cpp scales queries by 1/sqrt(head_dim {head_dim}), "
                    "or by 1/sqrt(hidden / heads) for the 27B model)")
    if kind == "gemma3_text":
        local = getattr(config, "rope_local_base_freq", None) or rope_parameters(config, "sliding_attention").get(
            "rope_theta", 10000.0)
        if local != 10000.0:
            return f"a sliding-layer rope base of {local} (llama.cpp's gemma3 uses 10000)"
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            return "logit soft-capping (llama.cpp's gemma3 graph has none)"
    if kind == "phi3" and getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor {config.partial_rotary_factor}"
    return None


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """transformers 5's rope_parameters (one dict, or one per attention type as in Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get(layer_type, rope) if isinstance(rope.get(layer_type), dict) else rope


def rope_factors(gguf, config) -> dict[str, np.ndarray]:
    """The tensors llama.cpp divides each rotary frequency by, as convert_hf_to_gguf.py writes them. Llama 3.x
    (rope_type llama3): rope_freqs, the default frequencies over transformers' llama3 ones (1 for the high
    frequencies, `factor` for the low ones, smoothed between). LongRoPE: the config's long and short factors;
    llama.cpp uses the long ones when its context (n_ctx) exceeds original_max_position_embeddings, transformers when
    the sequence does."""
    rope = rope_parameters(config)

    def name(tensor) -> str:
        return f"{gguf.TENSOR_NAMES[tensor]}.weight"

    if rope.get("rope_type") == "llama3":
        return {name(gguf.MODEL_TENSOR.ROPE_FREQS): gguf_reading.llama3_rope_freqs(config)}
    if rope.get("rope_type") == "longrope":
        return {name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG): np.array(rope["long_factor"], dtype=np.float32),
                name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT): np.array(rope["short_factor"], dtype=np.float32)}
    return {}


def gguf_name(names, hf_name: str) -> str:
    """llama.cpp's tensor name for a transformers parameter name, from `names`: the gguf package's own
    `TensorNameMap` for the architecture (what llama.cpp's converter uses)."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CalqError(f"no llama.cpp tensor for {hf_name}", "export.gguf", "export it to onnx")
    return name


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's rotary embedding expects for a q/k projection (convert_hf_to_gguf's `permute`):
    transformers rotates the two halves of each head, llama.cpp adjacent pairs."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _half(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy()


def group_blocks(layer: variants.GroupLayer) -> tuple[np.ndarray, str]:
    """(uint8 [N, K/32 * block bytes], 'Q4_0', 'Q4_1', 'Q5_0' or 'Q5_1') holding calq's 4- or 5-bit values, scales and
    zero points."""
    if layer.bits not in (4, 5):
        raise CalqError(f"GGUF has no block type for {layer.bits}-bit groups", "export.gguf",
                        "quantize with bits 4 or 5")
    n, k = layer.q.shape
    per = layer.group_size // BLOCK
    q = layer.q.numpy()
    qs = variants.nibbles(q)
    scale = layer.scale.repeat_interleave(per, 1)
    parts = [_half(scale)[..., None].view(np.uint8)]  # d: [N, blocks, 2]
    if not layer.symmetric:
        parts.append(_half(-layer.zero.repeat_interleave(per, 1).float() * scale)[..., None].view(np.uint8))  # m
    if layer.bits == 5:
        fifth = (q.reshape(n, k // BLOCK, BLOCK).astype(np.uint32) >> 4) & 1
        qh = (fifth << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)  # bit j: weight j's fifth bit
        parts.append(qh.astype("<u4")[..., None].view(np.uint8))  # [N, blocks, 4], little-endian
    kind = f"Q{layer.bits}_{0 if layer.symmetric else 1}"
    return np.concatenate([*parts, qs], axis=-1).reshape(n, -1), kind


def matrix_blocks(matrix: variants.BlockMatrix) -> np.ndarray:
    """uint8 [V, H/32 * block bytes]: an int8 / int4 embedding's own values and float16 block scales as Q8_0 / Q4_0."""
    if matrix.bits == 8:
        return q8_0(matrix.q, matrix.d)
    n, k = matrix.q.shape
    scales = _half(matrix.d).reshape(n, k // BLOCK, 1).view(np.uint8)
    return np.concatenate([scales, variants.nibbles((matrix.q.numpy() + 8).astype(np.uint8))], axis=-1).reshape(n, -1)


def q8_blocks(layer: variants.Int8Layer | variants.Int8WeightLayer) -> np.ndarray:
    """uint8 [N, K/32 * 34]: Q8_0 blocks of calq's int8 values, each with its row's channel scale."""
    n, k = layer.q.shape
    return q8_0(layer.q, layer.scale[:, None].expand(n, k // BLOCK))


def q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """uint8 [N, K/32 * 34]: Q8_0 blocks {d float16; 32 int8} from int8 values q [N, K] and block scales d [N, K/32]."""
    n, k = q.shape
    scales = _half(d).reshape(n, k // BLOCK, 1).view(np.uint8)  # [N, blocks, 2]
    qs = q.numpy().reshape(n, k // BLOCK, BLOCK).view(np.uint8)
    return np.concatenate([scales, qs], axis=-1).reshape(n, -1)


@register
class GgufExporter(Exporter):
    name = "gguf"
    calibrators = ("none", "temperature")
    packages = ("gguf",)
    runtime = "llama_cpp"
    runtime_name = "llama.cpp"
    crash_fix = isolation.LLAMA_CPP_FIX
    reads_tokenizer = True  # the tokenizer as llama.cpp reads it: the source GGUF's own, else converted

    def __init__(self, float_type: str = "f16"):
        if float_type not in ("f16", "f32"):
            raise CalqError(f"unknown float type '{float_type}'", "export.gguf.float_type", "use f16 or f32")
        self.float_type = float_type

    def check_config(self, config, where: str) -> None:
        import gguf

        arch = getattr(gguf.MODEL_ARCH, architecture(config, where).arch)
        problem = unsupported(config)
        if problem:
            raise CalqError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph cannot run this {config.model_type} "
                            f"model: {problem}", where, "export it to onnx")
        tied = getattr(config, "tie_word_embeddings", False)
        if not tied and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[arch]:
            raise CalqError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} ties the output layer to the embeddings; "
                            "this model has its own lm_head", where, "export it to onnx")

    def carries(self, config=None) -> tuple[str, ...]:
        """A temperature folds into output_norm only when nothing nonlinear follows the output layer: not with
        Gemma 2's final logit soft-capping."""
        if getattr(config, "final_logit_softcapping", None):
            return ("none",)
        return self.calibrators

    def check(self, checkpoint_dir, calibrator=None) -> None:
        super().check(checkpoint_dir, calibrator)
        from transformers import AutoConfig

        where = f"{checkpoint_dir}/config.json"
        config = AutoConfig.from_pretrained(checkpoint_dir).get_text_config()
        self.check_config(config, where)
        kind = calibrator_kind(calibrator)
        if kind not in self.carries(config):
            raise CalqError(f"the {self.name} format cannot carry the '{kind}' calibrator for this model: it soft-caps "
                            "its logits after the output layer (final_logit_softcapping)", f"export.{self.name}",
                            "export with calibrator none, or to onnx")
        qc = variants.quantization_config(checkpoint_dir) or {}
        for group_name, group in (qc.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            size = weights.get("group_size")
            if weights.get("num_bits") in (4, 5) and weights.get("strategy") == "group" and size % BLOCK:
                raise CalqError(f"group size {size} is not a multiple of GGUF's block of {BLOCK}",
                                f"{where}: config_groups.{group_name}", "quantize with group_size 32, 64 or 128")

    def export(self, checkpoint_dir, out_dir, calibrator=None, tokenizer: str | Path | None = None) -> dict:
        """`tokenizer`: the GGUF file the model was loaded from (its tokenizer metadata is copied), or a
        transformers tokenizer folder (default: `checkpoint_dir`)."""
        self.check(checkpoint_dir, calibrator)
        gguf = require("gguf", self.name)
        start = time.perf_counter()
        variant = variants.read(checkpoint_dir)
        config = variant.model.config.get_text_config()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        family = architecture(config, str(checkpoint_dir))
        arch = getattr(gguf.MODEL_ARCH, family.arch)
        writer = gguf.GGUFWriter(str(out_dir / MODEL_FILE), gguf.MODEL_ARCH_NAMES[arch])
        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        _write_hparams(writer, config)
        tokenizer = _write_tokenizer(writer, gguf, tokenizer or checkpoint_dir, config.vocab_size)

        heads = {"self_attn.q_proj": config.num_attention_heads,
                 "self_attn.k_proj": config.num_key_value_heads} if family.permute_qk else {}
        state = variant.model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # llama.cpp uses token_embd.weight when output.weight is absent
        temperature = getattr(calibrator, "temperature", None)
        worst: dict[str, float] = {}  # by tensor type: largest weight change from calq's values
        exact_matrices: dict[str, bool] = {}  # int8 / int4 embedding / head: GGUF holds exactly the evaluated weight
        types: dict[str, int] = {}
        for hf_name, tensor in state.items():
            name = gguf_name(names, hf_name)
            module = hf_name.removesuffix(".weight")
            layer = variant.layers.get(module)
            head_count = next((h for suffix, h in heads.items() if module.endswith(suffix)), None)
            rows = rope_rows(tensor.shape[0], head_count) if head_count else None
            if family.norm_offset and hf_name.endswith("norm.weight"):
                tensor = tensor + family.norm_offset
            if hf_name == "model.norm.weight" and temperature is not None:
                tensor = tensor / temperature
            matrix = variant.matrices.get(hf_name)
            if matrix is not None:  # embedding: int8 / int4, already in Q8_0's / Q4_0's layout
                kind = matrix.gguf_type
                blocks = matrix_blocks(matrix)
                writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
                back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])
                exact_matrices[name] = bool(np.array_equal(back, tensor.numpy()))
            elif layer is None:
                data = tensor if rows is None else tensor[rows]
                kind = "F32" if data.ndim == 1 or self.float_type == "f32" else "F16"
                writer.add_tensor(name, data.numpy().astype(np.float32 if kind == "F32" else np.float16))
            else:
                if rows is not None:
                    layer = _rows(layer, rows)
                blocks, kind = (group_blocks(layer) if isinstance(layer, variants.GroupLayer)
                                else (q8_blocks(layer), "Q8_0"))
                qtype = gguf.GGMLQuantizationType[kind]
                writer.add_tensor(name, blocks, raw_dtype=qtype)
                back = gguf.quants.dequantize(blocks, qtype)  # what llama.cpp will read, as float32
                exact = layer.dequantize().numpy()
                change = float(np.abs(back - exact).max() / np.abs(exact).max())
                worst[kind] = max(worst.get(kind, 0.0), float(change))
            types[kind] = types.get(kind, 0) + 1
        for name, factors in rope_factors(gguf, config).items():
            writer.add_tensor(name, factors)
            types["F32"] = types.get("F32", 0) + 1
        writer.add_file_type(_file_type(gguf, types))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return write_info(out_dir, {
            "format": self.name, "scheme": variant.scheme, "calibrator": calibrator_kind(calibrator),
            "files": [MODEL_FILE], "bytes": (out_dir / MODEL_FILE).stat().st_size,
            "seconds": time.perf_counter() - start, "tensor_types": types, "tokenizer": tokenizer,
            "max_weight_change": worst, "embedding_exact": exact_matrices,
            "changes": _changes(variant, types, worst, exact_matrices, temperature, self.float_type, tokenizer)})

    def session(self, out_dir, threads: int = 1, n_ctx: int = 512, kv_cache: str = "f16") -> LlamaCppSession:
        return LlamaCppSession(Path(out_dir) / MODEL_FILE, threads, n_ctx, kv_cache)


class LlamaCppSession:
    """A GGUF file in llama.cpp (llama-cpp-python): logits for every position of a batch of token sequences.
    `kv_cache`: llama.cpp's default keeps keys and values in float16 (what a device runs); "f32" for exact checks."""

    def __init__(self, path: Path, threads: int = 1, n_ctx: int = 512, kv_cache: str = "f16"):
        llama_cpp = require("llama_cpp", "gguf")
        if not path.is_file():
            raise CalqError(f"no GGUF file at {path}", str(path), "export the variant first")
        if kv_cache not in ("f16", "f32"):
            raise CalqError(f"unknown kv_cache type '{kv_cache}'", "export.gguf.kv_cache", "use f16 or f32")
        cache = llama_cpp.GGML_TYPE_F32 if kv_cache == "f32" else llama_cpp.GGML_TYPE_F16
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False, type_k=cache, type_v=cache)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for ids in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(ids)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32)))
        return torch.stack(rows)


def _rows(layer, rows: torch.Tensor):
    if isinstance(layer, variants.GroupLayer):
        return variants.GroupLayer(layer.q[rows], layer.scale[rows], layer.zero[rows], layer.group_size,
                                   layer.symmetric, layer.bits)
    if isinstance(layer, variants.Int8WeightLayer):
        return variants.Int8WeightLayer(layer.q[rows], layer.scale[rows])
    return variants.Int8Layer(layer.q[rows], layer.scale[rows], layer.input_scale)


def _write_hparams(writer, config) -> None:
    """The architecture's metadata keys, as convert_hf_to_gguf writes them for these families."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = rope_parameters(config)
    kind = config.model_type
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if rope.get("rope_type") == "linear":  # Gemma 3 4B and larger (unsupported() refuses it elsewhere)
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if kind in ("gemma2", "gemma3_text", "phi3"):
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    if kind == "gemma2" and config.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if kind == "gemma2" and config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if kind == "phi3":
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings")
                                             or getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings)
    if rope.get("rope_type") == "longrope":  # transformers scales cos and sin by it; llama.cpp its rope the same
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        writer.add_rope_scaling_attn_factors(ROPE_INIT_FUNCTIONS["longrope"](config)[1])


def _write_tokenizer(writer, gguf, source: str | Path | None, vocab_size: int) -> str:
    """Tokenizer metadata: copied from a source GGUF file, converted (gguf.vocab) from a transformers tokenizer
    folder, or 'no_vocab' when the folder has none gguf can read. Returns what was written, in words."""
    if source is not None and Path(source).suffix == ".gguf":
        return _copy_tokenizer(writer, gguf, Path(source), vocab_size)
    from gguf import vocab as vocabs

    folder = Path(source) if source is not None else None
    kinds = [vocabs.BpeVocab, vocabs.LlamaHfVocab]
    if folder is not None and (folder / "tokenizer.model").is_file():
        kinds.append(vocabs.SentencePieceVocab)
    found = None
    for kind in kinds if folder is not None else ():
        try:
            found = kind(folder)
            break
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # not this kind of tokenizer
            continue
        except (ImportError, RuntimeError) as exc:  # gguf's SentencePiece reader without the sentencepiece package
            raise CalqError(f"cannot read the tokenizer in {folder} ({exc})", "export.gguf.tokenizer",
                            "pip install sentencepiece") from None
    special = None if found is None else gguf.SpecialVocab(Path(source), load_merges=found.tokenizer_model == "gpt2",
                                                            n_vocab=vocab_size)
    if found is None or (found.tokenizer_model == "gpt2" and not special.merges):
        # llama.cpp refuses to load a BPE vocabulary without merges
        writer.add_tokenizer_model("no_vocab")
        return "none (no_vocab: the file is scored on token ids)"
    tokens, scores, types = (list(column) for column in zip(*found.all_tokens()))
    if len(tokens) > vocab_size:
        raise CalqError(f"the tokenizer in {source} has {len(tokens)} tokens; the model has {vocab_size}",
                        "export.gguf.tokenizer", "give the tokenizer the model was trained with")
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padding), as convert_hf_to_gguf
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(found.tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return f"converted from the transformers tokenizer in {source} ({found.tokenizer_model})"


def _copy_tokenizer(writer, gguf, source: Path, vocab_size: int) -> str:
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise CalqError(f"{source} has {0 if tokens is None else len(tokens.data)} tokenizer tokens; the model has "
                        f"{vocab_size}", "export.gguf.tokenizer", "give the GGUF file the model was loaded from")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    return f"copied from {source.name}"


def _file_type(gguf, types: dict[str, int]) -> int:
    for kind in ("Q4_1", "Q4_0", "Q5_1", "Q5_0", "Q8_0", "F16"):  # the Linears' group type before Q8_0's int8 layers
        if kind in types:
            return gguf.LlamaFileType[f"MOSTLY_{kind}"]
    return gguf.LlamaFileType.ALL_F32


def _changes(variant, types, worst, exact_matrices, temperature, float_type, tokenizer) -> list[str]:
    changes = []
    for kind, change in worst.items():
        layers = types[kind] - sum(m.gguf_type == kind for m in variant.matrices.values())
        changes.append(f"{layers} layers as {kind} with calq's integers; float16 block scales move each weight "
                       f"by at most {change:.1e} of the layer's largest weight")
    kinds = {matrix.gguf_type for matrix in variant.matrices.values()}
    for name, exact in exact_matrices.items():
        changes.append(f"{name} as {'/'.join(sorted(kinds))} with the integers and float16 block scales the PyTorch "
                       "variant evaluated" + (" (exact)" if exact else ": NOT exact, report this"))
    if any(isinstance(layer, variants.Int8WeightLayer) for layer in variant.layers.values()):
        count = sum(isinstance(layer, variants.Int8WeightLayer) for layer in variant.layers.values())
        changes.append(f"{count} int8 weight-only layers (W8A16) as Q8_0, their channel scale in every block; "
                       "llama.cpp quantizes their activations to int8 per block of 32")
    if any(isinstance(layer, variants.Int8Layer) for layer in variant.layers.values()):
        changes.append("W8A8 activations: llama.cpp quantizes them to int8 per block of 32 (q8_0), not with calq's "
                       "per-token or static scales")
    elif variant.layers:
        changes.append("llama.cpp's CPU kernels quantize the activations of int4 / int5 products to int8 per block of "
                       "32")
    if float_type == "f16" and not exact_matrices:
        changes.append("unquantized matrices (embeddings) stored as float16")
    if temperature is not None:
        changes.append(f"temperature {temperature:.4f} folded into output_norm.weight (logits / T); no ATS in GGUF")
    changes.append(f"tokenizer: {tokenizer}")
    return changes
