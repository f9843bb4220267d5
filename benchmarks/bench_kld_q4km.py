"""Divergence from the baseline on llama.cpp (issue 27's measurement method): the bundled model's unquantized baseline
exported as F16 GGUF, quantized by llama.cpp itself (llama_model_quantize) to Q4_0 and Q4_K_M, and calq's AWQ and
GPTQ W4A16 g64 exported as GGUF; each scored by llama.cpp on the same held-out tokens and compared with the F16
baseline.

    python benchmarks/bench_kld_q4km.py --data-dir /work/shared/data --out /tmp/bench-kld \
        [--awq RUN/variants/awq-w4a16-g64]

Tokens: --tokens (1,024) tokens from the start of the second half of WikiText-2 test (wiki.test.raw, cut at the
middle character), in windows of --ctx (512) scored from their start, logits for every position (logits_all). Each
GGUF is run in a child process that writes its log-probabilities to --out; per token: KL(F16 || artifact), whether the
top token is the same, and the log-probability of the next token (perplexity over every position but a window's last).
AWQ and GPTQ: calq's methods on --samples (16, as recipes/quickstart.yaml's AWQ) samples of 256 tokens from the start
of WikiText-2 *train* (never the evaluation text), exported by calq's GGUF writer (Q4_1: calq's int4 values, scales and
zero points). AWQ's grid search takes long on a busy CPU: --awq takes an existing calq variant instead, a checkpoint
folder (a run's RUN/variants/awq-w4a16-g64, e.g. from `calq run recipes/quickstart.yaml`) or a GGUF calq exported from
one without a calibrator.
Mixed precision (`--variants gptq-w4a16-g32-sym-mixed,gptq-w4a16-g32-mixed`): GPTQ W4A16 g32 with Q4_K_M's own choice
of higher-precision layers held at int8 (every attn_v, the ffn_down of llama.cpp's `use_more_bits` layers) and the
tied embedding / output head at int8 (Q8_0 layout): one compressed-tensors checkpoint, one GGUF with per-tensor types.
5-bit groups (`--variants minmax-w5a16-g32-sym-int8emb,minmax-w5a16-g32-sym-int8v`): symmetric 5-bit groups of 32
(`bits: 5`) -> Q5_0, the embedding as Q8_0 (and every attn_v at int8 in the second); `-int4emb`: the embedding as
Q4_0 (`embedding: int4`), alone or under the same budget (`-int4emb-budget`), or chosen by the budget with the
Linears (`-autoemb-budget`, `embedding: auto`: the embedding's own sensitivity table, sensitivity-embedding.json).
Three levels (`--variants gptq-w5a16-g32-sym-budget,minmax-w5a16-g32-sym-budget`): the 5-bit variant with a budget
at Q4_K_M's size and `demote: true`; the script measures calq's two sensitivity tables on the first calibration samples
(kept in --out as sensitivity-<scheme>.json and reused) and writes calq's choice to budget-<variant>.json
(`gptq-w5a16-g32-sym-3level` is a mix picked by hand). --samples sets GPTQ's calibration samples (16; 64 beats Q4_K_M).
--onnx adds each calq variant exported to ONNX (MatMulNBits bits 4 and 8, 5-bit groups stored as bits 8, the int8
embedding dequantized in the graph; scales as float16 unless --onnx-scale-dtype float32), scored by ONNX Runtime on
the same windows; its size is model.onnx + model.onnx.data. For ONNX at Q4_K_M's size, the two-level variants
(`--variants gptq-w4a16-g32-sym-budget --onnx`): 4-bit groups and int8 Linears chosen by calq's budget.
--gguf NAME=PATH scores a GGUF calq already exported (a run's RUN/export/<variant>/gguf/model.gguf: its calibrator
folded in, so its KLD is the calibrated file's from the uncalibrated F16), and --onnx-dir NAME=FOLDER an ONNX export
(a run's RUN/export/<variant>/onnx: its `logits` output, the calibrator fused); `--variants ""` scores only those.
Each calq file's mean KLD is also compared with Q4_K_M's on the same positions (`vs_q4km`: the difference and a 95%
block-bootstrap interval over blocks of 64 positions), so a small gap is not read as a win or a loss.
Writes <out>/kld-q4km.json and prints a markdown table (BENCHMARKS.md, "Divergence from the baseline").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from calq import models
from calq.export import get
from calq.quant import budget, llmc, methods, sensitivity
from calq.recipe import SensitivitySpec


def more_bits(layers: int) -> list[int]:
    """The layers where llama.cpp's Q4_K_M gives attn_v and ffn_down more bits (llama-quant.cpp's `use_more_bits`):
    the first and last eighth, and every third layer between. On the bundled model (30 layers) 14 of them; its Q4_K_M
    file holds those attn_v as Q8_0 and those ffn_down as Q6_K (checked with gguf's reader)."""
    return [i for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2]


# Q4_K_M's own choice of layers, held at int8 (W8A16) by calq: every attn_v (cheap: 576 x 192) and the ffn_down of
# `more_bits`; the embedding (tied to the output head) as int8 Q8_0, as Q4_K_M holds token_embd.
Q4KM_INT8 = ["re:.*self_attn\\.v_proj$",
             "re:model\\.layers\\.(" + "|".join(map(str, more_bits(30))) + ")\\.mlp\\.down_proj$"]
MIXED = {"int8_layers": Q4KM_INT8, "embedding": "int8"}
CALQ = {"awq-w4a16-g64": {"method": "awq", "scheme": "w4a16", "group_size": 64},
        "gptq-w4a16-g64": {"method": "gptq", "scheme": "w4a16", "group_size": 64},  # actorder static, damp 0.01
        # symmetric int4 -> Q4_0 (4.5 bits per weight), int8 -> Q8_0
        "gptq-w4a16-g32-sym-mixed": {"method": "gptq", "scheme": "w4a16", "group_size": 32, "symmetric": True,
                                     **MIXED},
        # the same without data: round-to-nearest int4 (minutes instead of GPTQ's half hour on 2 busy cores)
        "minmax-w4a16-g32-sym-mixed": {"method": "minmax", "scheme": "w4a16", "group_size": 32, "symmetric": True,
                                       **MIXED},
        "minmax-w4a16-g32-mixed": {"method": "minmax", "scheme": "w4a16", "group_size": 32, **MIXED},  # Q4_1
        "minmax-w4a16-g32-sym-int8emb": {"method": "minmax", "scheme": "w4a16", "group_size": 32, "symmetric": True,
                                         "embedding": "int8"},  # the int8 embedding alone
        # asymmetric int4 -> Q4_1 (5 bits per weight)
        "gptq-w4a16-g32-mixed": {"method": "gptq", "scheme": "w4a16", "group_size": 32, **MIXED},
        # symmetric 5-bit groups -> Q5_0 (5.5 bits per weight, as Q4_K_M's 166 Q5_0 tensors at this width) and the
        # embedding as Q8_0: about 100.1 MiB with GGUF's metadata, Q4_K_M's size
        "minmax-w5a16-g32-sym-int8emb": {"method": "minmax", "scheme": "w4a16", "bits": 5, "group_size": 32,
                                         "symmetric": True, "embedding": "int8"},
        # the same with every attn_v at int8 (Q8_0), as Q4_K_M: 1.2 MiB more, over Q4_K_M's size
        "minmax-w5a16-g32-sym-int8v": {"method": "minmax", "scheme": "w4a16", "bits": 5, "group_size": 32,
                                       "symmetric": True, "embedding": "int8", "int8_layers": [Q4KM_INT8[0]]},
        "gptq-w5a16-g32-sym-int8emb": {"method": "gptq", "scheme": "w4a16", "bits": 5, "group_size": 32,
                                       "symmetric": True, "embedding": "int8"},
        # the embedding / head as int4 (Q4_0) instead: 13.6 MiB less, what it costs in divergence
        **{f"{method}-w5a16-g32-sym-int4emb": {"method": method, "scheme": "w4a16", "bits": 5, "group_size": 32,
                                               "symmetric": True, "embedding": "int4"}
           for method in ("gptq", "minmax")},
        # three levels by hand: q_proj and k_proj down to 4 bits (Q4_0) pay for every attn_v at int8 (Q8_0)
        "gptq-w5a16-g32-sym-3level": {"method": "gptq", "scheme": "w4a16", "bits": 5, "group_size": 32,
                                      "symmetric": True, "embedding": "int8", "int8_layers": [Q4KM_INT8[0]],
                                      "int4_layers": ["re:.*self_attn\\.(q|k)_proj$"]},
        # three levels chosen by calq's budget (`demote`) from the 5-bit and 4-bit sensitivity tables: 98.8 MiB of
        # weights (size_mb counts no tokenizer; the GGUF adds 1.7 MiB of vocabulary and metadata), Q4_K_M's file size
        **{f"{method}-w5a16-g32-sym-budget": {"method": method, "scheme": "w4a16", "bits": 5, "group_size": 32,
                                              "symmetric": True, "embedding": "int8",
                                              "budget": {"size_mb": 98.8, "demote": True}}
           for method in ("gptq", "minmax")},
        # two levels for ONNX Runtime (its CPU MatMulNBits runs 2, 4 and 8 bits, no 5): 4-bit groups, the most
        # sensitive Linears at int8, under the same budget (calq's byte count: float16 scales, `--onnx-scale-dtype`)
        **{f"{method}-w4a16-g32-sym-budget": {"method": method, "scheme": "w4a16", "group_size": 32,
                                              "symmetric": True, "embedding": "int8", "budget": {"size_mb": 98.8}}
           for method in ("gptq", "minmax")},
        # the same at the ONNX file's own room: model.onnx + data come to about 0.4 MiB under the budget (int8
        # Linears hold one scale per 64 or 128 inputs there, not Q8_0's per 32) with no GGUF vocabulary to add
        "gptq-w4a16-g32-sym-onnx-budget": {"method": "gptq", "scheme": "w4a16", "group_size": 32, "symmetric": True,
                                           "embedding": "int8", "budget": {"size_mb": 100.8}},
        # the same budget choosing the embedding's level too (`embedding: auto`: int4, int8 or float16)
        **{f"{method}-w5a16-g32-sym-autoemb-budget": {"method": method, "scheme": "w4a16", "bits": 5, "group_size": 32,
                                                      "symmetric": True, "embedding": "auto",
                                                      "budget": {"size_mb": 98.8, "demote": True}}
           for method in ("gptq", "minmax")},
        # the same budget with the embedding at int4: its 13.6 MiB go to more int8 Linears
        **{f"{method}-w5a16-g32-sym-int4emb-budget": {"method": method, "scheme": "w4a16", "bits": 5, "group_size": 32,
                                                      "symmetric": True, "embedding": "int4",
                                                      "budget": {"size_mb": 98.8, "demote": True}}
           for method in ("gptq", "minmax")}}
DEFAULT_VARIANTS = "awq-w4a16-g64,gptq-w4a16-g64"
LLAMA_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
Q4KM = "llama.cpp Q4_K_M of the F16 baseline"  # the artifact every calq file is compared with


def baseline_folder(out: Path) -> Path:
    folder = out / "baseline"
    if not (folder / "config.json").is_file():
        model, tokenizer = models.load(models.resolve("smollm2-135m"))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def bundled_gguf() -> str:
    source = models.resolve("smollm2-135m")
    return str(Path(source.location) / source.gguf_file)


def export_gguf(checkpoint: Path, out_dir: Path) -> Path:
    """calq's GGUF writer: F16 for the float baseline, calq's integers for a quantized checkpoint."""
    path = out_dir / "model.gguf"
    if not path.is_file():
        get("gguf").export(checkpoint, out_dir, None, tokenizer=bundled_gguf())
    return path


def llama_quantize(f16: Path, kind: str, out: Path) -> Path:
    """llama.cpp's own quantization of the F16 GGUF (what `llama-quantize f16.gguf out.gguf Q4_K_M` does)."""
    import llama_cpp

    path = out / f"baseline-{kind}.gguf"
    if not path.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_TYPES[kind])
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed for {kind}")
    return path


