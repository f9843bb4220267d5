"""A GGUF model dequantized once into the run folder (only for a GGUF base model)."""

from __future__ import annotations

from calq import models
from calq.pipeline import Context
from calq.runs import atomic_path
from calq.stages import KINDS, StageKind


@KINDS.register
class BaseModel(StageKind):
    kind, pattern, group, words, order = "base_model", "base_model", "prepare", "dequantization", 10
    outputs = {"model": "base_model"}

    @classmethod
    def add_stages(cls, table) -> None:
        if table.source.gguf_file:
            table.add("base_model", stage_base_model, settings=table.raised(cls) or None)


def stage_base_model(ctx: Context):
    """GGUF weights dequantized once into an ordinary transformers folder that every later stage loads."""
    source = ctx.original_source()
    model, tokenizer = models.load(source, ctx.recipe.model.dtype)
    final = ctx.output("base_model", "model")
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"model": final}, {"from": source.describe(), "size_bytes": models.size_on_disk(final),
                              "note": "dequantized from GGUF: the baseline carries the GGUF quantization error"}
