"""The exporter contract, the registry of formats, and re-verification of an artifact against PyTorch.

Adding a format is one module with an `Exporter` subclass decorated with `@register`, in this package or in a plugin
package (entry point group `calq.exporters`: calq.registry); `get(name)` discovers both:
- `check(checkpoint_dir, calibrator)`: raise CalqError, before long work, when the format cannot hold the variant
  or the calibrator at all (or its runtime package is missing);
- `export(checkpoint_dir, out_dir, calibrator) -> info`: write the artifact; `info["changes"]` lists in words what
  the format changes against the PyTorch variant (the re-verification measures it);
- `check_config(config, where)`: raise CalqError, at plan time, when the format cannot hold the model's architecture;
  `carries(config)`: the calibrator forms it can carry for that model (fewer than `calibrators`: the pipeline falls
  back as for a calibrator the format never carries);
- `check_runtime()`: raise CalqError when the runtime package is missing (call it before long work too);
- `session(out_dir) -> Session`: the artifact loaded in its own runtime; `Session.score(input_ids [B, T])` returns
  the (calibrated) logits [B, T, V] as a float32 torch tensor;
- `verify_generation(out_dir, reference_logits, prompt, new_tokens)` (optional, formats with a decode graph of their
  own: onnx, executorch): greedy generation on the runtime against the reference (`greedy_reference`,
  `generation_check`), stored as verify.json's `decode`.
A calibrator is None or a token-level calibrator whose `fuse` says how it is fused: `temperature` (one global scale,
its `temperature`), `ats` (the head, an nn.Module run in the graph); `Exporter.calibrators` lists the forms a format
can carry.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from calq import isolation
from calq.errors import CalqError
from calq.metrics import CalibrationStats, DivergenceStats
from calq.registry import Registry

EXTRA = "pip install 'calq[edge]'"
INFO_FILE = "export.json"
DECODE_PROMPT, DECODE_NEW = 32, 16  # greedy generation check of a decode graph: prompt tokens, new tokens


class Session(Protocol):
    def score(self, input_ids: torch.Tensor) -> torch.Tensor: ...


class FusedScoring(torch.nn.Module):
    """input_ids -> calibrated logits [B, T, V] (with `with_raw`: and the raw logits), the calibrator in the graph: a
    temperature divides, an ATS head (an nn.Module) reads the last hidden state. What onnx and executorch trace."""

    def __init__(self, model: torch.nn.Module, calibrator, with_raw: bool = False):
        super().__init__()
        self.model = model
        self.head = calibrator if isinstance(calibrator, torch.nn.Module) else None
        self.temperature = getattr(calibrator, "temperature", None)
        self.with_raw = with_raw

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=self.head is not None, use_cache=False)
        raw = out.logits
        if self.head is not None:
            calibrated = self.head(raw, out.hidden_states[-1])
        elif self.temperature is not None:
            calibrated = raw / self.temperature
        else:
            calibrated = raw * 1.0 if self.with_raw else raw  # with raw: a node of its own, two distinct outputs
        return (calibrated, raw) if self.with_raw else calibrated


class Exporter:
    name: str = ""
    calibrators: tuple[str, ...] = ("none", "temperature", "ats")  # the calibrators' `fuse` forms it can carry
    packages: tuple[str, ...] = ()  # python modules that write the format
    runtime: str = ""  # the python module that runs it (session, verification)
    runtime_name: str = ""  # the runtime in words, for a crash's line ("llama.cpp")
    crash_fix: str = ""  # what to do when the runtime crashes
    reads_tokenizer: bool = False  # export() takes tokenizer=<the source .gguf file, or the model's tokenizer folder>
    version: int = 1  # raise it when a fix changes the artifact: finished runs redo this format's exports only

    def check(self, checkpoint_dir: str | Path, calibrator=None) -> None:
        for package in self.packages:
            require(package, self.name)
        kind = calibrator_kind(calibrator)
        if kind not in self.calibrators:
            raise CalqError(f"the {self.name} format cannot carry the '{kind}' calibrator", f"export.{self.name}",
                            f"fuse one of: {', '.join(self.calibrators)}")

    def check_config(self, config, where: str) -> None:
        """Raise CalqError, from the model's config alone (before any weight loads), when the format cannot hold
        this architecture."""

    def carries(self, config=None) -> tuple[str, ...]:
        """The calibrator forms the format can carry, for this model's config when given (default: `calibrators`)."""
        return self.calibrators

    def holds(self, calibrator, config=None) -> bool:
        """Whether the format can carry `calibrator` (a calibrator class or instance; None: no calibrator) fused,
        for this model's config when given."""
        return ("none" if calibrator is None else getattr(calibrator, "fuse", None)) in self.carries(config)

    def fallback(self, fitted: dict, config=None) -> str:
        """The name of the fitted calibrator ({name: calibrator}) it carries when it cannot carry the one asked for:
        the first that changes the probabilities and that it holds (e.g. a global temperature), else the identity."""
        held = [name for name, calibrator in fitted.items() if self.holds(calibrator, config)]
        return next((name for name in held if not fitted[name].identity), held[0])

    def check_runtime(self) -> None:
        """Raise CalqError (naming the extra to install) when the runtime cannot be imported."""
        require(self.runtime, self.name)

    def export(self, checkpoint_dir: str | Path, out_dir: str | Path, calibrator=None) -> dict:
        raise NotImplementedError

    def options(self, recipe) -> dict:
        """What this format's `export` takes from the recipe, as keyword arguments."""
        return {}

    def session(self, out_dir: str | Path, threads: int = 1) -> Session:
        raise NotImplementedError

    def isolated(self, factory: Callable, out_dir: str | Path, *args, **kwargs) -> isolation.Isolated:
        """`factory(out_dir, ...)` (a session or decoder of this format) in a child process: a crash of the runtime
        raises one RuntimeCrashed line instead of ending calq."""
        return isolation.Isolated(self.runtime_name, f"running the {self.name} artifact", factory, out_dir, *args,
                                  where=f"export.{self.name}", fix=self.crash_fix, **kwargs)

    def verify_generation(self, out_dir: str | Path, reference_logits: Callable, prompt: torch.Tensor,
                          new_tokens: int, threads: int = 1) -> dict | None:
        """Formats with a decode graph of their own: greedy generation on the runtime against the reference (a dict
        stored as verify.json's `decode`); None for the others."""
        return None