def calq_gguf(name: str, out: Path, baseline: Path, data_dir: Path, samples: int, given: Path | None = None) -> Path:
    if given is not None and given.is_file():
        return given
    folder = given or out / name
    if not (folder / "config.json").is_file():
        model, tokenizer = models.load(models.ModelSource(str(baseline), kind="folder"))
        text = (data_dir / "wikitext2" / "wikitext2_train_5k_HyperTensor.txt").read_text()
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: samples * 256]).view(samples, 256)
        torch.manual_seed(0)
        start = time.perf_counter()
        variant = methods.config(CALQ[name])
        if variant.budget is not None:
            variant = with_budget(variant, model, ids, out, name)
        variant.apply(model, ids)
        print(f"{name} on {samples} x 256 tokens: {time.perf_counter() - start:.0f} s", flush=True)
        model.save_pretrained(folder, save_compressed=True)
        tokenizer.save_pretrained(folder)
    return export_gguf(folder, out / f"{name}-gguf")


def with_budget(variant, model, ids: torch.Tensor, out: Path, name: str):
    """A budgeted variant with its choice made as calq's quantize stage makes it: the sensitivity tables of its
    schemes on the first calibration samples (the recipe's defaults, SensitivitySpec; kept in --out as
    sensitivity-<scheme>.json and reused), then calq.quant.budget; the choice goes to budget-<name>.json."""
    spec = SensitivitySpec()
    samples = ids[: spec.samples, : spec.seq_len]
    shapes, other = budget.footprint(model, variant)

    def kld_table(key: str, measure) -> dict[str, float]:
        path = out / f"sensitivity-{key}.json"
        if not path.is_file():
            path.write_text(json.dumps(measure()))
        measured = json.loads(path.read_text())
        print(f"sensitivity {path.name}: {measured['seconds']:.0f} s", flush=True)
        return sensitivity.costs(measured)

    tables = [kld_table(sensitivity.scheme_key(scheme), lambda scheme=scheme: sensitivity.measure(
        model, samples, list(shapes), sensitivity.weight_args(scheme))) for scheme in budget.measured_schemes(variant)]
    auto = variant.embedding == "auto"
    embedding_kld = kld_table("embedding", lambda: sensitivity.measure_embedding(model, samples)) if auto else None
    chosen = budget.select(variant, shapes, other, *tables, embedding_kld=embedding_kld,
                           embedding_weights=budget.embedding_numel(model) if auto else 0)
    (out / f"budget-{name}.json").write_text(json.dumps(chosen, indent=1))
    print(f"budget: {len(chosen['promoted'])} Linears at int8, {len(chosen['demoted'])} at 4 bits, "
          f"embedding {chosen.get('embedding', variant.embedding)}, "
          f"{chosen['bytes'] / 2**20:.2f} of {chosen['limit_bytes'] / 2**20:.2f} MiB", flush=True)
    return budget.apply_choice(variant, chosen)


