"""The held-out evaluation text, tokenized once."""

from __future__ import annotations

from safetensors.torch import save_file

from calq import data as data_mod
from calq import models
from calq.errors import CalqError
from calq.pipeline import Context
from calq.runs import atomic_path
from calq.stages import KINDS, StageKind


@KINDS.register
class EvalTokens(StageKind):
    kind, pattern, group, words, order = "eval_tokens", "eval_tokens", "evaluate", "tokenization", 90
    outputs = {"tokens": "eval_tokens.safetensors"}

    @classmethod
    def add_stages(cls, table) -> None:
        ev = table.recipe.evaluation.tokens
        table.add("eval_tokens", stage_eval_tokens, needs=table.base,
                  settings=[ev.max_tokens, data_mod.fingerprint(ev.data, table.data_root), *table.raised(cls)])


def stage_eval_tokens(ctx: Context):
    ev = ctx.recipe.evaluation.tokens
    tokenizer = models.load_tokenizer(ctx.source)
    texts = data_mod.load_texts(ev.data, "evaluation.tokens.data", ctx.data_root, tokenizer)
    if texts.note:
        ctx.log(f"[yellow]note:[/] {texts.note}")
    stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=ev.max_tokens)
    if stream.numel() < ev.seq_len:
        raise CalqError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {ev.seq_len}",
                        "evaluation.tokens", "use more text or a smaller seq_len")
    out = ctx.output("eval_tokens", "tokens")
    with atomic_path(out) as tmp:
        save_file({"input_ids": stream}, str(tmp), metadata={"source": texts.name})
    return {"tokens": out}, {"source": texts.name, "note": texts.note, "tokens": int(stream.numel())}
