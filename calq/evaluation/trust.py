"""The baseline check stage's work in one call: is the loaded baseline a working LM, and (for a GGUF) the same
model llama.cpp reads from the file? Numbers for the report, or one CalqError line before any long work."""

from __future__ import annotations

from pathlib import Path

from calq.data import token_stream
from calq.errors import CalqError
from calq.evaluation import gguf_check
from calq.evaluation.baseline import WHAT_TO_CHECK, check_baseline
from calq.isolation import RuntimeCrashed
from calq.models import bos_policy


def verify(model, tokenizer, docs: list[str], source: str, gguf_path: str | Path | None = None, tokens: int = 512,
           max_ppl: float | None = None, margin: float = 1.0, max_ppl_ratio: float = gguf_check.MAX_PPL_RATIO,
           min_agreement: float = gguf_check.MIN_AGREEMENT, enforce: bool = True, where: str = "model.check") -> dict:
    """{"baseline": check_baseline's numbers, "llama_cpp": cross_check's numbers or None, "passed", "problem",
    "enforced"}. `docs` is the held-out evaluation text (its start is scored); `gguf_path` the file the model
    was read from, if any. Raises one CalqError naming every problem when `enforce` and something is wrong; when
    llama.cpp crashes, raises its RuntimeCrashed line if `enforce`, else records {"could_not_run": why}."""
    bos = bos_policy(tokenizer)
    stream = token_stream(docs, tokenizer, max_tokens=2 * tokens + 2)
    result = {"bos": bos, "enforced": enforce,
              "baseline": check_baseline(model, stream, bos, tokens, max_ppl, margin, source, where, enforce=False),
              "llama_cpp": None}
    if gguf_path is not None:
        try:
            result["llama_cpp"] = gguf_check.cross_check(gguf_path, model, tokenizer, "\n".join(docs), tokens,
                                                         max_ppl_ratio, min_agreement, where, enforce=False)
        except RuntimeCrashed as err:
            if enforce:
                raise
            result["llama_cpp"] = {"could_not_run": err.what}
    # the cross-check names the cause (tokenizer, weights) more precisely than the perplexity bound, so it goes first
    problems = [r["problem"] for r in (result["llama_cpp"], result["baseline"]) if r and r.get("problem")]
    result["passed"], result["problem"] = not problems, "; ".join(problems) or None
    if problems and enforce:
        raise CalqError(f"the baseline is not a working language model: {result['problem']}", where,
                        f"{WHAT_TO_CHECK}; to proceed anyway set {where}.enforce: false")
    return result
