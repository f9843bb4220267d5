"""Kernel timings on a CUDA GPU: calq's Triton W4A16 and W8A8 products against torch's bf16 linear,
tinygemm int4 (torch.ops.aten._weight_int4pack_mm) and torch._int_mm, for Llama-sized (K, N) and M from
batch-1 decode to prefill.

    python benchmarks/bench_kernels.py [--group-size 128] [--json results.json]

Every time is the median of triton.testing.do_bench (after its warm-up; it clears L2 before each call, so the
weights come from device memory as they would in a model). Before timing, each kernel's output is checked
against the bf16 product on the same dequantized weights. The device's two ceilings (copy bandwidth, bf16 and
int8 matmul rates) are measured first, and the last table gives each calq kernel's time over its floor:
max(bytes it must move / bandwidth, operations / rate).

Columns: bf16 = F.linear on the dequantized bf16 weight; w4a16 = calq::w4a16_linear; tinygemm = aten int4
(weights only, the format gpt-fast uses); w8a8 = calq::w8a8_linear including activation quantization;
int_mm = torch._int_mm on pre-quantized int8 activations (the bare int8 product, no scales; M > 16 only).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N)
MS = [1, 16, 256, 4096]


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul rates (operations per second), measured."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = median_ms(lambda: dst.copy_(src)) / 1e3
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    bf16_s = median_ms(lambda: a @ a) / 1e3
    i8 = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda")
    int8_s = median_ms(lambda: torch._int_mm(i8, i8.t())) / 1e3
    return {"bytes_per_s": 2 * src.numel() * 4 / copy_s, "bf16_ops_per_s": 2 * 8192**3 / bf16_s,
            "int8_ops_per_s": 2 * 8192**3 / int8_s}


def int4_weights(k: int, n: int, group: int):
    """Random int4 weights in the checkpoint layout, the kernel layout, tinygemm's layout, and dequantized bf16."""
    from calq.kernels import w4a16

    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")  # unsigned, as stored
    scale = torch.rand(n, k // group, device="cuda") * 0.004 + 0.001
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.int32, device="cuda")
    packed, zero_packed = w4a16.pack_int4(q), w4a16.pack_int4(zero.t()).t()  # as compressed-tensors saves them
    ours = w4a16.repack(packed, scale, zero_packed, group, torch.bfloat16)
    dense = w4a16.dequantize(packed, scale, zero_packed, group).to(torch.bfloat16)

    # tinygemm computes w = (q - 8) * scale + zero_value per group
    tg_weight = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    zero_value = (8 - zero.float()) * scale
    tg_scales = torch.stack([scale, zero_value], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return ours, dense, (tg_weight, tg_scales)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(k: int, n: int, group: int, ms: list[int]) -> list[dict]:
    import torch.nn.functional as F

    from calq.kernels import w4a16, w8a8

    (qweight, scales, zeros), dense, (tg_weight, tg_scales) = int4_weights(k, n, group)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    w8_scale = torch.rand(n, device="cuda") * 0.001
    w8_dense = (w8.float() * w8_scale[:, None]).to(torch.bfloat16)
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        xq, _ = w8a8.quantize_activations(x)
        calls = {
            "bf16": lambda: F.linear(x, dense),
            "w4a16": lambda: w4a16.w4a16_linear(x, qweight, scales, zeros, group),
            "tinygemm": lambda: torch.ops.aten._weight_int4pack_mm(x, tg_weight, group, tg_scales),
            "w8a8": lambda: w8a8.w8a8_linear(x, w8, w8_scale),
            "int_mm": lambda: torch._int_mm(xq, w8.t()),
        }
        ref4, ref8 = F.linear(x.float(), dense.float()), F.linear(x.float(), w8_dense.float())
        errors = {"w4a16": rel_error(calls["w4a16"](), ref4), "tinygemm": rel_error(calls["tinygemm"](), ref4),
                  "w8a8": rel_error(calls["w8a8"](), ref8)}
        times = {}
        for name, fn in calls.items():
            try:
                times[name] = median_ms(fn) * 1e3
            except RuntimeError as err:  # _int_mm wants M > 16; tinygemm has shape limits too
                times[name] = None
                print(f"  {name} K={k} N={n} M={m}: n/a ({str(err).splitlines()[0][:80]})", file=sys.stderr)
        rows.append({"K": k, "N": n, "M": m, "group": group, "us": times, "rel_error": errors})
    return rows


def floors_us(row: dict, ceil: dict) -> dict[str, float]:
    k, n, m, g = row["K"], row["N"], row["M"], row["group"]
    w4_bytes = n * k // 2 + (k // g) * n * 3 + m * k * 2 + m * n * 2  # int4 + bf16 scales + uint8 zeros + x + out
    w8_bytes = n * k + n * 4 + m * k * 2 + m * n * 2
    ops = 2 * m * n * k
    return {"w4a16": 1e6 * max(w4_bytes / ceil["bytes_per_s"], ops / ceil["bf16_ops_per_s"]),
            "w8a8": 1e6 * max(w8_bytes / ceil["bytes_per_s"], ops / ceil["int8_ops_per_s"])}


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (tinygemm takes 32-256)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py times CUDA kernels and no CUDA device is visible: run it on a machine with a GPU "
                 "(the kernels' correctness tests run anywhere: pytest tests/test_kernels.py)")

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, group size {args.group_size}")
    ceil = ceilings()
    print(f"ceilings: copy {ceil['bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_ops_per_s'] / 1e12:.0f} TFLOP/s, "
          f"int8 {ceil['int8_ops_per_s'] / 1e12:.0f} TOP/s")
    rows = [row for k, n in SHAPES for row in bench_shape(k, n, args.group_size, MS)]

    names = ["bf16", "w4a16", "tinygemm", "w8a8", "int_mm"]
    label = [f"{r['K']}x{r['N']}" for r in rows]
    table("median time (us)", ["K x N", "M", *names],
          [[lab, str(r["M"]), *(fmt(r["us"][c], ".1f") for c in names)] for lab, r in zip(label, rows)])
    table("time / bf16 time (below 1 is faster)", ["K x N", "M", *names[1:]],
          [[lab, str(r["M"]), *(fmt(r["us"][c] / r["us"]["bf16"] if r["us"][c] else None, ".2f") for c in names[1:])]
           for lab, r in zip(label, rows)])
    over_floor = [{c: r["us"][c] / f if r["us"][c] else None for c, f in floors_us(r, ceil).items()} for r in rows]
    table("calq kernels: time / floor, and rel. error vs the bf16 product",
          ["K x N", "M", "w4a16", "w8a8", "err w4a16", "err tinygemm", "err w8a8"],
          [[lab, str(r["M"]), fmt(o["w4a16"], ".2f"), fmt(o["w8a8"], ".2f"),
            *(f"{r['rel_error'][c]:.1e}" for c in ("w4a16", "tinygemm", "w8a8"))]
           for lab, r, o in zip(label, rows, over_floor)])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ceilings": ceil, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
