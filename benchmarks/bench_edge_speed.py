"""Edge speed on this CPU: file size, load time, prefill and greedy decode tokens/s of the bundled model's variants on
PyTorch eager, ONNX Runtime (calq's decode.onnx, KV cache), llama.cpp (calq's GGUF) and ExecuTorch (calq's model.pte
with its weights model.ptd, XNNPACK, KV-cache method), on one thread and on all, in one process so the ratios share a
load.

    python benchmarks/bench_edge_speed.py --data-dir /work/shared/data --out /tmp/bench-edge [--threads 1,2]

Variants: the baseline (float32) and calq's min-max W4A16 g64 (asymmetric; needs no data), made as
benchmarks/bench_export.py makes them. Artifacts: ONNX (model.onnx + decode.onnx, MatMulNBits with calq's int4,
accuracy_level 0: float32 activations; --accuracy-levels 0,4 adds a graph with int8 activations) and GGUF (baseline
F16; W4A16 as Q4_1 with calq's int4) and ExecuTorch (W4A16 only, --executorch-variants: 8da4w on XNNPACK with calq's
int4; its static KV cache holds --prompt + --new positions, or the reused program's max_seq_len), each exported
once into --out (reused when present). The prompt is the first --prompt tokens of wikitext-2 test. Size: the
artifact's files; load: opening it in its runtime (session or program and method), median over --repeats.

Every runtime runs the same loop: one prefill call over the prompt (logits for every position, as in scoring), then
greedy steps of one token each on its KV cache (PyTorch: transformers' DynamicCache; ONNX Runtime: decode.onnx's
past/present tensors; llama.cpp: its own cache, float16; ExecuTorch: the program's static cache, float32) until --new
tokens. Prefill tok/s = prompt / prefill time;
decode tok/s = the new tokens after the first (which prefill gives) / time of the decode steps. Medians over
--repeats after one warm-up. The load average is recorded before and after each runtime: figures taken at load > 2
(other work on the 2 cores) are inflated, and the JSON says so.
Writes <out>/edge-speed.json and prints a markdown table (BENCHMARKS.md, "Edge speed").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from calq import models
from calq.export import get
from calq.export.executorch import DATA_FILE

try:
    from bench_export import _version, prepare  # same folder: run as `python benchmarks/bench_edge_speed.py`
except ImportError:
    from benchmarks.bench_export import _version, prepare


def timed(run, repeats: int) -> tuple[float, float, list[int]]:
    """One warm-up, then `repeats` runs of `run() -> (prefill seconds, decode seconds, tokens)`: medians, tokens."""
    run()
    prefill, decode = [], []
    for _ in range(repeats):
        p, d, tokens = run()
        prefill.append(p)
        decode.append(d)
    return statistics.median(prefill), statistics.median(decode), tokens


def pytorch_run(model, prompt: torch.Tensor, new: int):
    from transformers import DynamicCache

    def run():
        with torch.no_grad():
            start = time.perf_counter()
            out = model(input_ids=prompt[None], past_key_values=DynamicCache(config=model.config), use_cache=True)
            prefill = time.perf_counter() - start
            tokens, cache = [int(out.logits[0, -1].argmax())], out.past_key_values
            start = time.perf_counter()
            for _ in range(new - 1):
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            return prefill, time.perf_counter() - start, tokens
    return run


def onnx_run(decoder, prompt: torch.Tensor, new: int):
    def run():
        start = time.perf_counter()
        logits, cache = decoder.step(prompt.numpy()[None], None)
        prefill = time.perf_counter() - start
        tokens = [int(logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(new - 1):
            logits, cache = decoder.step(np.array([[tokens[-1]]]), cache)
            tokens.append(int(logits[0, -1].argmax()))
        return prefill, time.perf_counter() - start, tokens
    return run


def llama_run(llm, prompt: torch.Tensor, new: int):
    ids = prompt.tolist()

    def run():
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - start
        tokens = [int(llm.scores[len(ids) - 1].argmax())]
        start = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tokens[-1]])
            tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        return prefill, time.perf_counter() - start, tokens
    return run


def executorch_run(session, prompt: torch.Tensor, new: int):
    def run():
        start = time.perf_counter()
        logits = session.step(prompt[None], 0)
        prefill = time.perf_counter() - start
        tokens = [int(logits[0, -1].argmax())]
        start = time.perf_counter()
        for i in range(new - 1):
            logits = session.step(torch.tensor([[tokens[-1]]]), prompt.numel() + i)
            tokens.append(int(logits[0, -1].argmax()))
        return prefill, time.perf_counter() - start, tokens
    return run


def load_seconds(open_artifact, repeats: int) -> float:
    """Median time to open an artifact in its runtime (the first open, which warms the file cache, not counted)."""
    open_artifact()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        open_artifact()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_once(fmt: str, folder: Path, out: Path, **options) -> dict:
    """The artifact's export.json, exporting first when there is none or it predates the decode graph."""
    info_file = out / "export.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    outdated = fmt in ("onnx", "executorch") and "decode_graph" not in info or (
        fmt == "executorch" and DATA_FILE not in info.get("files", []))  # before the weights moved to model.ptd
    if not info or outdated:
        return get(fmt).export(folder, out, **options)
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-edge"))
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma list of thread counts: each "
                        "artifact is measured on each (default: one, and all of this machine's)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onnx-variants", default="minmax-w4a16-g64", help="comma list; 'baseline' adds ~5 min")
    parser.add_argument("--executorch-variants", default="minmax-w4a16-g64", help="comma list ('' for none)")
    parser.add_argument("--accuracy-levels", default="0", help="comma list of MatMulNBits accuracy_level to measure "
                        "for quantized ONNX variants (4: int8 activations); each level is one more export")
    parser.add_argument("--run", type=Path, help="a finished calq run with an export section: measure its variant "
                        "--variant and its artifacts (RUN/variants/<v>, RUN/export/<v>/<format>) instead of min-max")
    parser.add_argument("--variant", default="awq-w4a16-g64")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calq.export.gguf import LlamaCppSession
    from calq.quant import llmc

    llmc.quiet_logs(str(args.out / "llmcompressor.log"))
    folders = prepare(args.out)
    exports = {name: args.out / "export" / name for name in folders}
    if args.run is not None:
        del folders["minmax-w4a16-g64"], exports["minmax-w4a16-g64"]
        folders[args.variant], exports[args.variant] = args.run / "variants" / args.variant, args.run / "export" / \
            args.variant
        args.onnx_variants = args.onnx_variants.replace("minmax-w4a16-g64", args.variant)
        args.executorch_variants = args.executorch_variants.replace("minmax-w4a16-g64", args.variant)
    tokenizer = AutoTokenizer.from_pretrained(folders["baseline"])
    text = (args.data_dir / "wikitext2/wiki.test.raw").read_text()[: args.prompt * 16]
    prompt = torch.tensor(tokenizer(text).input_ids[: args.prompt])
    source = models.resolve("smollm2-135m")

    rows = []

    def measure(variant, runtime, artifact, threads, run, info=None, load_s=None):
        load_before = os.getloadavg()[0]
        prefill, decode, tokens = timed(run, args.repeats)
        load_after = os.getloadavg()[0]
        rows.append({"variant": variant, "runtime": runtime, "artifact": artifact, "threads": threads,
                     "bytes": (info or {}).get("bytes"), "export_s": (info or {}).get("seconds"), "load_s": load_s,
                     "prefill_tok_s": args.prompt / prefill, "decode_tok_s": (args.new - 1) / decode,
                     "load_before": load_before, "load_after": load_after, "tokens": tokens})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)

    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for threads in thread_counts:
            torch.set_num_threads(threads)
            measure(name, "pytorch eager", "float32 weights (compressed-tensors decompressed)" if name != "baseline"
                    else "float32", threads, pytorch_run(model, prompt, args.new))
        del model
        levels = [int(level) for level in args.accuracy_levels.split(",")] if name != "baseline" else [0]
        for level in levels if name in args.onnx_variants.split(",") else []:
            out = exports[name] / ("onnx" if level == 0 else f"onnx-accuracy-level-{level}")
            info = export_once("onnx", folder, out, accuracy_level=level)
            for threads in thread_counts:
                load_s = load_seconds(lambda: get("onnx").decoder(out, threads=threads), args.repeats)
                decoder = get("onnx").decoder(out, threads=threads)
                measure(name, f"onnxruntime {_version('onnxruntime')}", "decode.onnx " + (
                    f"MatMulNBits int4, accuracy_level {level}" if name != "baseline" else "float32"), threads,
                    onnx_run(decoder, prompt, args.new), info, load_s)
                del decoder
        out = exports[name] / "gguf"
        info = export_once("gguf", folder, out, tokenizer=Path(source.location) / source.gguf_file)
        for threads in thread_counts:
            def open_gguf():
                return LlamaCppSession(out / "model.gguf", threads, n_ctx=args.prompt + args.new)
            load_s = load_seconds(open_gguf, args.repeats)
            session = open_gguf()
            measure(name, f"llama.cpp (llama-cpp-python {_version('llama-cpp-python')})",
                    "GGUF " + ("Q4_1 (calq's int4)" if name != "baseline" else "F16"), threads,
                    llama_run(session.llm, prompt, args.new), info, load_s)
            del session
        if name in args.executorch_variants.split(","):
            out = exports[name] / "executorch"
            info = export_once("executorch", folder, out, max_seq_len=args.prompt + args.new)
            for threads in thread_counts:
                load_s = load_seconds(lambda: get("executorch").session(out, threads=threads), args.repeats)
                session = get("executorch").session(out, threads=threads)
                measure(name, f"executorch {_version('executorch')}",
                        "model.pte + model.ptd, XNNPACK 8da4w (calq's int4)",
                        threads, executorch_run(session, prompt, args.new), info, load_s)
                del session

    add_agreement(rows)
    loads = [r[k] for r in rows for k in ("load_before", "load_after")]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _cpu(), "cores": os.cpu_count(),
            "threads": thread_counts, "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
            "max_load_average": max(loads),
            "inflated": max(loads) > 2,  # other work shared the cores: slower than on an idle machine
            "versions": {p: _version(p) for p in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "gguf",
                                                  "llama-cpp-python", "compressed-tensors", "executorch", "torchao")}}
    (args.out / "edge-speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print(table(rows))


def add_agreement(rows: list[dict]) -> None:
    """Each row's greedy tokens against PyTorch eager's for the same variant: equal, and the first differing step."""
    anchor = {r["variant"]: r["tokens"] for r in rows if r["runtime"] == "pytorch eager"}  # the same on any threads
    for r in rows:
        want = anchor[r["variant"]]
        r["tokens_equal_pytorch"] = r["tokens"] == want
        r["first_token_mismatch"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], want)) if a != b), None)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(rows: list[dict]) -> str:
    """Ratios against PyTorch eager on the same variant and thread count."""
    anchor = {(r["variant"], r["threads"]): r for r in rows if r["runtime"] == "pytorch eager"}
    lines = ["| variant | runtime | artifact | size (MB) | load (s) | threads | prefill tok/s | decode tok/s | "
             "× PyTorch (prefill / decode) | greedy tokens = PyTorch | load avg |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        a = anchor[r["variant"], r["threads"]]
        same = "–" if r is a else "all" if r["tokens_equal_pytorch"] else f"first {r['first_token_mismatch']}"
        size = f"{r['bytes'] / 1e6:.0f}" if r.get("bytes") else "–"
        load = f"{r['load_s']:.2f}" if r.get("load_s") is not None else "–"
        lines.append(f"| {r['variant']} | {r['runtime']} | {r['artifact']} | {size} | {load} | {r['threads']} | "
                     f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['prefill_tok_s'] / a['prefill_tok_s']:.2f} / {r['decode_tok_s'] / a['decode_tok_s']:.2f} | "
                     f"{same} | "
                     f"{r['load_before']:.1f}–{r['load_after']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