@torch.no_grad()
def greedy_reference(reference_logits: Callable, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference's greedy tokens after `prompt` (token ids [T]), the whole sequence recomputed at each step."""
    sequence = prompt.clone()
    for _ in range(new_tokens):
        sequence = torch.cat([sequence, reference_logits(sequence[None])[0, -1].argmax()[None]])
    return sequence[prompt.numel():]


def generation_check(tokens: torch.Tensor, expected: torch.Tensor, decode_logits: str, step_logits: torch.Tensor,
                     full: torch.Tensor, seconds: dict, threads: int) -> dict:
    """verify.json's `decode`: a decode graph's greedy `tokens` against the reference's `expected`, its logits of
    every prefill and decode step against the artifact's logits over the same whole sequence (`full`), and its speed
    in that run (`seconds` of the prefill and of the decode steps on `threads` threads: one short run, the first
    calls included; BENCHMARKS.md times the runtimes properly)."""
    mismatches = (tokens != expected).nonzero()
    diff = float((step_logits - full).abs().max())
    prompt = full.shape[0] - tokens.numel() + 1
    return {"prompt_tokens": prompt, "new_tokens": tokens.numel(), "threads": threads,
            "prefill_tokens_per_second": prompt / seconds["prefill"],
            "decode_tokens_per_second": (tokens.numel() - 1) / seconds["decode"] if tokens.numel() > 1 else None,
            "decode_logits": decode_logits, "greedy_tokens_equal": bool(torch.equal(tokens, expected)),
            "greedy_token_agreement": float((tokens == expected).float().mean()),
            "first_mismatch": int(mismatches[0]) if mismatches.numel() else None,
            "max_abs_diff_vs_scoring": diff, "max_rel_diff_vs_scoring": diff / float(full.abs().max())}


EXPORTERS = Registry("export format", "calq.export", "exporters")
register = EXPORTERS.register


def get(name: str, where: str = "export.formats") -> Exporter:
    return EXPORTERS.discover().get(name, where)()


def require(module: str, fmt: str):
    """Import an optional runtime package, or one clear CalqError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CalqError(f"the {fmt} export needs the Python package '{module}', which is not installed",
                        f"export.{fmt}", EXTRA) from None


def calibrator_kind(calibrator) -> str:
    """How an exporter would fuse `calibrator` (its `fuse`: none, temperature, ats); None is `none`."""
    if calibrator is None:
        return "none"
    if getattr(calibrator, "fuse", None) is None:
        raise CalqError(f"calibrator {getattr(calibrator, 'name', calibrator)!r} cannot be fused into an exported "
                        "model (its `fuse` is not set)", "export.calibrator",
                        "export with a calibrator that sets `fuse` (none, temperature, ats)")
    return calibrator.fuse


def write_info(out_dir: str | Path, info: dict) -> dict:
    """Store the export's info next to the artifact (out_dir/export.json) and return it."""
    (Path(out_dir) / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def directory_size(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.name != INFO_FILE)


@torch.no_grad()
def verify(reference_logits: Callable[[torch.Tensor], torch.Tensor],
           artifact_logits: Callable[[torch.Tensor], torch.Tensor],
           stream: torch.Tensor, seq_len: int, bins: int = 15, batch_size: int = 1) -> dict:
    """The artifact against the PyTorch reference on non-overlapping windows of `seq_len` held-out tokens.

    Both callables map input_ids [B, T] to logits [B, T, V]. Every position is compared (top-1 agreement, absolute
    logit differences, relative to the largest reference logit); every position but a window's last is scored against
    the next token (perplexity, ECE with `bins` equal-width bins, Brier of the top label) for both, so the drift of
    each metric is the artifact's minus the reference's; `divergence` is KL(reference || artifact) and the rest on
    those scored positions (calq.metrics.DivergenceStats: the evaluate stage's numbers against the baseline).
    """
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if windows.shape[0] == 0:
        raise CalqError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}",
                        "export.verify", "give more held-out text or a shorter window")
    stats = {"artifact": CalibrationStats(bins), "reference": CalibrationStats(bins)}
    divergence = DivergenceStats()
    agree, positions, max_diff, sum_diff, max_ref = 0, 0, 0.0, 0.0, 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        ref, art = reference_logits(batch).float(), artifact_logits(batch).float()
        diff = (art - ref).abs()
        agree += int((art.argmax(-1) == ref.argmax(-1)).sum())
        positions += ref.shape[0] * ref.shape[1]
        max_diff, sum_diff = max(max_diff, float(diff.max())), sum_diff + float(diff.double().sum())
        max_ref = max(max_ref, float(ref.abs().max()))
        stats["reference"].update_from_logits(ref[:, :-1], batch[:, 1:])
        stats["artifact"].update_from_logits(art[:, :-1], batch[:, 1:])
        divergence.update(ref[:, :-1], art[:, :-1], batch[:, 1:])
    summaries = {name: s.summary() for name, s in stats.items()}
    drift = {k: summaries["artifact"][k] - summaries["reference"][k]
             for k in ("nll", "accuracy", "confidence", "ece", "adaptive_ece", "brier")}
    drift["ppl_ratio"] = summaries["artifact"]["ppl"] / summaries["reference"]["ppl"] \
        if math.isfinite(summaries["reference"]["ppl"]) else math.nan
    return {"windows": windows.shape[0], "seq_len": seq_len, "positions": positions,
            "top1_agreement": agree / positions, "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": sum_diff / (positions * ref.shape[-1]),
            "max_rel_logit_diff": max_diff / max_ref if max_ref else math.nan,
            **summaries, "drift": drift, "divergence": divergence.summary()}


