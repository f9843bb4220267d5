"""Is the loaded baseline a working language model? A cheap check before hours of quantization and calibration.

One forward pass over a few hundred held-out tokens gives the model's perplexity and top-1 next-token accuracy.
The bound it must beat is the perplexity of the best unigram model *of those very tokens*: their empirical
frequencies, fitted on the scored tokens themselves (maximum likelihood, no smoothing). By Gibbs' inequality no
context-free model (no model that ignores the preceding tokens) can have a lower perplexity on these tokens, so a
model above that bound uses its context worse than not using it at all: its weights, its tokenizer, or the way
the text reaches it (BOS, special tokens) is broken. Why fitted in-sample rather than on a disjoint part:
a held-out unigram needs smoothing over the whole vocabulary, and with a few hundred tokens against 49k-262k
entries the smoothing dominates (add-one on 512 tokens of a 262k vocabulary gives a unigram perplexity near
100,000), so a broken model would pass; the in-sample bound is the strictest a unigram can set, never
depends on a smoothing choice, and is at most the number of scored tokens. A working model beats it by
a wide margin (the bundled SmolLM2-135M: see README "Baseline check"); a randomly initialised model does not
(its perplexity is about the vocabulary size).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from calq.data import windows
from calq.errors import CalqError

if TYPE_CHECKING:
    import torch


class BaselineCheck(BaseModel):
    """The recipe's `model.check`: the bounds the loaded baseline must meet before any long work."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tokens: int = Field(
        512, ge=16, description="next-token predictions scored at the start of the evaluation text "
                                "(perplexity and top-1, against the best unigram model of those tokens)")
    max_ppl: float | None = Field(None, gt=0, description="also refuse a baseline perplexity above this")
    margin: float = Field(1.0, gt=0, description="refuse when perplexity > margin × the unigram perplexity")
    max_ppl_ratio: float = Field(1.05, ge=1, description="GGUF: transformers vs llama.cpp perplexity on the same ids, "
                                                         "at most this far apart (either way)")
    min_agreement: float = Field(0.90, ge=0, le=1, description="GGUF: share of positions where transformers and "
                                                               "llama.cpp predict the same next token")
    enforce: bool = Field(True, description="false: measure and report, but continue with a baseline that fails")


WHAT_TO_CHECK = ("check the tokenizer (the ids must be those the model was trained with), the BOS token "
                 "(models.bos_policy), and for a GGUF file its conversion "
                 "(calq verifies the 'llama' GGUF architecture)")


def unigram(targets: torch.Tensor) -> dict:
    """Perplexity and top-1 accuracy of the maximum-likelihood unigram model of `targets` on `targets` itself."""
    import torch

    counts = torch.bincount(targets.flatten()).double()
    counts = counts[counts > 0]
    p = counts / counts.sum()
    return {"ppl": math.exp(float(-(p * p.log()).sum())), "top1": float(p.max())}


def score(model, token_windows: torch.Tensor, limit: int | None = None) -> dict:
    """Perplexity, top-1 accuracy and argmax predictions of `model` on the next-token predictions inside
    `token_windows` [n, L] (each window's first token is context only), the first `limit` of them in order."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=token_windows.to(device)).logits[:, :-1].float()
    logits, targets = logits.reshape(-1, logits.shape[-1])[:limit], token_windows[:, 1:].reshape(-1)[:limit].to(device)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    predictions = logits.argmax(-1)
    return {"ppl": math.exp(float(nll)), "top1": float((predictions == targets).float().mean()),
            "predictions": predictions.cpu(), "targets": targets.cpu()}


def check_baseline(model, token_ids: torch.Tensor, bos: int | None = None, tokens: int = 512,
                   max_ppl: float | None = None, margin: float = 1.0, source: str = "the evaluation text",
                   where: str = "model.check", enforce: bool = True) -> dict:
    """Score the first `tokens` predictions of the stream `token_ids` (one window, or several when the model's
    context is shorter; BOS first when `bos` is given) against the unigram bound and an optional `max_ppl`.

    Returns the numbers for the report ({"passed", "problem", "ppl", "top1", "unigram_ppl", ...}); with `enforce`
    a failed check raises one CalqError line saying what to check (`enforce=False` is the recipe's explicit override).
    """
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or tokens + 1
    seq_len = min(tokens + 1, context)
    chunk = windows(token_ids, seq_len, bos)
    per_window = seq_len - 1
    needed = math.ceil(tokens / per_window)
    if chunk.shape[0] < needed:
        raise CalqError(f"{source} has {token_ids.numel()} tokens, fewer than the {tokens} the baseline check scores",
                        f"{where}.tokens", "lower model.check.tokens or use a longer evaluation text")
    measured = score(model, chunk[:needed], tokens)
    uni = unigram(measured["targets"])
    bound = margin * uni["ppl"]
    result = {"tokens": int(measured["targets"].numel()), "windows": needed, "seq_len": seq_len, "bos": bos,
              "ppl": measured["ppl"], "top1": measured["top1"], "unigram_ppl": uni["ppl"], "unigram_top1": uni["top1"],
              "margin": margin, "bound": bound, "max_ppl": max_ppl, "source": source}
    problems = []
    if not measured["ppl"] <= bound:  # also catches NaN
        times = f" × {margin}" if margin != 1 else ""
        problems.append(f"perplexity {measured['ppl']:,.1f} on {result['tokens']} tokens of {source} is worse than "
                        f"the unigram model of the same tokens ({uni['ppl']:,.1f}{times})")
    if max_ppl is not None and not measured["ppl"] <= max_ppl:
        problems.append(f"perplexity {measured['ppl']:,.1f} is above max_ppl {max_ppl:,.1f}")
    result["passed"] = not problems
    result["problem"] = "; ".join(problems) or None
    if problems and enforce:
        raise CalqError(f"the baseline is not a working language model: {result['problem']}", where,
                        f"{WHAT_TO_CHECK}; to proceed anyway set {where}.enforce: false")
    return result