def _score(gguf: str, tokens: list[int], ctx: int, threads: int, out_file: str) -> None:
    """In a child process: llama.cpp's log-probabilities [tokens, vocab] (float32) written to `out_file`."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=ctx, n_batch=ctx, n_threads=threads, logits_all=True, verbose=False)
    rows = []
    for start in range(0, len(tokens), ctx):
        llm.reset()
        llm.eval(tokens[start:start + ctx])
        rows.append(torch.log_softmax(torch.from_numpy(np.array(llm.scores[: llm.n_tokens])).float(), -1))
    np.save(out_file, torch.cat(rows).numpy())


def _export_onnx(checkpoint: str, out_dir: str, scale_dtype: str) -> None:
    get("onnx").export(checkpoint, out_dir, None, scale_dtype=scale_dtype)


def _score_onnx(folder: str, tokens: list[int], ctx: int, threads: int, out_file: str) -> None:
    """In a child process: ONNX Runtime's log-probabilities (model.onnx, no calibrator) written to `out_file`."""
    session = get("onnx").session(Path(folder), threads)
    rows = [torch.log_softmax(session.score(torch.tensor([tokens[start:start + ctx]]))[0].float(), -1)
            for start in range(0, len(tokens), ctx)]
    np.save(out_file, torch.cat(rows).numpy())


