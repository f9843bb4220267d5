"""The calibration samples: token windows of the calibration text."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from calq import data as data_mod
from calq import models
from calq.pipeline import Context
from calq.runs import atomic_path
from calq.stages import KINDS, StageKind


@KINDS.register
class Samples(StageKind):
    kind, pattern, group, words, order = "samples", "samples", "prepare", "sampling", 20
    outputs = {"samples": "samples.safetensors"}

    @classmethod
    def add_stages(cls, table) -> None:
        cal = table.recipe.calibration
        table.add("samples", stage_samples, needs=table.base,
                  settings=[cal.model_dump(exclude={"data"}), data_mod.fingerprint(cal.data, table.data_root),
                            *table.with_bos, *table.raised(cls)])


def stage_samples(ctx: Context):
    cal = ctx.recipe.calibration
    tokenizer = models.load_tokenizer(ctx.source)
    texts = data_mod.load_texts(cal.data, "calibration.data", ctx.data_root, tokenizer)
    if texts.note:
        ctx.log(f"[yellow]note:[/] {texts.note}")
    stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=sample_pool(cal))
    samples = data_mod.sample_windows(stream, cal.num_samples, cal.seq_len, cal.seed, "calibration",
                                      bos=models.bos_policy(tokenizer))
    out = ctx.output("samples", "samples")
    with atomic_path(out) as tmp:
        save_file({"input_ids": samples}, str(tmp), metadata={"source": texts.name})
    return {"samples": out}, {"source": texts.name, "note": texts.note, "tokens_read": int(stream.numel()),
                              "num_samples": cal.num_samples, "seq_len": cal.seq_len, "seed": cal.seed}


def sample_pool(cal) -> int:
    """Tokens of the calibration text the samples are drawn from (the rest of the text is never read for them)."""
    return cal.num_samples * cal.seq_len * 8


def load_samples(ctx: Context) -> torch.Tensor:
    return load_file(str(ctx.output("samples", "samples")))["input_ids"]
