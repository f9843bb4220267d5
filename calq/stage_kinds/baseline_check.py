"""Is the baseline a working LM (calq.evaluation.trust)? Checked before any long work."""

from __future__ import annotations

from pathlib import Path

from calq import data as data_mod
from calq import models
from calq.evaluation import trust
from calq.pipeline import Context
from calq.runs import write_json
from calq.stages import KINDS, StageKind


@KINDS.register
class BaselineCheck(StageKind):
    kind, pattern, group, words, order = "baseline_check", "baseline_check", "prepare", "baseline check", 30
    outputs = {"result": "baseline_check.json"}

    @classmethod
    def add_stages(cls, table) -> None:
        # before any long work (ranges, quantization); not a need of later stages: its settings must not rekey them
        recipe = table.recipe
        table.add("baseline_check", stage_baseline_check, needs=table.base,
                  settings=[recipe.model.check.model_dump(),
                            data_mod.fingerprint(recipe.evaluation.tokens.data, table.data_root), cls.version])


def stage_baseline_check(ctx: Context):
    """Is the baseline a working LM, and for a GGUF the model llama.cpp reads from the file? (calq.evaluation.trust)
    A failure stops the run with one line (exit 2) unless `model.check.enforce` is false."""
    m = ctx.recipe.model
    model, tokenizer = models.load(ctx.source, m.dtype)
    texts = data_mod.load_texts(ctx.recipe.evaluation.tokens.data, "evaluation.tokens.data", ctx.data_root, tokenizer)
    original = ctx.original_source()
    gguf = Path(original.location) / original.gguf_file if original.gguf_file else None
    info = trust.verify(model, tokenizer, texts.docs, texts.name, gguf, **m.check.model_dump())
    if not info["passed"]:
        ctx.log(f"[yellow]baseline check failed, not enforced:[/] {info['problem']}")
    return {"result": write_json(ctx.output("baseline_check", "result"), info)}, info
