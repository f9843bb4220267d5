"""Plain-text windows the calibrators are validated on (calibrators.validation_text)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from calq import data as data_mod
from calq import models
from calq.errors import CalqError
from calq.pipeline import Context
from calq.recipe import Recipe
from calq.runs import atomic_path
from calq.stage_kinds.samples import sample_pool
from calq.stages import KINDS, StageKind


@KINDS.register
class ValidationText(StageKind):
    kind, pattern, group, words, order = "validation_text", "validation_text", "calibrate", "validation text", 70
    outputs = {"windows": "validation_text.safetensors"}

    @classmethod
    def check(cls, recipe, data_root, variants, config) -> None:
        if recipe.calibrators is not None:
            check_validation_text(recipe, data_root)

    @classmethod
    def add_stages(cls, table) -> None:
        spec, cal = table.recipe.calibrators, table.recipe.calibration
        if spec is None or spec.validation_text is None:
            return
        text = spec.validation_text
        table.add("validation_text", stage_validation_text, needs=table.base,
                  settings=[text.model_dump(exclude={"data"}), spec.seed, cal.model_dump(exclude={"data"}),
                            data_mod.fingerprint(text.data or cal.data, table.data_root), *table.with_bos,
                            *table.raised(cls)])


def check_validation_text(recipe: Recipe, data_root: Path | None) -> None:
    """The calibrators' plain-text validation data is available and is not the evaluation text (before long work)."""
    text, ev = recipe.calibrators.validation_text, recipe.evaluation.tokens.data
    if text is None or text.data is None:  # the default, the calibration text, is checked against it in plan()
        return
    data_mod.check_available(text.data, "calibrators.validation_text.data", data_root)
    validated = {(text.data.source, text.data.split), (text.data.fallback, text.data.split)} - {(None, text.data.split)}
    if validated & {(ev.source, ev.split), (ev.fallback, ev.split)}:
        raise CalqError("the calibrators' validation text is the evaluation text", "calibrators.validation_text.data",
                        "validate on other text: another file or split, or omit data (the calibration text)")


def stage_validation_text(ctx: Context):
    """Windows of plain text (calibration.seq_len tokens) the calibrators are validated on beside the instruction
    responses: from `calibrators.validation_text.data`, or by default from the calibration text, never a window the
    calibration samples took. Never the evaluation text (plan() refuses it)."""
    spec, cal, seed = ctx.recipe.calibrators.validation_text, ctx.recipe.calibration, ctx.recipe.calibrators.seed
    tokenizer = models.load_tokenizer(ctx.source)
    bos = models.bos_policy(tokenizer)
    count = max(1, spec.tokens // cal.seq_len)
    where = "calibration.data" if spec.data is None else "calibrators.validation_text.data"
    texts = data_mod.load_texts(spec.data or cal.data, where, ctx.data_root, tokenizer)
    taken: list[int] = []
    if spec.data is None:  # the samples' windows are the first ones of this stream's grid: leave them out
        stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=sample_pool(cal) + count * cal.seq_len)
        pool = data_mod.windows(stream[:sample_pool(cal)], cal.seq_len, bos).shape[0]
        taken = data_mod.chosen_windows(pool, min(cal.num_samples, pool), cal.seed)
    else:
        stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=count * cal.seq_len)
    windows = data_mod.free_windows(stream, cal.seq_len, taken, count, seed, bos)
    if windows.shape[0] == 0:
        raise CalqError(f"{texts.name} has no window of {cal.seq_len} tokens left for validation", where,
                        "give calibrators.validation_text.data, or more text")
    out = ctx.output("validation_text", "windows")
    with atomic_path(out) as tmp:
        save_file({"input_ids": windows}, str(tmp), metadata={"source": texts.name})
    return {"windows": out}, {"source": texts.name, "note": texts.note, "windows": windows.shape[0],
                              "seq_len": cal.seq_len, "tokens": int(windows.numel()),
                              "left_out_sample_windows": len(taken)}
