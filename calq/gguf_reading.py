"""A GGUF model's metadata, tokenizer and configuration as llama.cpp reads them, where transformers 5.17 does not.

- Metadata: the gguf package's GGUFReader builds numpy views per array element, about 20 s per open on a 2-core
  machine for a 262,144-token vocabulary (Gemma 3); `metadata` reads the key-value section alone in well under one.
- SentencePiece vocabularies (`tokenizer.ggml.model` = llama: Llama 2, Mistral 7B, Gemma): llama.cpp merges the
  adjacent pair whose concatenation is the best-scoring token, then falls back to byte tokens. That is a BPE whose
  merges are ranked by the merged token's score; `spm_tokenizer` builds it with transformers' own `generate_merges`
  (dictionary look-ups: seconds for 262k tokens). transformers builds Gemma's as a Unigram model over those scores,
  which splits text into characters (huggingface/transformers#41494), and other SentencePiece vocabularies with a
  merge search that scans the token list for every split (minutes at 32k tokens, hours at 262k).
- Configuration: `complete_config` adds what transformers' GGUF mapping leaves out and llama.cpp reads: linear RoPE
  scaling (`rope.scaling.*`, Gemma 3 4B and larger), Gemma 3's attention scale (llama.cpp: 1/sqrt(head size), and
  1/sqrt(hidden / heads) for the 62-layer 27B), the head size of files whose mapping leaves it out (Qwen3) and
  Llama 3.x's rope scaling, which a GGUF holds only as the rope_freqs tensor (`llama3_rope`).
  Mistral models are stored as `llama` (convert_hf_to_gguf.py registers them so); llama.cpp's llama graph and
  transformers' Llama both attend to the whole context.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from calq.errors import CalqError

SPACE = "\u2581"  # SentencePiece's visible space


def metadata(path: str | Path) -> dict:
    """Every key-value pair of a GGUF file's header: strings as str, arrays as lists."""
    return _header(path)[1]


