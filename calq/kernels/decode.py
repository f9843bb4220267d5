"""Greedy decoding with a static KV cache, optionally through torch.compile with CUDA graphs, and its speed.

    decoder = Decoder(model, max_len=256, compile=True)
    tokens, seconds = decoder.generate(prompt_ids, new_tokens=128)   # prompt_ids [batch, length]

The model is any transformers causal LM: bf16 nn.Linear, or one whose Linear layers `load_quantized` swapped for
the kernel-backed modules. The static cache keeps every tensor shape fixed from step to step, which is what lets
torch.compile(mode="reduce-overhead") record one CUDA graph per decode step and replay it; without it, launching
a few hundred small kernels per token from Python costs more than the kernels themselves at batch 1.
"""

from __future__ import annotations

import time

import torch


class Decoder:
    """Greedy generation for prompts of up to `max_len` tokens in total (prompt + new tokens)."""

    def __init__(self, model, max_len: int, compile: bool = False):
        from transformers import StaticCache

        self.model, self.max_len = model, max_len
        self.device = model.get_input_embeddings().weight.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.batch: int | None = None
        self.step = self._step
        if compile:
            # Each Decoder's step is the same code guarded on another model and cache: a benchmark making a few
            # of them would hit dynamo's default limit of 8 and fall back to eager without saying so.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    def _step(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens, past_key_values=self.cache, cache_position=position).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
        """Greedy tokens [batch, new_tokens] after `prompt` [batch, length], and the seconds the decode steps took
        (the prefill and the first token are not timed: they are one large forward, not the per-token cost)."""
        batch, length = prompt.shape
        if length + new_tokens > self.max_len:
            raise ValueError(f"prompt ({length}) + new tokens ({new_tokens}) exceed the cache length {self.max_len}")
        if self.batch not in (None, batch):  # the cache's tensors are sized by the first batch
            raise ValueError(f"this Decoder runs batch {self.batch}; make another for batch {batch}")
        self.batch = batch
        self.cache.reset()
        prompt = prompt.to(self.device)
        out = torch.empty(batch, new_tokens, dtype=torch.long, device=self.device)
        out[:, :1] = self._step(prompt, torch.arange(length, device=self.device))
        _synchronize(self.device)
        start = time.perf_counter()
        for i in range(1, new_tokens):
            position = torch.tensor([length + i - 1], device=self.device)
            out[:, i:i + 1] = self.step(out[:, i - 1:i], position)  # copied out: a CUDA graph reuses its output
        _synchronize(self.device)
        return out, time.perf_counter() - start


def tokens_per_second(model, batch: int, prompt_len: int, new_tokens: int, compile: bool = False,
                      seed: int = 0) -> float:
    """Generated tokens per second (all rows together) for random prompts, after one untimed warm-up run of the
    same shape (compilation, CUDA graph capture)."""
    decoder = Decoder(model, prompt_len + new_tokens, compile)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator)
    decoder.generate(prompt, new_tokens)
    _, seconds = decoder.generate(prompt, new_tokens)
    return batch * (new_tokens - 1) / seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
