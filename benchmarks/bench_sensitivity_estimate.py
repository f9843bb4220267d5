"""A cheaper per-layer sensitivity estimate against the sensitivity stage's direct measure, on a finished run.

The direct measure (calq.quant.sensitivity) runs the model once per Linear. The estimate runs it once: each Linear's
relative output error on the calibration samples, ||X (Q(W) - W)^T||² / ||X W^T||², with Q the same round-to-nearest
weight quantization. Printed: Spearman's rank correlation with the direct mean KLD, and the overlap of the top 10.

    python benchmarks/bench_sensitivity_estimate.py --run RUN --scheme w4a16-g64-asym [--json out.json]

RUN is a run folder with a sensitivity stage (RUN/sensitivity/<scheme>.json); the samples and the base model are
read from it (RUN/samples.safetensors; RUN/base_model for a GGUF model, else --model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM

from calq.quant import sensitivity
from calq.quant.minmax import MinMax


def variant_of(scheme: str) -> MinMax:
    """A variant with the weights of a sensitivity table's scheme key (w4a16-g64-asym, w8a8-sym)."""
    parts = scheme.split("-")
    group = {"group_size": int(parts[1][1:])} if parts[0] == "w4a16" else {}
    return MinMax(method="minmax", scheme=parts[0], symmetric=parts[-1] == "sym", **group)


def estimate(model, samples: torch.Tensor, layers: list[str], args) -> dict[str, float]:
    modules = dict(model.named_modules())
    errors, hooks = {}, []
    for name in layers:
        linear = modules[name]
        quantized = sensitivity.fake_quantize(linear.weight.data, args)

        def hook(module, inputs, output, name=name, quantized=quantized):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            diff = x @ (quantized.float() - module.weight.float()).T
            errors[name] = errors.get(name, 0.0) + float(diff.pow(2).sum() / output.float().pow(2).sum())

        hooks.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in samples.split(4):
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--model", help="the base model folder (default: RUN/base_model)")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    table = json.loads((a.run / "sensitivity" / f"{a.scheme}.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(a.model or a.run / "base_model", torch_dtype=torch.float32).eval()
    n, seq = table["samples"]
    samples = load_file(str(a.run / "samples.safetensors"))["input_ids"][:n, :seq]
    layers = list(table["layers"])
    start = time.perf_counter()
    errors = estimate(model, samples, layers, sensitivity.weight_args(variant_of(a.scheme)))
    seconds = time.perf_counter() - start
    direct = [table["layers"][name]["mean_kld"] for name in layers]
    rho = spearmanr(direct, [errors[name] for name in layers]).statistic
    top_direct = set(sorted(layers, key=lambda x: table["layers"][x]["mean_kld"])[-10:])
    top_estimate = set(sorted(layers, key=errors.get)[-10:])
    result = {"scheme": a.scheme, "samples": [n, seq], "layers": len(layers), "spearman": rho,
              "top10_overlap": len(top_direct & top_estimate), "estimate_seconds": round(seconds, 2),
              "direct_seconds": table["seconds"], "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps({**result, "estimate": errors}, indent=1))


if __name__ == "__main__":
    main()
