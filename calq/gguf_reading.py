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
  1/sqrt(hidden / heads) for the 62-layer 27B) and the head size of files whose mapping leaves it out (Qwen3).
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
    from gguf import GGUF_MAGIC, GGUFValueType

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version, _, count = struct.unpack_from("<IIQQ", buf, 0)
    if magic != GGUF_MAGIC or version < 2:
        raise CalqError(f"{Path(path).name} is not a GGUF file of version 2 or later (little-endian)", "model.id",
                        "give a GGUF file written by llama.cpp's converter or the gguf package")

    def string(offset: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, offset)
        return buf[offset + 8: offset + 8 + n].decode("utf-8", errors="replace"), offset + 8 + n

    def value(offset: int, kind: int):
        if kind == GGUFValueType.STRING:
            return string(offset)
        if kind == GGUFValueType.ARRAY:
            item, n = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            if item in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                items = []
                for _ in range(n):
                    v, offset = value(offset, item)
                    items.append(v)
                return items, offset
            dtype = _dtype(item)
            return np.frombuffer(buf, dtype, n, offset).tolist(), offset + n * dtype.itemsize
        dtype = _dtype(kind)
        return np.frombuffer(buf, dtype, 1, offset)[0].item(), offset + dtype.itemsize

    out, offset = {}, 24
    for _ in range(count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", buf, offset)
        out[key], offset = value(offset + 4, kind)
    return out


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


def complete_config(config, meta: dict):
    """`config` (transformers' reading of the file) with what llama.cpp also reads from it; refuses a RoPE scaling
    type calq does not carry over."""
    arch = meta["general.architecture"]
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