def tensor(path: str | Path, name: str) -> np.ndarray | None:
    """One float32 tensor of a GGUF file (a copy), or None when the file has no tensor of that name."""
    from gguf import GGMLQuantizationType

    buf, meta, offset, count = _header(path)
    found, read = None, _Reader(buf)
    for _ in range(count):
        tensor_name, offset = read.string(offset)
        (dims,) = struct.unpack_from("<I", buf, offset)
        shape = struct.unpack_from(f"<{dims}Q", buf, offset + 4)
        kind, start = struct.unpack_from("<IQ", buf, offset + 4 + 8 * dims)
        offset += 4 + 8 * dims + 12
        if tensor_name == name:
            found = (shape, kind, start)
    if found is None:
        return None
    shape, kind, start = found
    if kind != GGMLQuantizationType.F32:
        raise CalqError(f"the GGUF's {name} is stored as {GGMLQuantizationType(kind).name}, not F32", "model.id",
                        "use the model's original Hugging Face folder (safetensors and tokenizer.json)")
    alignment = meta.get("general.alignment", 32)
    data = -(-offset // alignment) * alignment
    return np.frombuffer(buf, np.float32, int(np.prod(shape)), data + start).copy()


def _header(path: str | Path):
    """(the file mapped, its key-value pairs, the offset of its tensor infos, how many tensors)."""
    from gguf import GGUF_MAGIC

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version, tensors, count = struct.unpack_from("<IIQQ", buf, 0)
    if magic != GGUF_MAGIC or version < 2:
        raise CalqError(f"{Path(path).name} is not a GGUF file of version 2 or later (little-endian)", "model.id",
                        "give a GGUF file written by llama.cpp's converter or the gguf package")
    out, offset, read = {}, 24, _Reader(buf)
    for _ in range(count):
        key, offset = read.string(offset)
        (kind,) = struct.unpack_from("<I", buf, offset)
        out[key], offset = read.value(offset + 4, kind)
    return buf, out, offset, tensors


class _Reader:
    """GGUF strings and values at an offset of a mapped file: (value, offset after it)."""

    def __init__(self, buf):
        self.buf = buf

    def string(self, offset: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.buf, offset)
        return self.buf[offset + 8: offset + 8 + n].decode("utf-8", errors="replace"), offset + 8 + n

    def value(self, offset: int, kind: int):
        from gguf import GGUFValueType

        if kind == GGUFValueType.STRING:
            return self.string(offset)
        if kind == GGUFValueType.ARRAY:
            item, n = struct.unpack_from("<IQ", self.buf, offset)
            offset += 12
            if item in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                items = []
                for _ in range(n):
                    v, offset = self.value(offset, item)
                    items.append(v)
                return items, offset
            dtype = _dtype(item)
            return np.frombuffer(self.buf, dtype, n, offset).tolist(), offset + n * dtype.itemsize
        dtype = _dtype(kind)
        return np.frombuffer(self.buf, dtype, 1, offset)[0].item(), offset + dtype.itemsize


def _dtype(kind: int) -> np.dtype:
    from gguf import GGUFReader, GGUFValueType

    return np.dtype(GGUFReader.gguf_scalar_to_np[GGUFValueType(kind)])


def is_sentencepiece(meta: dict) -> bool:
    return meta.get("tokenizer.ggml.model", "llama") == "llama" and "tokenizer.ggml.merges" not in meta


def spm_tokenizer(meta: dict):
    """A fast tokenizer that gives llama.cpp's ids for a SentencePiece (`llama`) GGUF vocabulary, BOS/EOS as the
    file says (`tokenizer.ggml.add_bos_token`, absent: BOS is added, as llama.cpp does for this vocabulary type)."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [int(TokenType.NORMAL)] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores)))

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    unk = token("unknown")
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp puts the space before every piece of text that starts the input or follows a token matched whole;
    # a normalizer runs on exactly those pieces
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPACE)] if space_prefix else []) + [normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    # llama.cpp matches user-defined tokens whole in the raw text, as written (SPACE is not a space there), and
    # control tokens never
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, types) if kind == TokenType.USER_DEFINED])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types) if kind == TokenType.CONTROL])
    bos, eos = token("bos"), token("eos")
    add_bos = bos is not None and bool(meta.get("tokenizer.ggml.add_bos_token", True))
    add_eos = eos is not None and bool(meta.get("tokenizer.ggml.add_eos_token", False))
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=[*single, "$B:1"], special_tokens=[(t, vocab[t]) for t in {bos, eos} - {None}])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=token("padding"), clean_up_tokenization_spaces=False)


def complete_config(config, meta: dict, rope_freqs: np.ndarray | None = None):
    """`config` (transformers' reading of the file) with what llama.cpp also reads from it; refuses a RoPE scaling
    type calq does not carry over. `rope_freqs`: the file's rope_freqs tensor (Llama 3.x), if it has one."""
    arch = meta["general.architecture"]
    if rope_freqs is not None:
        config.rope_parameters.update(llama3_rope(config, rope_freqs))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CalqError(f"the GGUF's RoPE scaling '{scaling}' is not carried into transformers' model by calq "
                        "(it reads 'linear')", "model.id",
                        "use the model's original Hugging Face folder (safetensors and tokenizer.json)")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    linear = {"rope_type": "linear", "factor": float(factor)} if scaling == "linear" and factor else None
    key_length = meta.get(f"{arch}.attention.key_length")
    if key_length and hasattr(config, "head_dim"):  # not mapped for qwen3: its config's default (128) stood
        config.head_dim = key_length
    if config.model_type == "gemma3_text":
        config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads
                                        if config.num_hidden_layers == 62 else config.head_dim)
        if linear:  # llama.cpp scales the global layers' RoPE only (rope_freq_scale_train_swa = 1)
            config.rope_parameters["full_attention"].update(linear)
    elif linear:
        config.rope_parameters.update(linear)
    return config


# Llama 3.1, 3.2 and 3.3 all have these; only `factor` differs (8 or 32)
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope(config, rope_freqs: np.ndarray) -> dict:
    """transformers' llama3 rope_parameters that give the frequencies a GGUF's rope_freqs tensor holds (llama.cpp
    divides each default frequency by it: 1 for high frequencies, `factor` for low ones, smoothed between). Only two
    combinations of the three smoothing parameters matter, so low_freq_factor is taken as 1 and the others solved
    from the smoothed frequencies; with fewer than two of them, Llama 3's own values. Refused unless transformers'
    llama3 frequencies then equal the file's within 1e-4."""
    import copy

    rope = config.rope_parameters
    default = 1.0 / rope["rope_theta"] ** (np.arange(0, _head_dim(config), 2, dtype=np.float64) / _head_dim(config))
    factor = float(rope_freqs.max())
    params = {"rope_type": "llama3", "factor": factor, **LLAMA3_DEFAULTS}
    smooth = (rope_freqs > 1 + 1e-6) & (rope_freqs < factor - 1e-6)
    if smooth.sum() >= 2 and factor > 1:  # s = (1/r - 1/factor) / (1 - 1/factor) = a * inv_freq + b
        s = (1 / rope_freqs[smooth] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(default[smooth], s, 1)
        span = -1 / b  # high - low, with low = 1
        params.update(low_freq_factor=1.0, high_freq_factor=1.0 + span,
                      original_max_position_embeddings=int(round(2 * np.pi * a * span)))
    trial = copy.deepcopy(config)
    trial.rope_parameters = {**rope, **params}
    ratio = llama3_rope_freqs(trial)
    if rope_freqs.shape != ratio.shape or not np.allclose(ratio, rope_freqs, rtol=1e-4):
        raise CalqError("the GGUF's rope_freqs tensor is not a Llama 3 rope scaling that transformers can express",
                        "model.id", "use the model's original Hugging Face folder (safetensors and tokenizer.json)")
    return params


def llama3_rope_freqs(config) -> np.ndarray:
    """The rope_freqs tensor of transformers' llama3 rope parameters in `config`, as convert_hf_to_gguf.py writes it:
    each default rotary frequency over its llama3 one (1 for high frequencies, `factor` for low ones, smoothed
    between); llama.cpp divides by it."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = _head_dim(config)
    default = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (default / scaled).numpy()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

