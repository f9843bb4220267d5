"""A size budget's two objectives on the bundled model: `kld` (the summed single-layer KLD) against `ece` (the summed
KLD left after each layer's best global temperature, what a temperature calibrator cannot repair).

    python benchmarks/bench_budget_objective.py --data-dir ../shared/data [--json results.json]

Steps, all on the bundled SmolLM2-135M-Instruct (its GGUF dequantized to float32):
1. the sensitivity table of round-to-nearest W4A16, groups of 32, symmetric (calq.quant.sensitivity.measure, the
   recipe defaults: the first 4 calibration samples x 128 tokens of WikiText-2 train), with both costs per Linear;
2. for each budget (bits per weight of the Linears) and objective, calq.quant.budget.select picks the int8 Linears;
3. each mixed model is built round-to-nearest (4-bit groups of 32, the chosen Linears int8 in blocks of 32: what
   GGUF's Q4_0 / Q8_0 hold), and so is the uniform 4-bit model;
4. every model (and the baseline) gets a global temperature fitted on other WikiText-2 train text (never the
   sensitivity samples), and is scored on the second half of WikiText-2 test: mean KLD from the baseline and same
   top token (uncalibrated), token ECE (15 bins) uncalibrated and with its temperature, perplexity.
The quantization is round-to-nearest for every model, so the comparison isolates the choice of layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from calq import models
from calq.calib.temperature import Temperature, fit_temperature
from calq.evaluation import tokens as token_eval
from calq.quant import budget, sensitivity
from calq.quant.minmax import MinMax
from calq.recipe import SensitivitySpec


def int8_args():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=32)


def build(baseline, names: list[str], promoted: set[str], args4, args8):
    model = copy.deepcopy(baseline)
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        weight.data = sensitivity.fake_quantize(weight.data, args8 if name in promoted else args4)
    return model


def score(model, baseline, fit_windows: torch.Tensor, eval_stream: torch.Tensor, seq_len: int) -> dict:
    with torch.no_grad():
        fit_logits = [(model(input_ids=w[None]).logits[0, :-1], w[1:]) for w in fit_windows]
    t = fit_temperature(fit_logits)
    del fit_logits
    with torch.no_grad():
        result = token_eval.evaluate(model, eval_stream, seq_len, 4, 15, {"none": Temperature(1.0),
                                                                          "temperature": Temperature(t)},
                                     baseline=baseline)
    none, cal = result["calibrators"]["none"], result["calibrators"]["temperature"]
    div = result["divergence"]["none"]
    return {"temperature": t, "mean_kld": div["mean_kld"], "p99_kld": div["p99_kld"], "same_top1": div["same_top1"],
            "ppl": none["ppl"], "ece": none["ece"], "ece_temperature": cal["ece"], "tokens": none["tokens"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 5.5])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--fit-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", type=Path, help="a sensitivity table this script wrote before (skips step 1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    baseline, tokenizer = models.load(models.resolve("smollm2-135m"), "float32")
    baseline.eval()
    train = tokenizer((args.data_dir / "wikitext2" / "wikitext2_train_5k_HyperTensor.txt").read_text(),
                      add_special_tokens=False)["input_ids"]
    spec = SensitivitySpec()
    samples = torch.tensor(train[: spec.samples * 256]).view(spec.samples, 256)[:, : spec.seq_len]
    # temperature fit text: train tokens after the first 64 samples of 256 (none of the sensitivity samples)
    fit = torch.tensor(train[64 * 256: 64 * 256 + args.fit_tokens]).view(-1, 512)
    test = tokenizer((args.data_dir / "wikitext2" / "wiki.test.raw").read_text(), add_special_tokens=False)["input_ids"]
    eval_stream = torch.tensor(test[len(test) // 2: len(test) // 2 + args.eval_tokens])

    scheme = MinMax(method="minmax", scheme="w4a16", group_size=32, symmetric=True)
    shapes, other = budget.footprint(baseline, scheme)
    names = list(shapes)
    if args.table and args.table.is_file():
        table = json.loads(args.table.read_text())
    else:
        table = sensitivity.measure(baseline, samples, names, sensitivity.weight_args(scheme))
        if args.table:
            args.table.write_text(json.dumps(table))
    print(f"sensitivity of {len(names)} Linears on {list(samples.shape)}: {table['seconds']:.0f} s", flush=True)
    kld, tempered = sensitivity.costs(table, "kld"), sensitivity.costs(table, "ece")
    spearman = float(spearmanr([kld[n] for n in names], [tempered[n] for n in names]).statistic)
    print(f"rank correlation of the two costs over the Linears: Spearman {spearman:.3f}; summed KLD "
          f"{sum(kld.values()):.4f}, summed tempered KLD {sum(tempered.values()):.4f}", flush=True)

    args4, args8 = sensitivity.weight_args(scheme), int8_args()
    rows = [{"model": "baseline", **score(baseline, baseline, fit, eval_stream, 512)}]
    rows.append({"model": "4-bit g32 sym (uniform)", "promoted": 0, "bits_per_weight": budget.variant_bytes(
        scheme, shapes) * 8 / sum(n * k for n, k in shapes.values()),
        **score(build(baseline, names, set(), args4, args8), baseline, fit, eval_stream, 512)})
    print(rows[-1], flush=True)
    for bpw in args.budgets:
        variant = MinMax(method="minmax", scheme="w4a16", group_size=32, symmetric=True,
                         budget={"bits_per_weight": bpw})
        chosen = {}
        for objective in ("kld", "ece"):
            chosen[objective] = budget.select(variant, shapes, other, sensitivity.costs(table, objective))
            promoted = set(chosen[objective]["promoted"])
            model = build(baseline, names, promoted, args4, args8)
            rows.append({"model": f"budget {bpw} bits/weight, objective {objective}", "promoted": len(promoted),
                         "bits_per_weight": chosen[objective]["bytes"] * 8 / sum(n * k for n, k in shapes.values()),
                         **score(model, baseline, fit, eval_stream, 512)})
            print(rows[-1], flush=True)
        both = set(chosen["kld"]["promoted"]) & set(chosen["ece"]["promoted"])
        rows[-1]["shared_with_kld"] = len(both)
    result = {"machine": f"{platform.node()} {platform.machine()}", "threads": args.threads, "seed": 0,
              "sensitivity_samples": list(samples.shape), "fit_tokens": int(fit.numel()),
              "eval_tokens": int(eval_stream.numel()), "eval_data": "wiki.test.raw, second half",
              "fit_data": "wikitext2_train_5k_HyperTensor.txt after the first 64 x 256 tokens",
              "sensitivity_seconds": table["seconds"], "spearman": spearman, "seconds": time.perf_counter() - started,
              "rows": rows}
    print("\n| model | int8 Linears | bits/weight | mean KLD | same top token | ppl | ECE | ECE with T | T |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r.get('promoted', '–')} | {r.get('bits_per_weight', 16):.3f} | {r['mean_kld']:.4f} | "
              f"{r['same_top1']:.3f} | {r['ppl']:.2f} | {r['ece']:.4f} | {r['ece_temperature']:.4f} | "
              f"{r['temperature']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
