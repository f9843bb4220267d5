"""Launch configurations of calq's decode-path kernels (M <= 16) on a CUDA GPU: every configuration of
`calq.kernels.w4a16.DECODE` / `w8a8.DECODE` below, timed on the Llama-sized layers of `calq bench kernels` at M = 1
and 16 (CUDA-graph replay over weight copies beyond L2: `bench.graph_us`), each checked against the float32
product first. Prints the best configuration per case and the best single one (geometric mean of time over bf16),
and writes everything to --json.

    python benchmarks/sweep_kernels.py --json sweep.json [--apply]   # --apply: then run `calq bench decode` with
                                                                       # the winners (batch 1, random Llama-2-7B)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

from calq.kernels import bench, w4a16, w8a8

W4A16_CONFIGS = [dict(BN=bn, warps=w, stages=s, per_sm=p)
                 for bn, (w, s), p in itertools.product((32, 64, 128), ((4, 4), (8, 4)), (1, 2, 4))]
W8A8_CONFIGS = [dict(BN=bn, BK=bk, warps=w, stages=s, per_sm=p)
                for bn, bk, (w, s), p in itertools.product((32, 64, 128), (128,), ((4, 4), (8, 4)), (1, 2, 4))]
GROUP = 128


def sweep(ms: list[int]) -> dict:
    cases = []
    for (k, n), m in itertools.product(bench.SHAPES, ms):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        int4 = [bench._int4_weights(k, n, GROUP)[:2] for _ in range(bench.copies_beyond_l2(n * k // 2))]
        dense = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
                 for _ in range(bench.copies_beyond_l2(n * k * 2))]
        w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
              for _ in range(bench.copies_beyond_l2(n * k))]
        w8_scale = torch.rand(n, device="cuda") * 0.001
        case = {"K": k, "N": n, "M": m, "bf16": bench.graph_us([lambda w=w: F.linear(x, w) for w in dense]),
                "w4a16": [], "w8a8": []}
        ref4 = F.linear(x.float(), int4[0][1].float())
        ref8 = F.linear(x.float(), (w8[0].float() * w8_scale[:, None]))
        for cfg in W4A16_CONFIGS:
            w4a16.DECODE.update(cfg)
            case["w4a16"].append(measure(cfg, lambda w: w4a16.w4a16_linear(x, *w[0], GROUP), int4, ref4))
        for cfg in W8A8_CONFIGS:
            w8a8.DECODE.update(cfg)
            case["w8a8"].append(measure(cfg, lambda w: w8a8.w8a8_linear(x, w, w8_scale), w8, ref8))
        cases.append(case)
        best = {s: min(r["us"] for r in case[s]) for s in ("w4a16", "w8a8")}
        print(f"K={k} N={n} M={m}: bf16 {case['bf16']:.1f} us, best w4a16 {best['w4a16']:.1f}, "
              f"best w8a8 {best['w8a8']:.1f}", flush=True)
    return {"cases": cases, "best": {s: best_overall(cases, s) for s in ("w4a16", "w8a8")}}


def measure(cfg: dict, product, weights: list, ref: torch.Tensor) -> dict:
    """One configuration's error and graph-replay time; infinite time when it does not fit (shared memory)."""
    from triton.runtime.errors import OutOfResources

    try:
        err = bench._rel_error(product(weights[0]), ref)
        us = bench.graph_us([lambda w=w: product(w) for w in weights], replay_ms=2)
    except OutOfResources:
        err, us = float("inf"), float("inf")
    return {"cfg": dict(cfg), "us": us, "err": err}


def best_overall(cases: list[dict], scheme: str) -> dict:
    """The configuration with the lowest geometric mean of time / bf16 time over all cases (errors under 2e-2)."""
    scores = []
    for i, row in enumerate(cases[0][scheme]):
        if any(c[scheme][i]["err"] > 2e-2 for c in cases):
            continue
        logs = [math.log(c[scheme][i]["us"] / c["bf16"]) for c in cases]
        scores.append((math.exp(sum(logs) / len(logs)), row["cfg"]))
    ratio, cfg = min(scores, key=lambda s: s[0])
    return {"cfg": cfg, "geomean_time_over_bf16": ratio}


def table(result: dict) -> str:
    best = result["best"]
    lines = ["| K x N | M | bf16 us | w4a16 us (best here) | w4a16 us (chosen) | w8a8 us (best here) "
             "| w8a8 us (chosen) |", "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        cells = [f"{c['K']}x{c['N']}", str(c["M"]), f"{c['bf16']:.1f}"]
        for s in ("w4a16", "w8a8"):
            here = min(c[s], key=lambda r: r["us"])
            chosen = next(r for r in c[s] if r["cfg"] == best[s]["cfg"])
            cells += [f"{here['us']:.1f} {here['cfg']}", f"{chosen['us']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--apply", action="store_true")
    args = parser.parse_args()
    bench.require_cuda("benchmarks/sweep_kernels.py")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    result = sweep([int(v) for v in args.m.split(",")])
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print("chosen:", json.dumps(result["best"]))
    if args.apply:
        w4a16.DECODE.update(result["best"]["w4a16"]["cfg"])
        w8a8.DECODE.update(result["best"]["w8a8"]["cfg"])
        from calq.cli import app

        app(["bench", "decode", "--layers", "32", "--batch", "1"], standalone_mode=False)


if __name__ == "__main__":
    main()