def scores_file(out: Path, artifact: Path, tokens: np.ndarray, ctx: int) -> Path:
    """Where an artifact's log-probabilities go, named after the artifact file (its path and modification time), the
    tokens and the window, so --keep-scores reuses them only for the same file and text."""
    import hashlib

    stamp = artifact / "model.onnx" if artifact.is_dir() else artifact
    key = hashlib.sha1(f"{artifact.resolve()}:{stamp.stat().st_mtime_ns}:{ctx}".encode() + tokens.tobytes())
    return out / f"logprobs-{key.hexdigest()[:16]}.npy"


def onnx_bytes(folder: Path) -> int:
    """The scoring graph and its weights (decode.onnx reads the same model.onnx.data)."""
    return sum((folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))


def _tokenize(gguf: str, text: str, count: int, out_file: str) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, vocab_only=True, verbose=False)
    np.save(out_file, np.array(llm.tokenize(text.encode(), add_bos=False)[:count], dtype=np.int64))


def in_child(target, *args) -> None:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"child process for {args[0]} exited with {process.exitcode}")


def kl_per_position(base: np.ndarray, other: np.ndarray) -> torch.Tensor:
    p, q = torch.from_numpy(base).double(), torch.from_numpy(other).double()
    return (p.exp() * (p - q)).sum(-1)


