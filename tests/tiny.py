"""A tiny random Llama and tokenizer, saved to a folder (llm-compressor reloads configs by path)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(folder: Path, hidden: int = 64, layers: int = 2, vocab: int = 256, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    # Byte-level tokenizer: every text tokenizes, ids stay below 256.
    vocab_map = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab_map.update({chr(i): i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


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
