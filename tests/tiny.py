"""Tiny random causal LMs and a byte-level tokenizer, saved to a folder (llm-compressor reloads configs by path)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# The decoder families the architecture matrix covers (tests/test_architectures.py): transformers config class, and
# what each family's tiny config sets beyond the shared sizes (the features where the families differ).
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    # biases on q/k/v; transformers gives qwen2 folders its Qwen2Tokenizer, which adds <|endoftext|> as token 256: the
    # embedding has spare rows, as Qwen's own do (151,936 rows for 151,665 tokens)
    "qwen2": ("Qwen2Config", {"vocab_size": 288}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "vocab_size": 288}),  # q/k norms
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj
    # sandwich norms, embedding scaling, soft-capping (Gemma 2), q/k norms (Gemma 3), sliding layers, tied output
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                                "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                                    "tie_word_embeddings": True}),
}


# The RoPE scaling of the families' current models, which changes what GGUF must hold: Llama 3.x's llama3 (rope_freqs)
# and the LongRoPE of Phi-3 128k / Phi-3.5 / Phi-4-mini (long and short factors, an attention factor). The original
# length is small so that evaluation windows (64 tokens) pass it: llama3 then rotates low frequencies slower at the
# positions used, and LongRoPE takes its long factors (llama.cpp does when its context, at least 256, passes it).
ROPE_SCALING = {
    "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    "phi3": {"original_max_position_embeddings": 32,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5],
                                 "long_factor": [1.0, 1.1, 1.4, 2.0, 3.5, 6.0, 10.0, 16.0]}},
}


def make_tiny_model(folder: Path, family: str = "llama", hidden: int = 64, layers: int = 2, vocab: int = 256,
                    seed: int = 0, rope_scaling: bool = False, **overrides) -> Path:
    """A random model of `family` (FAMILIES) with 4 heads of 16 (2 key/value heads) and a byte-level tokenizer;
    `rope_scaling`: with the family's ROPE_SCALING; `overrides`: further config fields."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, class_name)(
        hidden_size=hidden, intermediate_size=hidden * 2 + 32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **{"vocab_size": vocab, "tie_word_embeddings": False, **extra,
           **copy.deepcopy(ROPE_SCALING[family] if rope_scaling else {}), **overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_byte_tokenizer(folder, vocab)
    return folder


def make_tiny_llama(folder: Path, hidden: int = 64, layers: int = 2, vocab: int = 256, seed: int = 0) -> Path:
    return make_tiny_model(folder, "llama", hidden, layers, vocab, seed)


def save_byte_tokenizer(folder: Path, vocab: int = 256) -> None:
    """Byte-level tokenizer: every text tokenizes, ids stay below 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_map = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab_map.update({chr(i): i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def train_tiny_llama(folder: Path, text: str, steps: int = 100, lr: float = 3e-3, seed: int = 0) -> Path:
    """Train the tiny model in `folder` for a few steps on `text` (next-token loss on random 64-token windows) and
    save it in place: enough to beat a unigram model of held-out text of the same kind (tests/test_baseline.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - 64, (16,), generator=generator)
        batch = torch.stack([ids[s:s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    return folder


def save_quantized(model, spec: dict, folder: Path, ids: torch.Tensor) -> tuple[Path, torch.Tensor]:
    """`model` quantized in memory by calq's method `spec` (no calibration data) and saved compressed to `folder`:
    (folder, the in-memory quantized model's logits on `ids`)."""
    from calq.quant import llmc, methods

    llmc.quiet_logs(str(Path(folder).parent / f"{Path(folder).name}-llmcompressor.log"))
    methods.config(spec).apply(model.eval(), None)
    model.save_pretrained(folder, save_compressed=True)
    with torch.no_grad():
        return folder, model(input_ids=ids).logits
