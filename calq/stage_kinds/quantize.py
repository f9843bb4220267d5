"""One quantized checkpoint per variant (its method: calq.quant)."""

from __future__ import annotations

import time
import warnings

from calq import models
from calq.errors import located
from calq.pipeline import Context
from calq.quant import budget, llmc
from calq.quant.base import MethodConfig
from calq.quant.sensitivity import costs, scheme_key
from calq.runs import atomic_path, write_json
from calq.stage_kinds.samples import load_samples
from calq.stage_kinds.sensitivity import EMBEDDING, read_table
from calq.stages import KINDS, StageKind


@KINDS.register
class Quantize(StageKind):
    kind, pattern, group, words, order = "quantize", "quantize/<variant>", "quantize", "quantization", 50
    # a method's own outputs (MethodConfig.extra_outputs) are `{output}/{variant}.json`
    outputs = {"checkpoint": "variants/{variant}", "method": "{output}/{variant}.json"}

    @classmethod
    def add_stages(cls, table) -> None:
        for v in table.variants:
            version = [type(v).version] if type(v).version > 1 else []  # a method's first version adds nothing
            needs = ("samples",) if v.needs_data() else table.base
            if v.budget is not None:  # it promotes the layers its scheme's sensitivity table ranks first
                needs = (*needs, *(f"sensitivity/{scheme_key(s)}" for s in budget.measured_schemes(v)),
                         *([f"sensitivity/{EMBEDDING}"] if v.embedding == "auto" else []))
            table.add(f"quantize/{v.label}", stage_quantize, v, needs=needs,
                      # the method by name: it is its class's default, which exclude_defaults leaves out
                      settings=[{"method": v.method, **v.model_dump(exclude_defaults=True)}, *version,
                                *table.raised(cls)])
            table.model[v.label] = (f"quantize/{v.label}",)


def stage_quantize(ctx: Context, variant: MethodConfig):
    model, tokenizer = models.load(ctx.source, ctx.recipe.model.dtype)
    llmc.quiet_logs(str(ctx.run.path("logs", "llmcompressor.log")), console=ctx.debug)
    samples = load_samples(ctx) if variant.needs_data() else None  # the table orders this stage after samples only then
    where = f"variants[{ctx.recipe.variants.index(variant)}]"
    shapes, other_bytes = budget.footprint(model, variant)
    chosen = None
    if variant.budget is not None:
        objective = variant.budget.objective
        kld = [costs(read_table(ctx, scheme), objective) for scheme in budget.measured_schemes(variant)]
        auto = variant.embedding == "auto"
        embedding_kld = costs(read_table(ctx), objective) if auto else None
        with located(where):
            chosen = budget.select(variant, shapes, other_bytes, *kld, embedding_kld=embedding_kld,
                                   embedding_weights=budget.embedding_numel(model) if auto else 0)
        variant = budget.apply_choice(variant, chosen)
        other_bytes = budget.footprint(model, variant)[1]  # `embedding: auto` at the level chosen
    start = time.perf_counter()
    with located(where):
        variant.apply(model, samples)
    seconds = time.perf_counter() - start
    extra = variant.extra_outputs(model, samples, lambda: models.load(ctx.source, ctx.recipe.model.dtype)[0])
    outputs = {name: write_json(ctx.output("quantize", "method", output=name, variant=variant.label), obj)
               for name, obj in extra.items()}
    final = ctx.output("quantize", "checkpoint", variant=variant.label)
    with atomic_path(final) as tmp, warnings.catch_warnings():
        # llm-compressor leaves its offloading hooks on the model (all on the CPU here); the shard-size warning is moot
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
    used = variant.calibration_samples(samples).shape if variant.needs_data() else (0, 0)
    return {"checkpoint": final, **outputs}, {
        "calibration_seconds": round(seconds, 2), "size_bytes": models.size_on_disk(final), "method": variant.method,
        "scheme": variant.scheme_name, "group_size": variant.group_size, "calibration_samples": list(used),
        # calq.quant.budget's byte accounting: as stored here, and with every layer left as float16 (the baseline)
        "accounted_bytes": budget.variant_bytes(
            variant, shapes, chosen["promoted"] if chosen and variant.scheme == "w8a8" else
            variant.int8_layer_names(shapes), variant.int4_layer_names(shapes)) + other_bytes,
        "float_bytes": budget.variant_bytes(variant, shapes, tuple(shapes), level="float") + other_bytes,
        **({"budget": {**chosen, "promoted_to": budget.promotion(variant), "objective": variant.budget.objective}}
           if chosen else {})}