def export_and_verify(fmt: str, checkpoint_dir: str | Path, out_dir: str | Path, reference_logits: Callable,
                      stream: torch.Tensor, seq_len: int, calibrator=None, bins: int = 15, threads: int = 2,
                      **options) -> dict:
    """One (variant, format) export stage: write the artifact to `out_dir`, load it in its runtime, re-verify it on
    `stream` against `reference_logits` (the PyTorch variant with the same calibrator), store verify.json. The runtime
    runs in a child process (calq.isolation): its crash fails the stage with one line, not the whole process.
    `options` go to the exporter (gguf: tokenizer=<source .gguf or tokenizer folder>)."""
    exporter = get(fmt)
    exporter.check(checkpoint_dir, calibrator)
    exporter.check_runtime()
    info = exporter.export(checkpoint_dir, out_dir, calibrator, **options)
    with exporter.isolated(exporter.session, out_dir, threads=threads) as session:
        result = verify(reference_logits, session.score, stream, seq_len, bins)
    result["load_seconds"] = getattr(session, "load_seconds", None)  # an exporter's own `isolated` may not time it
    decode = exporter.verify_generation(out_dir, reference_logits, stream[:DECODE_PROMPT], DECODE_NEW, threads)
    if decode is not None:
        result["decode"] = decode
    (Path(out_dir) / "verify.json").write_text(json.dumps(result, indent=2))
    return {"export": info, "verify": result}


def deployed_failures(results: dict[str, dict[str, dict]], max_deployed_ece_drift: float | None = None,
                      min_deployed_top1_agreement: float | None = None) -> list[str]:
    """Gate failures, one line each, for {variant: {format: export_and_verify(...) result}}."""
    failures = []
    for name, formats in results.items():
        for fmt, result in formats.items():
            v = result["verify"]
            drift = abs(v["drift"]["ece"])
            if max_deployed_ece_drift is not None and drift > max_deployed_ece_drift:
                failures.append(f"{name} as {fmt}: token ECE drifted by {drift:.4f} from PyTorch "
                                f"(max_deployed_ece_drift {max_deployed_ece_drift})")
            if min_deployed_top1_agreement is not None and v["top1_agreement"] < min_deployed_top1_agreement:
                failures.append(f"{name} as {fmt}: top-1 agreement with PyTorch {v['top1_agreement']:.3f} "
                                f"(min_deployed_top1_agreement {min_deployed_top1_agreement})")
    return failures
