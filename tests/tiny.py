"""A tiny random Llama and tokenizer, saved to a folder (llm-compressor reloads configs by path)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(folder: Path, hidden: int = 64, layers: int = 2, vocab: int = 256, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
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
