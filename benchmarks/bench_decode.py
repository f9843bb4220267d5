"""Batch-1 greedy decode speed (tokens/s) with a static KV cache, on a random Llama-2-7B-shaped model:
bf16 nn.Linear against calq's W4A16Linear and W8A8Linear (min-max quantized from the same random weights).

    python benchmarks/bench_decode.py [--layers 32] [--prompt 128] [--tokens 128] [--compile]

The prompt is prefilled once (untimed); the timed part is `--tokens` single-token steps, after one untimed warm-up
run of the same length (compilation, graph capture). With --compile each step runs through
torch.compile(mode="reduce-overhead"), i.e. CUDA graphs: without it, eager launch overhead dominates at batch 1.
The last column is the bytes of all weights read per token (the floor of a decode step) times tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch


def random_model(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)


def int4_tensors(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric min-max int4 in the compressed-tensors checkpoint layout (what calq's minmax-w4a16 saves)."""
    from calq.kernels.w4a16 import pack_int4

    n, k = weight.shape
    groups = weight.float().reshape(n, k // group, group)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-8)
    zero = torch.clamp(torch.round(-low / scale), 0, 15)  # unsigned, z + 8
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 15).reshape(n, k)
    return {"weight_packed": pack_int4(q), "weight_scale": scale.to(weight.dtype),
            "weight_zero_point": pack_int4(zero.t()).t()}


def int8_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-channel int8 (what calq's minmax-w8a8 saves); activations then get per-token dynamic scales."""
    scale = (weight.float().abs().amax(-1, keepdim=True) / 127.5).clamp(min=1e-8)
    return {"weight": torch.clamp(torch.round(weight.float() / scale), -128, 127).to(torch.int8), "weight_scale": scale}


def quantized(base, variant: str, group: int):
    from calq.kernels import W4A16Linear, W8A8Linear

    model = copy.deepcopy(base)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            if variant == "w4a16":
                new = W4A16Linear.from_checkpoint(int4_tensors(module.weight, group), group, torch.bfloat16)
            else:
                new = W8A8Linear.from_checkpoint(int8_tensors(module.weight), torch.bfloat16)
            model.set_submodule(name, new)
    return model


def weight_bytes(model) -> int:
    embedding = model.get_input_embeddings().weight  # a step reads one row of it, not all
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not embedding)


@torch.no_grad()
def decode(model, cache, prompt: torch.Tensor, tokens: int, step) -> float:
    """Seconds for `tokens` decode steps after prefilling `prompt`."""
    cache.reset()
    length = prompt.shape[1]
    logits = model(prompt, past_key_values=cache, cache_position=torch.arange(length, device="cuda")).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(tokens):
        token = step(token, cache, torch.tensor([length + i], device="cuda")).clone()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def tokens_per_second(model, prompt_len: int, tokens: int, compile: bool) -> float:
    from transformers import StaticCache

    def step(token, cache, position):
        logits = model(token, past_key_values=cache, cache_position=position).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    if compile:
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + tokens)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
    decode(model, cache, prompt, tokens, step)  # warm-up
    return tokens / decode(model, cache, prompt, tokens, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 as Llama-2-7B; fewer: quick look)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens, prefilled untimed")
    parser.add_argument("--tokens", type=int, default=128, help="timed decode steps")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--variants", default="bf16,w4a16,w8a8")
    parser.add_argument("--compile", action="store_true", help="torch.compile each step with CUDA graphs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py times decoding on a CUDA GPU and no CUDA device is visible: run it on a machine "
                 "with a GPU")

    base = random_model(args.layers)
    print(f"device: {torch.cuda.get_device_name()}, {args.layers} layers, prompt {args.prompt}, "
          f"{args.tokens} tokens, compile={args.compile}")
    print(f"{'variant':>8}  {'tokens/s':>9}  {'ms/token':>9}  {'weights GB':>10}  {'GB/s':>7}")
    for variant in args.variants.split(","):
        model = base if variant == "bf16" else quantized(base, variant, args.group_size)
        rate = tokens_per_second(model, args.prompt, args.tokens, args.compile)
        gb = weight_bytes(model) / 1e9
        print(f"{variant:>8}  {rate:9.1f}  {1e3 / rate:9.2f}  {gb:10.2f}  {gb * rate:7.0f}", flush=True)
        if model is not base:
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
