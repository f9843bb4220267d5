"""Per-layer sensitivity of the base model to each variant's scheme on the calibration samples (calq.quant.sensitivity):
one stage per scheme, shared by the variants with that scheme; the quantize stage of a variant with a budget reads it
(calq.quant.budget). A variant with `embedding: auto` adds `sensitivity/embedding`: the embedding / head alone at
int4 and int8."""

from __future__ import annotations

import json

from calq import models
from calq.errors import CalqError, located
from calq.pipeline import Context
from calq.quant import budget as budget_mod
from calq.quant import sensitivity
from calq.recipe import SensitivitySpec
from calq.runs import write_json
from calq.stage_kinds.samples import load_samples
from calq.stages import KINDS, StageKind


@KINDS.register
class Sensitivity(StageKind):
    kind, pattern, group, words, order = "sensitivity", "sensitivity/<scheme>", "ranges", "sensitivity", 45
    outputs = {"table": "sensitivity/{scheme}.json"}
    version = 2  # 2: the divergence left after the best temperature (tempered_kld), what `objective: ece` reads

    @classmethod
    def check(cls, recipe, data_root, variants, config) -> None:
        spec = spec_of(recipe)
        if spec is not None and spec.seq_len > recipe.calibration.seq_len:
            raise CalqError(f"seq_len {spec.seq_len} is longer than the calibration samples "
                            f"({recipe.calibration.seq_len})", "evaluation.sensitivity.seq_len",
                            f"set it to at most {recipe.calibration.seq_len}")
        budgeted = [(i, v) for i, v in enumerate(recipe.variants) if v.budget is not None and v.label in variants]
        if budgeted:
            model = meta_model(config)
            for i, v in budgeted:
                with located(f"variants[{i}]"):
                    budget_mod.check(v, *budget_mod.footprint(model, v))

    @classmethod
    def add_stages(cls, table) -> None:
        spec = spec_of(table.recipe)
        if spec is None:
            return
        config = models.load_config(table.source)
        measured = schemes(table.variants, models.linear_layers(config))
        for key, (variant, layers) in measured.items():
            table.add(f"sensitivity/{key}", stage_sensitivity, variant, layers, needs=("samples",),
                      settings=[spec.samples, spec.seq_len, key, layers, *table.raised(cls)])
        if any(v.embedding == "auto" for v in table.variants):
            table.add(f"sensitivity/{EMBEDDING}", stage_embedding_sensitivity, needs=("samples",),
                      settings=[spec.samples, spec.seq_len, EMBEDDING, *table.raised(cls)])


EMBEDDING = "embedding"  # the table of the embedding / head (no scheme key looks like it)


def spec_of(recipe) -> SensitivitySpec | None:
    """The recipe's sensitivity settings; when only a variant's budget asks for the stage, the defaults cut to the
    calibration samples' length."""
    spec = recipe.evaluation.sensitivity
    if spec is None and any(v.budget is not None for v in recipe.variants):
        default = SensitivitySpec.model_fields["seq_len"].default
        return SensitivitySpec(seq_len=min(default, recipe.calibration.seq_len))
    return spec


def schemes(variants, linear_layers: dict) -> dict[str, tuple]:
    """scheme key -> (the first variant with that scheme, the Linears any variant of that scheme quantizes, in model
    order); a budget with `demote` measures its 4-bit scheme too."""
    first, quantized = {}, {}
    for v in [scheme for variant in variants
              for scheme in (budget_mod.measured_schemes(variant) if variant.budget else [variant])]:
        key = sensitivity.scheme_key(v)
        first.setdefault(key, v)
        quantized.setdefault(key, set()).update(v.quantized_layers(linear_layers))
    return {key: (v, [n for n in linear_layers if n in quantized[key]]) for key, v in first.items()}


def meta_model(config):
    """A weightless copy of the model, for its parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def stage_sensitivity(ctx: Context, variant, layers: list[str]):
    spec = spec_of(ctx.recipe)
    model, _ = models.load(ctx.source, ctx.recipe.model.dtype)
    samples = load_samples(ctx)[: spec.samples, : spec.seq_len]
    key = sensitivity.scheme_key(variant)
    measured = sensitivity.measure(model, samples, layers, sensitivity.weight_args(variant),
                                   progress=ctx.track(f"sensitivity {key}", len(layers)))
    table = {"scheme": key, "samples": list(samples.shape), **measured}
    out = write_json(ctx.output("sensitivity", "table", scheme=key), table)
    top = max(measured["layers"], key=lambda n: measured["layers"][n]["mean_kld"])
    return {"table": out}, {"layers": len(layers), "seconds": measured["seconds"], "most_sensitive": top}


def stage_embedding_sensitivity(ctx: Context):
    spec = spec_of(ctx.recipe)
    model, _ = models.load(ctx.source, ctx.recipe.model.dtype)
    samples = load_samples(ctx)[: spec.samples, : spec.seq_len]
    measured = sensitivity.measure_embedding(model, samples, progress=ctx.track("sensitivity embedding", 2))
    out = write_json(ctx.output("sensitivity", "table", scheme=EMBEDDING),
                     {"scheme": EMBEDDING, "samples": list(samples.shape), **measured})
    return {"table": out}, {"seconds": measured["seconds"],
                            **{f"{level}_mean_kld": kld for level, kld in sensitivity.costs(measured).items()}}


def read_table(ctx: Context, variant=None) -> dict:
    """The sensitivity table of a variant's scheme (a budgeted variant's quantize stage needs that stage), or with no
    variant the embedding's."""
    key = sensitivity.scheme_key(variant) if variant is not None else EMBEDDING
    return json.loads(ctx.output("sensitivity", "table", scheme=key).read_text())
