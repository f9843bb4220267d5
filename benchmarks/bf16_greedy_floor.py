"""How far greedy decoding of one quantized checkpoint agrees with itself between bf16 and float32 (CPU, no kernels).

The bundled model is min-max quantized by calq (w8a8 with dynamic per-token activations; w4a16 group 64), saved, and
decoded by transformers' decompressed model in float32 and in bf16, 64 greedy tokens from the prompt of
tests/test_kernels.py's GPU test. Where they part, it prints the float32 top-2 logit gap and the largest logit
difference between the two dtypes: the precision floor any bf16 comparison of the kernels runs into.

    python benchmarks/bf16_greedy_floor.py OUT_FOLDER
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

import calq
from calq import models
from calq.kernels.bench import agreeing_prefix
from calq.kernels.decode import Decoder

PROMPT = "The history of the city begins in the Middle Ages, when"
SCHEMES = {"w8a8": {"dynamic_activations": True}, "w4a16": {"group_size": 64}}


def main(out: str) -> None:
    for scheme, spec in SCHEMES.items():
        model, tokenizer = models.load(models.resolve("smollm2-135m"), "float32")
        calq.quantize(model, {"method": "minmax", "scheme": scheme, **spec})
        model.save_pretrained(f"{out}/{scheme}", save_compressed=True)
        prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
        length = prompt.shape[1] + 64
        runs = {}
        for dtype in (torch.float32, torch.bfloat16):
            decompressed = AutoModelForCausalLM.from_pretrained(f"{out}/{scheme}", dtype=dtype).eval()
            runs[dtype] = (decompressed, Decoder(decompressed, length).generate(prompt, 64)[0])
        tokens32, tokens16 = runs[torch.float32][1], runs[torch.bfloat16][1]
        n = agreeing_prefix(tokens32, tokens16)
        line = f"{scheme}: bf16 and float32 greedy tokens of the same decompressed model agree for the first {n} of 64"
        if n < 64:
            ids = torch.cat([prompt, tokens32[:, :n]], 1)
            with torch.no_grad():
                l32 = runs[torch.float32][0](ids).logits[0, -1].float()
                l16 = runs[torch.bfloat16][0](ids).logits[0, -1].float()
            top = l32.topk(2).values
            line += (f"; at token {n}: float32 top-2 logit gap {float(top[0] - top[1]):.3f}, "
                     f"max |logit difference| bf16 vs float32 {float((l32 - l16).abs().max()):.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
