"""Each variant exported to a runtime format with its calibrator fused, and re-verified there."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from calq import models
from calq.calib import calibrators
from calq.calib.base import CalibratedLM
from calq.errors import CalqError
from calq.export import base as export_base
from calq.pipeline import Context
from calq.recipe import Recipe
from calq.runs import atomic_path, write_json
from calq.stage_kinds.calibrate import load_calibrators
from calq.stages import KINDS, StageKind


@KINDS.register
class Export(StageKind):
    kind, pattern, group, words, order = "export", "export/<variant>/<format>", "export", "export", 140
    outputs = {"artifact": "export/{variant}/{format}", "result": "export/{variant}/{format}.json"}
    version = 2

    @classmethod
    def check(cls, recipe, data_root, variants, config) -> None:
        if recipe.export is not None:
            check_export(recipe, variants, config.get_text_config())

    @classmethod
    def add_stages(cls, table) -> None:
        spec, ev = table.recipe.export, table.recipe.evaluation.tokens
        if spec is None:
            return
        evaluated_on = table.evaluated_on()
        for name in spec.variants or evaluated_on:
            for fmt in spec.formats:
                fmt_version = export_base.get(fmt).version  # past 1 it enters the key: that format's stages rerun
                table.add(f"export/{name}/{fmt}", stage_export, name, fmt, needs=("eval_tokens", *evaluated_on[name]),
                          settings=[spec.model_dump(exclude={"formats", "variants"}), ev.seq_len, ev.bins,
                                    cls.version, *([fmt_version] if fmt_version > 1 else [])])


def check_export(recipe: Recipe, variants: list[str], config) -> None:
    """Formats known, their runtimes installed, the architecture held (`config`: the model's text config), variants
    known, the calibrator fitted: before any long work."""
    spec = recipe.export
    for i, fmt in enumerate(spec.formats):
        exporter = export_base.get(fmt, "export.formats")
        exporter.check_runtime()
        exporter.check_config(config, f"export.formats[{i}]")
        if spec.calibrator != "selected" and not exporter.holds(calibrators.TOKEN.get(spec.calibrator), config):
            raise CalqError(f"{fmt} cannot hold the {spec.calibrator} calibrator (it holds: "
                            f"{', '.join(exporter.carries(config))})", "export.calibrator",
                            f"use calibrator: selected (the format then falls back to one it holds) or drop {fmt}")
    for name in spec.variants or ():
        if name not in variants:
            raise CalqError(f"unknown variant '{name}'", "export.variants", f"use one of: {', '.join(variants)}")
    if spec.calibrator not in ("selected", *recipe.calibrator_names()):
        raise CalqError(f"the {spec.calibrator} calibrator is not fitted in this recipe", "export.calibrator",
                        "add it to calibrators.use, or export with calibrator: none")


def stage_export(ctx: Context, name: str, fmt: str):
    """The variant exported to `fmt` with its calibrator fused (RUN/export/<variant>/<fmt>/), loaded in its own
    runtime and re-verified against the PyTorch variant with the same calibrator on held-out windows."""
    spec, ev = ctx.recipe.export, ctx.recipe.evaluation.tokens
    source = ctx.variant_source(name)
    model, _ = models.load(source, "float32")
    cals, fitted = load_calibrators(ctx, name, model.config)
    exporter = export_base.get(fmt)
    kind = fitted.get("selected", "none") if spec.calibrator == "selected" else spec.calibrator
    note = None
    config = model.config.get_text_config()
    if not exporter.holds(cals[kind], config):
        fallback = exporter.fallback(cals, config)
        note = f"{fmt} cannot hold the {kind} calibrator for this model: {fallback} is fused instead"
        kind = fallback
    calibrator = None if cals[kind].identity else cals[kind]
    reference = model if calibrator is None else CalibratedLM(model, calibrator)
    options = exporter.options(ctx.recipe)
    if exporter.reads_tokenizer:  # the source GGUF's own tokenizer, else the variant's folder
        original = ctx.original_source()
        options["tokenizer"] = (str(Path(original.location) / original.gguf_file) if original.gguf_file
                                else source.location)
    stream = load_file(str(ctx.output("eval_tokens", "tokens")))["input_ids"][: spec.max_tokens]
    final = ctx.output("export", "artifact", variant=name, format=fmt)
    with atomic_path(final) as tmp, torch.no_grad():
        tmp.mkdir(parents=True)
        result = export_base.export_and_verify(fmt, source.location, tmp, lambda ids: reference(input_ids=ids).logits,
                                               stream, ev.seq_len, calibrator, ev.bins, spec.threads, **options)
    result.update(calibrator=kind, note=note)
    out = write_json(ctx.output("export", "result", variant=name, format=fmt), result)
    return {"artifact": final, "result": out}, {"top1_agreement": result["verify"]["top1_agreement"],
                                                "ece_drift": result["verify"]["drift"]["ece"]}
