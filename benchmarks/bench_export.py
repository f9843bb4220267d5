"""Edge export on the bundled model: export time, size, re-verified accuracy and calibration, CPU speed.

    python benchmarks/bench_export.py --data-dir ../shared/data --out /tmp/bench-export [--formats onnx,gguf,onnx-a8]

For the baseline and a min-max W4A16 g64 variant (calq's own method; needs no data): export to each format, then
on the first `--tokens` tokens of wikitext-2 test (non-overlapping windows of 512) compare the runtime's logits with
the PyTorch variant's (top-1 agreement, perplexity, token ECE, Brier) and time prefill (one 512-token window) and
greedy decode (64 tokens after a 64-token prompt; PyTorch `generate` with its KV cache, llama.cpp one token per
eval). llama.cpp's own Q4_0 quantization of the same model (llama_model_quantize on the F16 GGUF) is the anchor.
Writes results.json and prints the markdown table (benchmarks/EXPORT.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

from calq import models
from calq.export import get, verify
from calq.export.base import directory_size
from calq.quant import llmc, methods

PREFILL, PROMPT, NEW = 512, 64, 64


def prepare(out: Path) -> dict[str, Path]:
    folders = {"baseline": out / "baseline", "minmax-w4a16-g64": out / "minmax-w4a16-g64"}
    if not (folders["baseline"] / "config.json").is_file():
        model, tokenizer = models.load(models.resolve("smollm2-135m"))
        model.save_pretrained(folders["baseline"])
        tokenizer.save_pretrained(folders["baseline"])
    if not (folders["minmax-w4a16-g64"] / "config.json").is_file():
        # llm-compressor reloads the config by the model's path: quantize the saved folder, as calq's pipeline does
        model, tokenizer = models.load(models.ModelSource(str(folders["baseline"]), kind="folder"))
        methods.config({"method": "minmax", "scheme": "w4a16", "group_size": 64}).apply(model, None)
        model.save_pretrained(folders["minmax-w4a16-g64"], save_compressed=True)
        tokenizer.save_pretrained(folders["minmax-w4a16-g64"])
    return folders


def pytorch_speed(model, stream: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        model(input_ids=stream[None, :PREFILL])  # warm-up
        start = time.perf_counter()
        model(input_ids=stream[None, :PREFILL])
        prefill = PREFILL / (time.perf_counter() - start)
        prompt = stream[None, :PROMPT]
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                       do_sample=False)
        decode = NEW / (time.perf_counter() - start)  # includes one prompt pass (64 tokens): a small share
    return prefill, decode


def onnx_prefill(session, stream: torch.Tensor) -> float:
    session.score(stream[None, :PREFILL])
    start = time.perf_counter()
    session.score(stream[None, :PREFILL])
    return PREFILL / (time.perf_counter() - start)


def llama_speed(session, stream: torch.Tensor) -> tuple[float, float]:
    llm = session.llm
    ids = stream[:PREFILL].tolist()
    llm.reset()
    llm.eval(ids)
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = PREFILL / (time.perf_counter() - start)
    llm.reset()
    llm.eval(stream[:PROMPT].tolist())
    token = int(llm.scores[PROMPT - 1].argmax())
    start = time.perf_counter()
    for _ in range(NEW):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    return prefill, NEW / (time.perf_counter() - start)


def row(name, fmt, info, result, prefill, decode, bytes_):
    a = result["artifact"]
    return {"variant": name, "format": fmt, "export_s": info.get("seconds"), "mib": bytes_ / 2**20,
            "top1_agreement": result["top1_agreement"], "max_rel_logit_diff": result["max_rel_logit_diff"],
            "ppl": a["ppl"], "ppl_pytorch": result["reference"]["ppl"], "ece": a["ece"],
            "ece_pytorch": result["reference"]["ece"], "brier": a["brier"], "prefill_tok_s": prefill,
            "decode_tok_s": decode, "changes": info.get("changes")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-export"))
    parser.add_argument("--formats", default="onnx,gguf")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    llmc.quiet_logs(str(args.out / "llmcompressor.log"))
    folders = prepare(args.out)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["baseline"])
    text = (args.data_dir / "wikitext2/wiki.test.raw").read_text()[: args.tokens * 8]
    stream = torch.tensor(tokenizer(text).input_ids[: args.tokens])
    source = models.resolve("smollm2-135m")
    source_gguf = Path(source.location) / source.gguf_file
    rows = []
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        def reference(ids, model=model):
            with torch.no_grad():
                return model(input_ids=ids).logits

        prefill, decode = pytorch_speed(model, stream)
        rows.append({"variant": name, "format": "pytorch", "mib": directory_size(folder) / 2**20,
                     "prefill_tok_s": prefill, "decode_tok_s": decode})
        for fmt in args.formats.split(","):
            if fmt == "onnx-a8" and name == "baseline":
                continue  # accuracy_level only concerns MatMulNBits
            out = args.out / "export" / name / fmt
            # onnx-a8: MatMulNBits with accuracy_level 4 (onnxruntime quantizes activations to int8 per block)
            exporter = get("onnx" if fmt == "onnx-a8" else fmt)
            kwargs = {"tokenizer": source_gguf} if fmt == "gguf" else {"accuracy_level": 4} if fmt == "onnx-a8" else {}
            info = exporter.export(folder, out, **kwargs)
            session = exporter.session(out, threads=args.threads, **({"n_ctx": PREFILL} if fmt == "gguf" else {}))
            result = verify(reference, session.score, stream, seq_len=PREFILL)
            speed = llama_speed(session, stream) if fmt == "gguf" else (onnx_prefill(session, stream), None)
            rows.append(row(name, fmt, info, result, *speed, info["bytes"]))
            print(json.dumps(rows[-1]), flush=True)
            if fmt == "gguf" and name == "baseline":
                rows.append(llama_q4_0_anchor(out, args, reference, stream))
                print(json.dumps(rows[-1]), flush=True)
        del model
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "threads": args.threads, "tokens": int(stream.numel()), "window": PREFILL,
            "versions": {p: _version(p) for p in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime",
                                                  "gguf", "llama-cpp-python", "compressed-tensors")}}
    results = args.out / f"results-{args.formats.replace(',', '-')}.json"
    results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print(table(rows))


def llama_q4_0_anchor(f16_dir: Path, args, reference, stream) -> dict:
    """llama.cpp's own quantizer (llama_model_quantize, type Q4_0) on the baseline's F16 GGUF."""
    import llama_cpp

    from calq.export.gguf import LlamaCppSession

    out = args.out / "export" / "baseline" / "llama-q4_0"
    out.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = args.threads
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(f16_dir / "model.gguf").encode(), str(out / "model.gguf").encode(),
                                          params)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"llama_model_quantize returned {code}")
    session = LlamaCppSession(out / "model.gguf", args.threads, PREFILL)
    result = verify(reference, session.score, stream, seq_len=PREFILL)
    info = {"seconds": seconds, "changes": ["llama.cpp's own Q4_0 round-to-nearest of the F16 baseline"]}
    return row("baseline", "llama.cpp Q4_0 (anchor)", info, result, *llama_speed(session, stream),
               (out / "model.gguf").stat().st_size)


def _version(package: str) -> str:
    try:
        return version(package)
    except ModuleNotFoundError:  # importlib.metadata.PackageNotFoundError
        return "not installed"


def table(rows: list[dict]) -> str:
    def f(value, spec):
        return "–" if value is None else format(value, spec)

    header = ("| variant | artifact | export s | MiB | top-1 agr. | ppl (PyTorch) | token ECE (PyTorch) | Brier | "
              "prefill tok/s | decode tok/s |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['format']} | {f(r.get('export_s'), '.1f')} | {r['mib']:.1f} | "
                     f"{f(r.get('top1_agreement'), '.3f')} | "
                     f"{f(r.get('ppl'), '.2f')} ({f(r.get('ppl_pytorch'), '.2f')})"
                     f" | {f(r.get('ece'), '.4f')} ({f(r.get('ece_pytorch'), '.4f')}) | {f(r.get('brier'), '.4f')} | "
                     f"{f(r.get('prefill_tok_s'), '.0f')} | {f(r.get('decode_tok_s'), '.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
