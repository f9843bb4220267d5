"""Cross-check a model read from a GGUF file against llama.cpp reading the same file.

transformers dequantizes a GGUF into an ordinary model and rebuilds its tokenizer from the metadata; llama.cpp
is the reference reader of the format. On the same text both must give the same token ids (BOS included),
and on the same ids close perplexities and the same next-token predictions. The transformers model runs on
dequantized float weights while llama.cpp multiplies the quantized blocks (on a CPU with 8-bit activations), so
small differences are expected; the bounds below leave room for them and for nothing else (a wrong tokenizer,
a wrong weight layout or a wrong configuration moves perplexity by orders of magnitude). Measured on the bundled
SmolLM2-135M Q4_1: see README "Baseline check".
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from calq import isolation
from calq.errors import CalqError
from calq.evaluation.baseline import score
from calq.models import VERIFIED_GGUF_ARCHITECTURES, bos_policy, gguf_architecture, with_bos

MAX_PPL_RATIO = 1.05  # llama.cpp's perplexity and ours may differ by at most 5% (either way)
MIN_AGREEMENT = 0.90  # share of positions where both predict the same next token
# Share of ids the two tokenizers produce alike (difflib's ratio). Not 1: transformers' reading of a GGUF tokenizer
# splits some whitespace runs differently from llama.cpp (measured: "\n   3" is ['\n  ', ' ', '3'] here and
# ['\n   ', '3'] there on indented text), which costs a few ids in a thousand, not a broken model.
MIN_TOKEN_MATCH = 0.95


def llama_cpp_reading(path: str, piece: str, ids: list[int], threads: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's token ids for `piece` and its logits [len(ids) - 1, V] on `ids` (runs in a child process)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True, verbose=False,
                n_threads=threads)
    try:
        theirs = llm.tokenize(piece.encode("utf-8"), add_bos=True, special=False)[: len(ids)]
        llm.eval(ids)  # our ids for both: the models are compared on the same input, whatever the tokenizers do
        return theirs, llm.scores[: len(ids) - 1].copy()
    finally:
        llm.close()


def cross_check(path: str | Path, model, tokenizer, text: str, tokens: int = 512,
                max_ppl_ratio: float = MAX_PPL_RATIO, min_agreement: float = MIN_AGREEMENT,
                where: str = "model.check", enforce: bool = True) -> dict | None:
    """Tokens, perplexity and next-token agreement of the transformers model against llama.cpp on the start of `text`.

    Returns None when llama-cpp-python is not installed (then only the architecture gate and the baseline check
    protect the run); otherwise the numbers for the report, raising one CalqError line when they disagree beyond
    the bounds (unless `enforce` is False). llama.cpp runs in a child process: a crash there raises
    calq.isolation.RuntimeCrashed (one line) whatever `enforce` says; the caller decides whether the run goes on."""
    start = time.perf_counter()
    piece = text[: 16 * (tokens + 1)]  # enough characters for the tokens compared; cut the same for both readers
    ours = with_bos(tokenizer(piece, add_special_tokens=False)["input_ids"], bos_policy(tokenizer))[: tokens + 1]
    if len(ours) < tokens + 1:
        raise CalqError(f"the text has {len(ours)} tokens, fewer than the {tokens + 1} the GGUF cross-check needs",
                        f"{where}.tokens", "lower model.check.tokens or use a longer evaluation text")
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    theirs, scores = isolation.run(
        "llama.cpp", f"cross-checking {Path(path).name} against transformers' reading of it", llama_cpp_reading,
        str(path), piece, ours, max(1, torch.get_num_threads()), where=where,
        fix=f"{isolation.LLAMA_CPP_FIX}; or set {where}.enforce: false to record the check as could-not-run and go on")
    logits = torch.from_numpy(scores).float()
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if mismatch is None and len(ours) != len(theirs):
        mismatch = min(len(ours), len(theirs))
    token_match = difflib.SequenceMatcher(None, ours, theirs, autojunk=False).ratio()
    ids = torch.tensor(ours)
    ref = score(model, ids[None])
    cpp_nll = torch.nn.functional.cross_entropy(logits, ids[1:])
    cpp_predictions = logits.argmax(-1)
    result = {"architecture": gguf_architecture(path), "tokens": tokens, "tokens_equal": mismatch is None,
              "first_token_mismatch": mismatch, "token_match": token_match, "min_token_match": MIN_TOKEN_MATCH,
              "differing_pieces": None if mismatch is None else
              [[tokenizer.decode([t]) for t in ids[mismatch: mismatch + 3]] for ids in (ours, theirs)],
              "ids_transformers": ours[:8], "ids_llama_cpp": theirs[:8],
              "ppl_transformers": ref["ppl"], "ppl_llama_cpp": math.exp(float(cpp_nll)),
              "top1_transformers": ref["top1"], "top1_llama_cpp": float((cpp_predictions == ids[1:]).float().mean()),
              "top1_agreement": float((cpp_predictions == ref["predictions"]).float().mean()),
              "max_ppl_ratio": max_ppl_ratio, "min_agreement": min_agreement,
              "seconds": round(time.perf_counter() - start, 1)}
    both = (result["ppl_transformers"], result["ppl_llama_cpp"])
    ratio = max(both) / min(both)
    problems = []
    if token_match < MIN_TOKEN_MATCH:
        problems.append(f"the tokenizer's ids match llama.cpp's for {token_match:.1%} of tokens (at least "
                        f"{MIN_TOKEN_MATCH:.0%} needed); first difference at token {mismatch}: "
                        f"{result['differing_pieces'][0]} here, {result['differing_pieces'][1]} in llama.cpp")
    if not ratio <= max_ppl_ratio:
        problems.append(f"perplexity {result['ppl_transformers']:,.2f} here against {result['ppl_llama_cpp']:,.2f} "
                        f"in llama.cpp on the same ids (more than {max_ppl_ratio:g}× apart)")
    if not result["top1_agreement"] >= min_agreement:
        problems.append(f"next-token predictions agree with llama.cpp's on {result['top1_agreement']:.1%} of "
                        f"positions (at least {min_agreement:.0%} needed)")
    result["passed"], result["problem"] = not problems, "; ".join(problems) or None
    if problems and enforce:
        raise CalqError(f"the model transformers read from {Path(path).name} does not match llama.cpp's reading: "
                        f"{result['problem']}", where,
                        "use the model's original Hugging Face folder, or report the architecture "
                        f"'{result['architecture']}' to calq (verified: {', '.join(VERIFIED_GGUF_ARCHITECTURES)}); "
                        f"to proceed anyway set {where}.enforce: false")
    return result