def against(kld: torch.Tensor, reference: torch.Tensor, block: int = 64, draws: int = 10_000) -> dict:
    """Mean per-position KLD minus `reference`'s on the same positions, with a 95% block-bootstrap interval (blocks of
    `block` neighbouring positions resampled: neighbouring tokens' divergences are correlated)."""
    difference = (kld - reference).numpy()
    blocks = difference[: len(difference) // block * block].reshape(-1, block).mean(1)
    rng = np.random.default_rng(0)
    means = blocks[rng.integers(0, len(blocks), (draws, len(blocks)))].mean(1)
    return {"difference": float(difference.mean()), "ci95": [float(np.quantile(means, 0.025)),
                                                            float(np.quantile(means, 0.975))],
            "share_of_positions_lower": float((difference < 0).mean())}


def compare(base: np.ndarray, other: np.ndarray, tokens: np.ndarray, ctx: int) -> dict:
    """Per position KL(base || other), top-1 agreement; perplexity of `other` on the next token within each window."""
    p, q = torch.from_numpy(base).double(), torch.from_numpy(other).double()
    kld = kl_per_position(base, other)
    nxt = torch.tensor([i for i in range(len(tokens) - 1) if (i + 1) % ctx])  # not a window's last position
    nll = -q[nxt, torch.from_numpy(tokens)[nxt + 1]]
    return {"mean_kld": float(kld.mean()), "median_kld": float(kld.median()),
            "p99_kld": float(torch.quantile(kld, 0.99)), "max_kld": float(kld.max()),
            "same_top_token": float((p.argmax(-1) == q.argmax(-1)).double().mean()),
            "ppl": float(nll.mean().exp()), "positions": int(p.shape[0]), "scored_tokens": int(nxt.numel())}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def table(rows: list[dict]) -> str:
    lines = ["| artifact | size (MiB) | mean KLD vs F16 | median / p99 KLD | same top token | perplexity |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['mib']:.1f} | {r['mean_kld']:.4f} | {r['median_kld']:.4f} / "
                     f"{r['p99_kld']:.3f} | {100 * r['same_top_token']:.1f}% | {r['ppl']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CALQ_DATA_DIR", "data")))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-kld"))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"calq variants to add (of {', '.join(CALQ)})")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--keep-scores", action="store_true", help="keep each artifact's log-probabilities in --out "
                                                                   "(about 200 MB each) and reuse them next time")
    parser.add_argument("--onnx", action="store_true", help="also export each calq variant to ONNX and score it on "
                                                            "ONNX Runtime (model.onnx, float32 activations)")
    parser.add_argument("--onnx-scale-dtype", choices=["float16", "float32"], default="float16",
                        help="MatMulNBits scales in the ONNX file: float16 (GGUF's precision, the bytes calq's budget "
                             "counts) or float32 (calq's scales exactly)")
    parser.add_argument("--onnx-dir", action="append", default=[], metavar="NAME=FOLDER",
                        help="also score an ONNX export calq made (a run's RUN/export/<variant>/onnx: its `logits`, "
                             "the calibrator fused); repeatable")
    parser.add_argument("--awq", type=Path, help="an existing calq AWQ W4A16 g64 variant (checkpoint folder or GGUF) "
                                                 "instead of a new AWQ run")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH",
                        help="also score a GGUF file calq exported (e.g. a run's RUN/export/<variant>/gguf/model.gguf, "
                             "its calibrator folded in); repeatable")
    args = parser.parse_args()
    variants = [name for name in args.variants.split(",") if name]
    given = dict(item.split("=", 1) for item in args.gguf)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    llmc.quiet_logs(str(args.out / "llmcompressor.log"))

    baseline = baseline_folder(args.out)
    f16 = export_gguf(baseline, args.out / "baseline-f16")
    artifacts = {"baseline F16 (calq's GGUF writer)": f16,
                 **{Q4KM.replace("Q4_K_M", kind): llama_quantize(f16, kind, args.out)
                    for kind in LLAMA_TYPES},
                 **{f"calq {name} as GGUF": calq_gguf(name, args.out, baseline, args.data_dir, args.samples,
                                                      args.awq if name.startswith("awq") else None)
                    for name in variants},
                 **{f"calq {name} (given GGUF)": Path(path) for name, path in given.items()}}

    text = (args.data_dir / "wikitext2" / "wiki.test.raw").read_text()
    in_child(_tokenize, str(f16), text[len(text) // 2:], args.tokens, str(args.out / "tokens.npy"))
    tokens = np.load(args.out / "tokens.npy")
    if tokens.size < args.tokens:
        raise SystemExit(f"only {tokens.size} tokens in the second half of wiki.test.raw")

    onnx = {}
    for name in variants if args.onnx else ():
        folder = args.out / f"{name}-onnx-{args.onnx_scale_dtype}"
        if not (folder / "model.onnx").is_file():
            in_child(_export_onnx, str(args.awq if name.startswith("awq") and args.awq else args.out / name),
                     str(folder), args.onnx_scale_dtype)
        onnx[f"calq {name} as ONNX (ONNX Runtime, {args.onnx_scale_dtype} scales)"] = folder
    onnx.update({f"calq {name} (given ONNX)": Path(path) for name, path in
                 (item.split("=", 1) for item in args.onnx_dir)})
    artifacts.update(onnx)

    logprobs = {}
    for name, path in artifacts.items():
        out_file = scores_file(args.out, Path(path), tokens, args.ctx)
        if not out_file.is_file():
            start = time.perf_counter()
            in_child(_score_onnx if name in onnx else _score, str(path), tokens.tolist(), args.ctx, args.threads,
                     str(out_file))
            print(f"{name}: scored in {time.perf_counter() - start:.1f} s", flush=True)
        logprobs[name] = np.load(out_file)
        if not args.keep_scores:
            out_file.unlink()
    base = logprobs[next(iter(artifacts))]
    rows = [{"artifact": name, "file": str(path),
             "mib": (onnx_bytes(path) if name in onnx else Path(path).stat().st_size) / 2**20,
             "tensor_types": {} if name in onnx else tensor_types(Path(path)),
             **compare(base, logprobs[name], tokens, args.ctx)} for name, path in artifacts.items()]
    q4km = kl_per_position(base, logprobs[Q4KM])
    for row in rows:  # is a calq file's divergence below Q4_K_M's beyond what the text sample allows?
        if row["artifact"].startswith("calq"):
            row["vs_q4km"] = against(kl_per_position(base, logprobs[row["artifact"]]), q4km)

    import llama_cpp

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "llama_cpp_python":
              llama_cpp.__version__, "tokens": int(tokens.size), "ctx": args.ctx,
              "text": "wikitext2/wiki.test.raw, second half",
              "calq": {name: CALQ[name] for name in variants}, "given_gguf": given, "given_onnx": args.onnx_dir,
              "calibration": {
              "samples": args.samples, "seq_len": 256, "data": "wikitext2/wikitext2_train_5k_HyperTensor.txt"},
              "awq_variant": str(args.awq) if args.awq else "made by this run", "rows": rows}
    (args.out / "kld-q4km.json").write_text(json.dumps(result, indent=2))
    print(table(rows))
    for row in rows:
        if "vs_q4km" in row:
            low, high = row["vs_q4km"]["ci95"]
            print(f"{row['artifact']}: mean KLD minus Q4_K_M's {row['vs_q4km']['difference']:+.4f} (95% "
                  f"block-bootstrap interval {low:+.4f} .. {high:+.4f})")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
