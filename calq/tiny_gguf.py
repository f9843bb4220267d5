"""Tiny GGUF files written with the `gguf` package: random weights, a vocabulary built from a text (SentencePiece-style
for `llama` and `gemma3`, byte-level BPE trained with the `tokenizers` package for `qwen2` and `qwen3`), tokenizer
metadata as llama.cpp's converter writes it. `calq doctor` probes llama.cpp with one; the tests compare
transformers' reading of a GGUF with llama.cpp's on them.
"""

from __future__ import annotations

import itertools
import json
import string
from collections import Counter
from pathlib import Path

import numpy as np

SPACE = "\u2581"  # SentencePiece's visible space


def _vocab(text: str, specials: list[str], words: int, size: int | None,
           user_defined: list[str]) -> tuple[list[str], list[float], list[int]]:
    """Specials, 256 byte tokens, merged pieces (every prefix of the frequent words, BPE-style scores -rank), then
    lowercase letter pairs, triples, ... scored below them up to `size` tokens, then user-defined pieces and single
    characters with score 0 at the end, as in Gemma's vocabulary."""
    from gguf import TokenType

    frequent = [w for w, _ in Counter(text.split()).most_common(words)]
    pieces = Counter()
    for w in frequent:
        word = SPACE + w
        for end in range(2, len(word) + 1):
            pieces[word[:end]] += 1
    chars = sorted(set(text.replace(" ", SPACE).replace("\n", "")) | {SPACE})
    merged = [p for p, _ in pieces.most_common() if p not in chars]
    if size is not None:
        fixed = len(specials) + 256 + len(user_defined) + len(chars)
        known = set(merged) | set(chars)
        fill = (p for n in itertools.count(2) for p in map("".join, itertools.product(string.ascii_lowercase, repeat=n))
                if p not in known)
        merged += list(itertools.islice(fill, max(0, size - fixed - len(merged))))
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + merged + user_defined + chars
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(merged))] + [0.0] * (
        len(user_defined) + len(chars))
    types = ([TokenType.CONTROL] * len(specials) + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(merged)
             + [TokenType.USER_DEFINED] * len(user_defined) + [TokenType.NORMAL] * len(chars))
    types[specials.index("<unk>")] = TokenType.UNKNOWN
    return tokens, scores, [int(t) for t in types]


# Qwen2's pre-tokenizer (llama.cpp's `qwen2`, transformers' Qwen2Converter): the tiny BPE vocabulary is trained on it
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bpe_vocab(text: str, size: int) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary (tokens, merges "a b", token types) trained on `text`, Qwen's specials last."""
    from gguf import TokenType
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + QWEN_SPECIALS
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [TokenType.NORMAL] * (len(tokens) - len(QWEN_SPECIALS)) + [TokenType.CONTROL] * len(QWEN_SPECIALS)
    return tokens, merges, [int(t) for t in types]


def write_tiny_gguf(path: Path, text: str, arch: str = "llama", add_bos: bool | None = True, hidden: int = 64,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, ffn: int = 128,
                    words: int = 200, vocab_size: int | None = None, user_defined: tuple[str, ...] = (),
                    sliding_window: int = 16, rope_freq_base: float = 10000.0, rope_scaling: float | None = None,
                    rope_freqs: np.ndarray | None = None, seed: int = 0) -> Path:
    """A tiny `llama`, `gemma3`, `qwen2` or `qwen3` GGUF (float32 tensors, the embedding float16). `add_bos=None`
    leaves `tokenizer.ggml.add_bos_token` out; `vocab_size` pads a SentencePiece vocabulary to that many tokens (Gemma
    3: 262,144) or sizes the BPE one; `user_defined` adds SentencePiece user-defined pieces; `rope_scaling` writes a
    linear RoPE scaling factor (Gemma 3 4B and larger have 8); `rope_freqs` a rope_freqs tensor (Llama 3.x: what each
    rotary frequency is divided by)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    if arch in ("qwen2", "qwen3"):
        tokens, merges, types = _bpe_vocab(text, vocab_size or 1000)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(bool(add_bos))  # Qwen's converted files say false
    else:
        specials, (bos, eos, pad, unk) = ((["<pad>", "<eos>", "<bos>", "<unk>"], (2, 1, 0, 3)) if arch == "gemma3"
                                          else (["<unk>", "<s>", "</s>"], (1, 2, 0, 0)))
        tokens, scores, types = _vocab(text, specials, words, vocab_size, list(user_defined))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(eos)
        writer.add_unk_token_id(unk)
        writer.add_pad_token_id(pad)
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
        writer.add_add_space_prefix(arch != "gemma3")
    writer.add_name("tiny")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_vocab_size(len(tokens))
    if rope_scaling:
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(sliding_window)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # llama.cpp's Gemma files store 1 + w (its converter adds the 1)
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    writer.add_tensor("token_embd.weight", (0.1 * rng.standard_normal((len(tokens), hidden))).astype(np.float16))
    for i in range(layers):
        block = {"attn_norm.weight": norm(hidden), "attn_q.weight": dense(heads * head_dim, hidden),
                 "attn_k.weight": dense(kv_heads * head_dim, hidden),
                 "attn_v.weight": dense(kv_heads * head_dim, hidden),
                 "attn_output.weight": dense(hidden, heads * head_dim), "ffn_norm.weight": norm(hidden),
                 "ffn_gate.weight": dense(ffn, hidden), "ffn_up.weight": dense(ffn, hidden),
                 "ffn_down.weight": dense(hidden, ffn)}
        if arch in ("gemma3", "qwen3"):
            block.update({"attn_q_norm.weight": norm(head_dim), "attn_k_norm.weight": norm(head_dim)})
        if arch == "gemma3":
            block.update({"post_attention_norm.weight": norm(hidden), "post_ffw_norm.weight": norm(hidden)})
        if arch == "qwen2":
            block.update({f"attn_{x}.bias": 0.1 * dense(1, n)[0] for x, n in
                          (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim))})
        for name, tensor in block.items():
            writer.add_tensor(f"blk.{i}.{name}", tensor)
    writer.add_tensor("output_norm.weight", norm(hidden))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
