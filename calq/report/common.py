"""What report.md and report.html (and the CLI summary) format alike."""

from __future__ import annotations

from calq.calib.select import worst_change

EVAL_SETS = {"tokens": "held-out text", "responses": "held-out instruction responses"}


def mb(n: int | None) -> str:
    """Bytes as MiB with one decimal, or a dash when unknown."""
    return f"{n / 2**20:,.1f}" if n else "–"


def calibrators_text(c: dict, code) -> str:
    """How the calibrators were fitted, one paragraph; `code(text)` marks up the data file name."""
    settings = c["settings"]
    fitted = ", ".join(f"{name} ({', '.join(f'{k} {v}' for k, v in settings[name].items())})" if settings.get(name)
                       else name for name in settings["use"])
    text = c.get("validation_text")
    validated = (f" and on {text['tokens']:,} tokens of plain text from {code(text['source'])} (windows of "
                 f"{text['seq_len']}; never the evaluation text"
                 + (f", nor a calibration sample: {text['left_out_sample_windows']} sample windows left out"
                    if text.get("left_out_sample_windows") else "") + ")") if text else ""
    return (f"Fitted per variant on that model's own hidden states: {fitted}. Data: {c['fit_records']} fit records "
            f"({settings['val_fraction']:.0%} of them validate) and {c['heldout_records']} held-out records from "
            f"{code(c['source'])} (seed {c['seed']}). Validated on the validation records{validated}; the selected "
            "calibrator (*) has the smallest worst-domain change of validation "
            f"{settings['select_by'].upper()} against none, so it is never worse than none on a validation domain.")


VALIDATION_DOMAINS = {"instructions": "instruction responses", "text": "plain text"}


def validation_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the selection: every variant x calibrator, ECE and NLL per validation domain, and the
    worst-domain relative change of the selection metric against none. No rows for runs validated on one domain
    before domains were recorded."""
    by = (report.get("calibrators") or {}).get("settings", {}).get("select_by", "ece")
    variants = [v for v in report["variants"] if v.get("validation") and "none" not in v["validation"]]
    if not variants:
        return [], []
    domains = list(variants[0]["validation"])
    header = ["variant", "calibrator",
              *(f"{VALIDATION_DOMAINS.get(d, d)} {m}" for d in domains for m in ("ECE", "NLL")),
              f"worst {by.upper()} change"]
    rows = []
    for v in variants:
        for cal in v["validation"][domains[0]]:
            cells = [f"{v['validation'][d][cal][m]:.4f}" for d in domains for m in ("ece", "nll")]
            change = worst_change(v["validation"], cal, by)
            rows.append([v["variant"], cal + (" *" if cal == v["selected"] else ""), *cells, f"{change:+.1%}"])
    return header, rows


def baseline_check_lines(check: dict, code, bold) -> list[str]:
    """The baseline check in sentences (report.md and report.html): the model against the unigram bound, and for a
    GGUF the model against llama.cpp reading the same file."""
    b = check["baseline"]
    bos = "none" if b["bos"] is None else f"id {b['bos']}"
    bound = ("the bound" + (f" × {b['margin']}" if b["margin"] != 1 else "")
             + (f"; max_ppl {b['max_ppl']}" if b["max_ppl"] else ""))
    lines = [(f"{b['tokens']} tokens of {code(b['source'])} (BOS: {bos}): perplexity {b['ppl']:.2f}, "
              f"top-1 {b['top1']:.4f}; "
              f"the best unigram model of the same tokens: perplexity {b['unigram_ppl']:.2f}, "
              f"top-1 {b['unigram_top1']:.4f} ({bound}).")]
    c = check.get("llama_cpp")
    if c and "could_not_run" in c:
        lines.append(f"GGUF against llama.cpp: {bold('could not run')} ({c['could_not_run']}); not enforced.")
    elif c:
        same = "identical" if c["tokens_equal"] else (
            f"{c['token_match']:.1%} alike (first difference at token {c['first_token_mismatch']}: "
            f"{c['differing_pieces'][0]} here, {c['differing_pieces'][1]} in llama.cpp)")
        lines.append(f"GGUF against llama.cpp on the same ids: perplexity {c['ppl_transformers']:.2f} vs "
                     f"{c['ppl_llama_cpp']:.2f} (at most {c['max_ppl_ratio']:g}× apart), next-token agreement "
                     f"{c['top1_agreement']:.1%} (at least {c['min_agreement']:.0%}), token ids {same} (BOS included).")
    if check["passed"]:
        lines.append("Verdict: passed.")
    else:
        lines.append(f"Verdict: {bold('failed')}{'' if check['enforced'] else ' (not enforced)'}: {check['problem']}.")
    return lines


def deployed_decode(d: dict) -> str:
    """The decode graph's generation check in one sentence (report.md and report.html)."""
    tokens = ("the same greedy tokens as PyTorch" if d["greedy_tokens_equal"]
              else f"greedy tokens differ from PyTorch's from step {d['first_mismatch']}")
    return (f"its decode graph (KV cache, {d['decode_logits']} logits) generated {d['new_tokens']} tokens after "
            f"{d['prompt_tokens']}: {tokens}; step logits within {d['max_abs_diff_vs_model_onnx']:.2g} of the "
            "scoring graph's")
