"""Speed on a CUDA GPU, as ratios taken in one run (`calq bench kernels`, `calq bench decode`).

Kernels: calq's Triton W4A16 and W8A8 products against torch's bf16 linear (cuBLAS), tinygemm int4
(torch.ops.aten._weight_int4pack_mm, the format gpt-fast uses) and torch._int_mm, for Llama-sized (K, N) and M
from batch-1 decode to prefill. Every time is the median over 10 replays of a CUDA graph that calls the product
many times, cycling through copies of the weights that together exceed L2 (`graph_us`): the weights come from
device memory as they would in a model, and Python's launch cost, which a decode step under CUDA graphs does not
pay, stays out (eager do_bench timed it: 51-95 us per call of calq's ops at M = 1, more than the kernels). Before
timing, each product is checked against the float32 product on the same dequantized weights. The device's ceilings (copy
bandwidth, bf16 and int8 matmul rates) are measured first, and each calq kernel's time is also given over its
floor: max(bytes it must move / bandwidth, operations / rate).

Decode: greedy tokens/s with a static KV cache (calq.kernels.decode) for a random Llama-2-7B-shaped model in
bf16 against the same weights min-max quantized to W4A16 and W8A8, or for a saved calq checkpoint against its
own weights decompressed to bf16 (then also: for how many tokens the two greedy outputs agree).
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F

from calq.errors import CalqError

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N) of Llama-style layers
MS = [1, 16, 256, 4096]
PRODUCTS = ["bf16", "w4a16", "tinygemm", "w8a8", "int_mm"]


def require_cuda(command: str) -> None:
    if not torch.cuda.is_available():
        raise CalqError("no CUDA device is visible to torch; this command times GPU kernels", command,
                        "run it on a machine with an NVIDIA GPU (the kernels' correctness tests run anywhere: "
                        "pytest tests/test_kernels.py)")


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copies_beyond_l2(nbytes: int) -> int:
    """How many copies of `nbytes` of weights together take twice the L2 cache (at least 2)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, -(-2 * l2 // nbytes))


def graph_us(calls: list, replay_ms: float = 5.0) -> float:
    """Median microseconds per call: `calls` (one per weight copy) captured round-robin in one CUDA graph of about
    `replay_ms`, replayed 10 times after a warm-up (compilation, allocation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
    torch.cuda.synchronize()
    per_round_ms = max(start.elapsed_time(end), 1e-3)
    rounds = max(1, min(200, round(replay_ms / per_round_ms)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (rounds * len(calls)))
    return statistics.median(times)


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


def _int4_weights(k: int, n: int, group: int):
    """Random int4 weights in the kernel layout, tinygemm's layout, and dequantized bf16."""
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


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def time_shape(k: int, n: int, group: int, ms: list[int], log=print) -> list[dict]:
    """Median microseconds of every product at each M for one (K, N), with the quantized products' errors."""
    from calq.kernels import w4a16, w8a8

    int4 = [_int4_weights(k, n, group) for _ in range(copies_beyond_l2(n * k // 2))]
    dense = [_int4_weights(k, n, group)[1] for _ in range(copies_beyond_l2(n * k * 2))]
    w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies_beyond_l2(n * k))]
    w8_scale = torch.rand(n, device="cuda") * 0.001
    w8_dense = (w8[0].float() * w8_scale[:, None]).to(torch.bfloat16)
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        xq, _ = w8a8.quantize_activations(x)
        calls = {
            "bf16": [lambda w=w: F.linear(x, w) for w in dense],
            "w4a16": [lambda w=w: w4a16.w4a16_linear(x, *w[0], group) for w in int4],
            "tinygemm": [lambda w=w: torch.ops.aten._weight_int4pack_mm(x, w[2][0], group, w[2][1]) for w in int4],
            "w8a8": [lambda w=w: w8a8.w8a8_linear(x, w, w8_scale) for w in w8],
            "int_mm": [lambda w=w: torch._int_mm(xq, w.t()) for w in w8],
        }
        ref4, ref8 = F.linear(x.float(), int4[0][1].float()), F.linear(x.float(), w8_dense.float())
        errors = {"w4a16": _rel_error(calls["w4a16"][0](), ref4), "tinygemm": _rel_error(calls["tinygemm"][0](), ref4),
                  "w8a8": _rel_error(calls["w8a8"][0](), ref8)}
        times = {}
        for name, fns in calls.items():
            try:
                times[name] = graph_us(fns)
            except RuntimeError as err:  # _int_mm wants M > 16; tinygemm has shape limits too
                times[name] = None
                log(f"{name} K={k} N={n} M={m}: n/a ({str(err).splitlines()[0][:80]})")
        rows.append({"K": k, "N": n, "M": m, "group": group, "us": times, "rel_error": errors})
    return rows


def floors_us(row: dict, ceil: dict) -> dict[str, float]:
    k, n, m, g = row["K"], row["N"], row["M"], row["group"]
    w4_bytes = n * k // 2 + (k // g) * n * 3 + m * k * 2 + m * n * 2  # int4 + bf16 scales + uint8 zeros + x + out
    w8_bytes = n * k + n * 4 + m * k * 2 + m * n * 2
    ops = 2 * m * n * k
    return {"w4a16": 1e6 * max(w4_bytes / ceil["bytes_per_s"], ops / ceil["bf16_ops_per_s"]),
            "w8a8": 1e6 * max(w8_bytes / ceil["bytes_per_s"], ops / ceil["int8_ops_per_s"])}


def kernel_tables(rows: list[dict], ceil: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the three kernel tables: times, ratios to bf16, time over floor with errors."""
    label = [f"{r['K']}x{r['N']}" for r in rows]
    times = [[lab, str(r["M"]), *(_fmt(r["us"][c], ".1f") for c in PRODUCTS)] for lab, r in zip(label, rows)]
    # bf16 time / product time: above 1 is faster than cuBLAS bf16, the way the targets are stated
    speedups = [[lab, str(r["M"]), *(_fmt(r["us"]["bf16"] / r["us"][c] if r["us"][c] else None, ".2f")
                                      for c in PRODUCTS[1:])] for lab, r in zip(label, rows)]
    over_floor = [{c: r["us"][c] / f if r["us"][c] else None for c, f in floors_us(r, ceil).items()} for r in rows]
    floors = [[lab, str(r["M"]), _fmt(o["w4a16"], ".2f"), _fmt(o["w8a8"], ".2f"),
               *(f"{r['rel_error'][c]:.1e}" for c in ("w4a16", "tinygemm", "w8a8"))]
              for lab, r, o in zip(label, rows, over_floor)]
    return [("median time (us)", ["K x N", "M", *PRODUCTS], times),
            ("speed-up over bf16 (bf16 time / time; above 1 is faster)", ["K x N", "M", *PRODUCTS[1:]], speedups),
            ("calq kernels: time / floor, and relative error against the float32 product",
             ["K x N", "M", "w4a16", "w8a8", "err w4a16", "err tinygemm", "err w8a8"], floors)]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


# Decode

def random_llama(layers: int, dtype: torch.dtype = torch.bfloat16):
    """Llama-2-7B's shapes (32 layers when `layers` is 32), random weights, on the GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)


def _int4_tensors(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
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


def _int8_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-channel int8 (what calq's minmax-w8a8 saves); activations then get per-token dynamic scales."""
    scale = (weight.float().abs().amax(-1, keepdim=True) / 127.5).clamp(min=1e-8)
    return {"weight": torch.clamp(torch.round(weight.float() / scale), -128, 127).to(torch.int8), "weight_scale": scale}


def quantized_copy(base, scheme: str, group: int):
    """`base` with every decoder Linear min-max quantized to `scheme` and run by the kernels (lm_head stays bf16)."""
    from calq.kernels import W4A16Linear, W8A8Linear

    model = copy.deepcopy(base)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            if scheme == "w4a16":
                new = W4A16Linear.from_checkpoint(_int4_tensors(module.weight, group), group, torch.bfloat16)
            else:
                new = W8A8Linear.from_checkpoint(_int8_tensors(module.weight), torch.bfloat16)
            model.set_submodule(name, new)
    return model


def weight_bytes(model) -> int:
    """Bytes of every weight a decode step reads (the embedding table is not read whole, one row per token)."""
    embedding = model.get_input_embeddings().weight
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not embedding)


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens from the start on which two greedy outputs [batch, n] agree in every row."""
    differ = (a != b).any(0).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1]
