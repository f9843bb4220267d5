"""report.json (every number, with data names, token counts, seed, versions) and report.md (the tables)."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

import yaml

from calq.runs import write_json, write_text

PACKAGES = ("calq", "torch", "transformers", "llmcompressor", "compressed-tensors", "datasets")
METRICS = ("ppl", "accuracy", "confidence", "ece", "adaptive_ece", "brier")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _size(folder: Path) -> int | None:
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def collect(ctx, plan) -> dict:
    """Assemble report.json's content from the run folder (stage markers and result files)."""
    from calq.pipeline import BASELINE, _base_source

    run, recipe = ctx.run, ctx.recipe
    stages = {name: json.loads(p.read_text()) for name in plan.keys if (p := run.meta / "stages" / f"{name}.json").is_file()}
    rows = []
    for name in plan.variants:
        result = json.loads(run.path("eval", f"{name}.json").read_text())["calibrators"]["none"]
        if name == BASELINE:
            size = _size(Path(_base_source(ctx, plan).location))
            quant = {"method": "none", "scheme": recipe.model.dtype, "calibration_seconds": None}
        else:
            q = stages[f"quantize/{name}"]["info"]
            size, quant = q["size_bytes"], q
        rows.append({"variant": name, "method": quant["method"], "scheme": quant["scheme"],
                     "group_size": quant.get("group_size"), "size_bytes": size,
                     "calibration_seconds": quant["calibration_seconds"], "calibration_samples": quant.get("calibration_samples"),
                     **{k: result[k] for k in METRICS}, "tokens": result["tokens"], "reliability": result["reliability"]})
    samples, eval_data = stages["samples"]["info"], stages["eval_tokens"]["info"]
    return {
        "recipe": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"id": recipe.model.id, "source": plan.source.describe(), "dtype": recipe.model.dtype,
                  "note": stages.get("base_model", {}).get("info", {}).get("note")},
        "calibration": samples,
        "evaluation": {"tokens": {**eval_data, "seq_len": recipe.evaluation.tokens.seq_len,
                                  "bins": recipe.evaluation.tokens.bins}},
        "variants": rows,
        "outliers": json.loads(run.path("outliers.json").read_text()),
        "smoothing": {name: json.loads(p.read_text())[: recipe.outliers_top_k] for name in plan.variants
                      if (p := run.path("smoothing", f"{name}.json")).is_file()},
        "skipped": plan.skipped,
        "stages": {name: {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]} for name, m in stages.items()},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": _cpus()},
        "recipe_content": recipe.model_dump(mode="json"),
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _mb(n: int | None) -> str:
    return f"{n / 2**20:,.1f}" if n else "–"


def markdown(report: dict) -> str:
    cal, ev = report["calibration"], report["evaluation"]["tokens"]
    lines = [f"# calq report: {report['recipe']}", ""]
    lines += [f"Model `{report['model']['source']}` ({report['model']['dtype']}).",
              *([f"Note: {report['model']['note']}."] if report["model"].get("note") else []), "",
              f"Calibration: {cal['num_samples']} samples × {cal['seq_len']} tokens from `{cal['source']}` (seed {cal['seed']}).",
              f"Token-level evaluation: {ev['tokens']:,} tokens of `{ev['source']}` in windows of {ev['seq_len']}; "
              f"ECE with {ev['bins']} equal-width bins (adaptive ECE: equal-mass bins).", ""]
    for note in (cal.get("note"), ev.get("note")):
        if note:
            lines += [f"Data note: {note}.", ""]
    lines += ["## Variants", "",
              "| variant | size (MB) | calib. (s) | ppl | acc | conf | ECE | adaptive ECE | Brier |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["variants"]:
        secs = f"{r['calibration_seconds']:.1f}" if r["calibration_seconds"] is not None else "–"
        lines.append(f"| {r['variant']} | {_mb(r['size_bytes'])} | {secs} | {r['ppl']:.2f} | {r['accuracy']:.4f} | "
                     f"{r['confidence']:.4f} | {r['ece']:.4f} | {r['adaptive_ece']:.4f} | {r['brier']:.4f} |")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"\nSkipped variant {name}: {why}")
    lines += ["", "## Activation outliers", "",
              "Layers whose input has the strongest outlier channel (channel absmax / median channel absmax), "
              "measured over the calibration samples.", "",
              "| layer | ratio | absmax | median absmax | channel | tokens |", "|---|---:|---:|---:|---:|---:|"]
    for o in report["outliers"]:
        lines.append(f"| {o['layer']} | {o['ratio']:.1f} | {o['absmax']:.3f} | {o['median_absmax']:.4f} | {o['channel']} | {o['tokens']:,} |")
    for name, rows in report.get("smoothing", {}).items():
        lines += ["", f"## SmoothQuant's effect on the activation spread ({name})", "",
                  "Channel absmax / median channel absmax of each Linear input, unquantized vs smoothed-and-quantized, "
                  "on the same calibration samples; layers not preceded by a norm (o_proj, down_proj) are not smoothed.", "",
                  "| layer | spread before | spread after | reduction |", "|---|---:|---:|---:|"]
        for o in rows:
            red = f"{o['reduction']:.1f}×" if o["reduction"] is not None else "–"
            lines.append(f"| {o['layer']} | {o['spread_before']:.1f} | {o['spread_after']:.1f} | {red} |")
    lines += ["", "## Stages", "", "| stage | wall (s) | peak RSS (MB) |", "|---|---:|---:|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['seconds']:.1f} | {s['peak_rss_mb']:,.0f} |")
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              f"on {report['machine']['platform']} ({report['machine']['cpus']} CPUs).", "",
              "## Recipe", "", "```yaml", yaml.safe_dump(report["recipe_content"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_reports(ctx, plan) -> dict:
    report = collect(ctx, plan)
    write_json(ctx.run.path("report.json"), report)
    write_text(ctx.run.path("report.md"), markdown(report))
    return report
