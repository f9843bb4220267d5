"""Token-level evaluation of each variant under every calibrator (calq.evaluation.tokens)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from calq import data as data_mod
from calq import models
from calq.calib import hidden
from calq.evaluation import tokens as token_eval
from calq.models import BASELINE
from calq.pipeline import Context
from calq.runs import write_json
from calq.stage_kinds.calibrate import load_calibrators
from calq.stages import KINDS, StageKind


@KINDS.register
class Evaluate(StageKind):
    kind, pattern, group, words, order = "evaluate", "evaluate/<variant>", "evaluate", "evaluation", 100
    outputs = {"result": "eval/{variant}.json"}
    version = 4

    @classmethod
    def add_stages(cls, table) -> None:
        ev = table.recipe.evaluation.tokens
        for name, needs in table.evaluated_on().items():
            table.add(f"evaluate/{name}", stage_evaluate, name, needs=("eval_tokens", *needs),
                      settings=[ev.seq_len, ev.bins, cls.version, *table.with_bos])  # batch_size: speed, not results


def stage_evaluate(ctx: Context, name: str):
    ev = ctx.recipe.evaluation.tokens
    source = ctx.variant_source(name)
    model, tokenizer = models.load(source, ctx.recipe.model.dtype, ctx.recipe.model.device_map)
    cals, fitted = load_calibrators(ctx, name, model.config)
    device = model.get_output_embeddings().weight.device  # where the logits are, also with a device_map
    cals = {n: c.to(device) for n, c in cals.items()}
    stream = load_file(str(ctx.output("eval_tokens", "tokens")))["input_ids"]
    # windows of seq_len, BOS first when the tokenizer starts texts with it; evaluate cuts them at seq_len again
    stream = data_mod.windows(stream, ev.seq_len, models.bos_policy(tokenizer)).flatten()
    windows = stream.numel() // ev.seq_len
    # the divergence from the unquantized baseline, loaded alongside (the baseline's own: against its uncalibrated self)
    baseline = model if name == BASELINE else models.load(ctx.variant_source(BASELINE), ctx.recipe.model.dtype,
                                                          ctx.recipe.model.device_map)[0]
    result = {"tokens": token_eval.evaluate(model, stream, ev.seq_len, ev.batch_size, ev.bins, cals,
                                            progress=ctx.track(f"evaluate {name}", windows), baseline=baseline)}
    if fitted:
        with torch.no_grad():
            folder = ctx.output("calibrate", "calibrators", variant=name)
            cached = hidden.load_cached(folder / "heldout_hidden.safetensors")
            result["responses"] = {"calibrators": hidden.evaluate_cached(
                cached, torch.arange(len(cached)), hidden.Logits(model), cals,
                chunk=ctx.recipe.calibrators.logits_chunk, bins=ev.bins)}
        result.update(selected=fitted["selected"], validation=fitted["validation"], fit=fitted["fit"])
    out = write_json(ctx.output("evaluate", "result", variant=name), result)
    none = result["tokens"]["calibrators"]["none"]
    return {"result": out}, {"ece": none["ece"], "ppl": none["ppl"], "size_bytes": models.size_on_disk(source.location)}
