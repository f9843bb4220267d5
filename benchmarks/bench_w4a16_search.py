"""AWQ's grid size against GPTQ on the bundled model: quantize time and divergence from the baseline.

Needs a run folder of the quickstart (its dequantized base model, calibration samples and evaluation tokens):
    python benchmarks/bench_w4a16_search.py --run runs/quickstart [--samples 16] [--tokens 4096]

Each method quantizes a fresh copy of the base model on the first --samples calibration samples (w4a16, groups of 64,
asymmetric: the quickstart's scheme); each result is then scored against the unquantized model on the first --tokens
evaluation tokens (windows of 512, calq.evaluation.tokens.evaluate): mean KLD, same top token, perplexity.
"""

import argparse
import json
import time
from pathlib import Path

from safetensors.torch import load_file

from calq import data as data_mod
from calq import models
from calq.evaluation import tokens as token_eval
from calq.quant.awq import Awq
from calq.quant.gptq import Gptq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results_w4a16_search.json"))
    args = parser.parse_args()

    source = models.resolve(str(args.run / "base_model"))
    samples = load_file(str(args.run / "samples.safetensors"))["input_ids"][:args.samples]
    base, tokenizer = models.load(source, "float32")
    stream = load_file(str(args.run / "eval_tokens.safetensors"))["input_ids"]
    stream = data_mod.windows(stream, 512, models.bos_policy(tokenizer)).flatten()[:args.tokens]
    methods = {"awq n_grid 20": Awq(scheme="w4a16", group_size=64),
               "awq n_grid 10": Awq(scheme="w4a16", group_size=64, n_grid=10),
               "gptq": Gptq(scheme="w4a16", group_size=64)}
    results = {}
    for label, method in methods.items():
        model, _ = models.load(source, "float32")
        started = time.perf_counter()
        method.quantize(model, samples)
        seconds = time.perf_counter() - started
        scored = token_eval.evaluate(model, stream, 512, 4, baseline=base)
        results[label] = {"seconds": round(seconds, 1), "ppl": scored["calibrators"]["none"]["ppl"],
                          "mean_kld": scored["divergence"]["none"]["mean_kld"],
                          "same_top1": scored["divergence"]["none"]["same_top1"]}
        print(label, results[label], flush=True)
    args.json.write_text(json.dumps({"samples": args.samples, "seq_len": samples.shape[1], "tokens": stream.numel(),
                                     "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
