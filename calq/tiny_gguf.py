"""Tiny GGUF files written with the `gguf` package: random weights, a SentencePiece-style vocabulary built from a text,
tokenizer metadata as llama.cpp's converter writes it. `calq doctor` probes llama.cpp with one; the tests compare
transformers' reading of a GGUF with llama.cpp's on them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

SPACE = "\u2581"  # SentencePiece's visible space


def _vocab(text: str, specials: list[str], words: int) -> tuple[list[str], list[float], list[int]]:
    """Specials, 256 byte tokens, merged pieces (every prefix of the frequent words, BPE-style scores -rank),
    then single characters with score 0 at the end, as in Gemma's vocabulary."""
    from gguf import TokenType

    frequent = [w for w, _ in Counter(text.split()).most_common(words)]
    pieces = Counter()
    for w in frequent:
        word = SPACE + w
        for end in range(2, len(word) + 1):
            pieces[word[:end]] += 1
    chars = sorted(set(text.replace(" ", SPACE).replace("\n", "")) | {SPACE})
    merged = [p for p, _ in pieces.most_common() if p not in chars]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(merged))] + [0.0] * len(chars)
    types = ([TokenType.CONTROL] * len(specials) + [TokenType.BYTE] * 256
             + [TokenType.NORMAL] * (len(merged) + len(chars)))
    types[specials.index("<unk>")] = TokenType.UNKNOWN
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: Path, text: str, arch: str = "llama", add_bos: bool | None = True, hidden: int = 64,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, ffn: int = 128,
                    words: int = 200, sliding_window: int = 16, rope_scaling: float | None = None,
                    seed: int = 0) -> Path:
    """A tiny `llama` or `gemma3` GGUF (float32 tensors). `add_bos=None` leaves `tokenizer.ggml.add_bos_token` out;
    `rope_scaling` writes a linear RoPE scaling factor (Gemma 3 4B and larger have 8)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    if arch == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        bos, eos, pad, unk = 2, 1, 0, 3
    else:
        specials = ["<unk>", "<s>", "</s>"]
        bos, eos, pad, unk = 1, 2, 0, 0
    tokens, scores, types = _vocab(text, specials, words)
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    if rope_scaling:
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
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

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # llama.cpp's Gemma files store 1 + w (its converter adds the 1)
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    writer.add_tensor("token_embd.weight", (0.1 * rng.standard_normal((len(tokens), hidden))).astype(np.float32))
    for i in range(layers):
        block = {"attn_norm": norm(hidden), "attn_q": dense(heads * head_dim, hidden),
                 "attn_k": dense(kv_heads * head_dim, hidden), "attn_v": dense(kv_heads * head_dim, hidden),
                 "attn_output": dense(hidden, heads * head_dim), "ffn_norm": norm(hidden),
                 "ffn_gate": dense(ffn, hidden), "ffn_up": dense(ffn, hidden), "ffn_down": dense(hidden, ffn)}
        if arch == "gemma3":
            block.update({"attn_q_norm": norm(head_dim), "attn_k_norm": norm(head_dim),
                          "post_attention_norm": norm(hidden), "post_ffw_norm": norm(hidden)})
        for name, tensor in block.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor)
    writer.add_tensor("output_norm.weight", norm(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
