"""How far ExecuTorch's 8da4w program will move a W4A16 variant, in a minute instead of a 15-minute export.

XNNPACK runs calq's int4 weights with activations quantized to int8 per token (asymmetric, as torchao's
int8_asym_per_token) and stores the group scales as bfloat16 (calq/export/executorch.py). This script quantizes the
bundled model with each variant (calq's own methods, on WikiText-2 *train* windows), then scores --tokens of
WikiText-2 test in windows of 512 three ways: the variant in PyTorch (the reference the runtime is held to), the same
with every int4 Linear's input quantized to int8 per token, and that with the scales also rounded to bfloat16 (what
XNNPACK does to float32 scales; a no-op for `scale_dtype: bfloat16`). It prints the top-1 agreement of each with the
reference, the figure the `min_deployed_top1_agreement` gate (0.95) reads on the runtime. The last column is what
calq's exporter did before its version 4: the asymmetric layers' zero-point term computed on the float activations,
so it did not cancel their int8 rounding in the (z - 8) s part of the weights.

    python benchmarks/sim_8da4w.py --data-dir ../shared/data \
        --variants '{"method":"minmax","scheme":"w4a16","group_size":64}' \
                   '{"method":"awq","scheme":"w4a16","group_size":64,"max_samples":16,"scale_dtype":"bfloat16"}'

A simulation, not the runtime: one lowered layer on the ExecuTorch runtime matched it to 5e-6 relative, but the
runtime's figure comes from `make demo-edge` (the README's ExecuTorch section has both).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import calq
from calq import models


def int8_per_token(module, args):
    """The 8da4w linear's own activation rounding (torchao's, as its eager IntxUnpackedToInt8Tensor applies it)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    return (_apply_int8_act_asym_per_token_quant_dequant(args[0]),)


def float_correction(module, args, output):
    """The exporter's asymmetric layers: XNNPACK's symmetric product sees the int8 activations, the zero-point term
    (each group's input sum times zero point x scale) the float ones, so the output moves by -(x - x_int8) C^T."""
    x = module.float_input
    group = module.quantization_scheme.weights.group_size
    c = (module.weight_zero_point.float() * module.weight_scale).repeat_interleave(group, dim=1)
    return output - (x - int8_per_token(module, (x,))[0]) @ c.T


def keep_float_input(module, args):
    module.float_input = args[0]


@torch.no_grad()
def top1(model, windows):
    return torch.cat([model(w[None]).logits[0].argmax(-1) for w in windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--variants", nargs="+", required=True, help="calq variant specs as JSON")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 256 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:  # a fresh float model per variant, loaded in a second
        model, tokenizer = models.load(models.resolve("smollm2-135m"))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        train = (args.data_dir / "wikitext2/wikitext2_train_5k_HyperTensor.txt").read_text()
        test = (args.data_dir / "wikitext2/wiki.test.raw").read_text()
        ids = torch.tensor(tokenizer(train[:400_000])["input_ids"])
        starts = torch.randint(0, len(ids) - 256, (args.samples,), generator=torch.Generator().manual_seed(0))
        samples = torch.stack([ids[s:s + 256] for s in starts])
        windows = torch.tensor(tokenizer(test[:30 * args.tokens])["input_ids"])[:args.tokens].view(-1, 512)
        rows = []
        for spec in map(json.loads, args.variants):
            model = models.load(models.resolve(folder))[0]
            start = time.time()
            calq.quantize(model, spec, samples)
            seconds = time.time() - start
            reference = top1(model, windows)
            linears = [m for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and hasattr(m, "quantization_scheme") and n != "lm_head"]
            hooks = [m.register_forward_pre_hook(int8_per_token) for m in linears]
            int8 = top1(model, windows)
            for m in linears:
                m.weight_scale.data = m.weight_scale.data.bfloat16().float()
            int8_bf16 = top1(model, windows)
            for m in linears:
                if not m.quantization_scheme.weights.symmetric:
                    hooks += [m.register_forward_pre_hook(keep_float_input, prepend=True),
                              m.register_forward_hook(float_correction)]
            int8_bf16_correction = top1(model, windows)
            for h in hooks:
                h.remove()
            row = {"variant": spec, "quantize_seconds": round(seconds, 1), "tokens": windows.numel(),
                   "int8_activations": (int8 == reference).float().mean().item(),
                   "int8_activations_bf16_scales": (int8_bf16 == reference).float().mean().item(),
                   "with_float_zero_point_correction": (int8_bf16_correction == reference).float().mean().item()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
