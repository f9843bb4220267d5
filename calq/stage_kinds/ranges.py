"""Activation ranges of the base model on the calibration samples, and the outlier summary."""

from __future__ import annotations

from calq import models
from calq.calib import ranges as ranges_mod
from calq.pipeline import Context
from calq.runs import atomic_path, write_json
from calq.stage_kinds.samples import load_samples
from calq.stages import KINDS, StageKind


@KINDS.register
class Ranges(StageKind):
    kind, pattern, group, words, order = "ranges", "ranges", "ranges", "range collection", 40
    outputs = {"ranges": "ranges.safetensors", "outliers": "outliers.json"}

    @classmethod
    def add_stages(cls, table) -> None:
        top_k, version = table.recipe.outliers_top_k, table.raised(cls)
        table.add("ranges", stage_ranges, needs=("samples",), settings=[top_k, *version] if version else top_k)


def stage_ranges(ctx: Context):
    model, _ = models.load(ctx.source, ctx.recipe.model.dtype)
    samples = load_samples(ctx)
    collected = ranges_mod.collect(model, samples, progress=ctx.track("activation ranges", samples.shape[0]))
    out = ctx.output("ranges", "ranges")
    with atomic_path(out) as tmp:
        ranges_mod.save(collected, tmp, {"samples": str(samples.shape[0]), "seq_len": str(samples.shape[1])})
    summary = ranges_mod.outlier_summary(ranges_mod.load(out), ctx.recipe.outliers_top_k)
    return ({"ranges": out, "outliers": write_json(ctx.output("ranges", "outliers"), summary)},
            {"layers": len(collected) // 5})
