"""The report's sections, built once from report.json's content and rendered by report.md and report.html alike.

Order: the verdict first (gates, then a summary per variant), then the detail: token-level, calibrator and task
tables, reliability diagrams, deployed artifacts, activation outliers, methods, and the exact recipe and versions.
**Adding a section is one function** decorated with `@section`: it takes report.json's content and returns a
`Section` (None when the run has nothing to show); it is placed after those registered before it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import yaml

from calq.calib.select import worst_change
from calq.report import answers as answer_report
from calq.report import plots
from calq.report.model import Bullets, Code, Plot, Plots, Section, Table, Text, Verdict, ci, mb, num

SECTIONS: list[Callable[[dict], Section | None]] = []

EVAL_SETS = {"tokens": "held-out text", "responses": "held-out instruction responses"}
VALIDATION_DOMAINS = {"instructions": "instruction responses", "text": "plain text"}


def section(fn: Callable[[dict], Section | None]) -> Callable[[dict], Section | None]:
    SECTIONS.append(fn)
    return fn


def build(report: dict) -> list[Section]:
    return [s for fn in SECTIONS if (s := fn(report)) is not None]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@section
def opening(report: dict) -> Section:
    model = report["model"]
    notes = [n for n in (model.get("note"), report["calibration"].get("note"),
                         report["evaluation"]["tokens"].get("note"), *report.get("notes", [])) if n]
    return Section("", [Text(f"Model `{model['source']}` ({model['dtype']}), created {report['created']}.", muted=True),
                        *(Text(f"Note: {n}.", muted=True) for n in notes), verdict(report.get("gates"))])


def verdict(gates: dict | None) -> Verdict:
    if not gates:
        return Verdict("none", "No gates configured: this report decides nothing by itself.")
    results = gates["results"]
    failed = [r for r in results if not r["passed"]]
    if not failed:
        constant = sum(bool(r.get("note")) for r in results)
        return Verdict("pass", f"**PASS**: all {len(results)} gate checks passed" + (
            f"; {constant} of them rest on a constant predictor (answer confidence collapsed to uniform, allowed by "
            "allow_constant_answers)." if constant else "."))
    return Verdict("fail", f"**FAIL**: {len(failed)} of {len(results)} gate checks failed.",
                   [f"{r['name']}: nothing to check" if r["value"] is None else
                    f"{r['name']}: {r['value']:.4f}, a constant predictor (answer confidence collapsed to uniform)"
                    if r.get("note") and r["margin"] >= 0 else
                    f"{r['name']}: {r['value']:.4f} against at most {r['threshold']:.4f} (over by {-r['margin']:.4f})"
                    for r in failed])


@section
def gates(report: dict) -> Section | None:
    g = report.get("gates")
    if not g:
        return None
    rows = [[r["gate"], r["variant"] or "–", r["calibrator"] or "–", r["task"] or "–", num(r["value"]),
             num(r["threshold"]), num(r["margin"]),
             ("pass" if r["passed"] else "**FAIL**") + (f" ({r['note']})" if r.get("note") else "")]
            for r in g["results"]]
    settings = ", ".join(f"{k}: {v}" for k, v in g["config"].items() if v is not None)
    constant = (" \"Constant predictor\": the answer calibrator's confidence collapsed to 1/choices, so its ECE is "
                "|accuracy − 1/choices| and says nothing about which answers are right; such a check fails unless "
                "the gates set allow_constant_answers (for tasks where the model is at chance)."
                if any(r.get("note") for r in g["results"]) else "")
    return Section("Gates", [
        Table(["gate", "variant", "calibrator", "task", "value", "threshold", "margin", "result"], rows, {4, 5, 6}),
        Text(f"Margin = threshold − value: headroom when positive. Gates: {settings}.{constant}", muted=True)])


def baseline_check_lines(check: dict) -> list[str]:
    """The baseline check in sentences: the model against the unigram bound, and for a GGUF the model against
    llama.cpp reading the same file."""
    b = check["baseline"]
    bos = "none" if b["bos"] is None else f"id {b['bos']}"
    bound = ("the bound" + (f" × {b['margin']}" if b["margin"] != 1 else "")
             + (f"; max_ppl {b['max_ppl']}" if b["max_ppl"] else ""))
    lines = [(f"{b['tokens']} tokens of `{b['source']}` (BOS: {bos}): perplexity {b['ppl']:.2f}, "
              f"top-1 {b['top1']:.4f}; "
              f"the best unigram model of the same tokens: perplexity {b['unigram_ppl']:.2f}, "
              f"top-1 {b['unigram_top1']:.4f} ({bound}).")]
    c = check.get("llama_cpp")
    if c and "could_not_run" in c:
        lines.append(f"GGUF against llama.cpp: **could not run** ({c['could_not_run']}); not enforced.")
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
        lines.append(f"Verdict: **failed**{'' if check['enforced'] else ' (not enforced)'}: {check['problem']}.")
    return lines


@section
def baseline_check(report: dict) -> Section | None:
    check = report.get("baseline_check")
    return Section("Baseline check", [Text(line) for line in baseline_check_lines(check)]) if check else None


@section
def summary(report: dict) -> Section:
    """Per variant: size, perplexity, token ECE; mean task accuracy and mean answer-level ECE per calibrator."""
    task_rows = (report.get("tasks") or {}).get("results", [])
    calibrators = list(dict.fromkeys(r["calibrator"] for r in task_rows))
    header = ["variant", "size (MB)", "ppl", "token ECE"]
    header += [f"mean accuracy ({c})" for c in calibrators] + [f"mean answer ECE ({c})" for c in calibrators]
    rows = []
    for v in report["variants"]:
        mine = [r for r in task_rows if r["variant"] == v["variant"]]
        acc = [_mean([r["accuracy"] for r in mine if r["calibrator"] == c]) for c in calibrators]
        ece = [_mean([r["ece"] for r in mine if r["calibrator"] == c]) for c in calibrators]
        rows.append([v["variant"], mb(v.get("size_bytes")), num(v["ppl"], 2), num(v["ece"]),
                     *map(num, acc), *map(num, ece)])
    note = " Task means are unweighted over tasks." if task_rows else ""
    return Section("Summary", [
        Table(header, rows, set(range(1, len(header)))),
        Text(f"Token-level numbers are uncalibrated (calibrated ones: Calibrators).{note}", muted=True),
        *(Text(f"**Skipped variant {name}**: {why}") for name, why in report.get("skipped", {}).items())])


@section
def token_level(report: dict) -> Section:
    ev = report["evaluation"]["tokens"]
    rows = [[v["variant"], num(v["ppl"], 2), num(v["accuracy"]), num(v["confidence"]), num(v["ece"]),
             num(v["adaptive_ece"]), num(v["brier"]), num(v["tokens"])] for v in report["variants"]]
    diagram = partial(plots.reliability_diagram, {f"{v['variant']} (ECE {v['ece']:.3f})": v["reliability"]
                                                  for v in report["variants"]}, "next-token reliability")
    return Section("Token-level calibration", [
        Text(f"{ev['tokens']:,} tokens of `{ev['source']}` in windows of {ev['seq_len']}; ECE with {ev['bins']} "
             "equal-width bins (adaptive ECE: equal-mass bins).", muted=True),
        Table(["variant", "ppl", "top-1 acc", "confidence", "ECE", "adaptive ECE", "Brier", "tokens"], rows,
              set(range(1, 8))),
        Plots([Plot(diagram, "token-level reliability diagram")])])


DIVERGENCE_HEADER = ["mean KLD", "median KLD", "99% KLD", "max KLD", "same top token", "RMS Δp", "tokens"]


def divergence_cells(d: dict) -> list[str]:
    """One row's cells under DIVERGENCE_HEADER (llama.cpp's `--kl-divergence` quantities)."""
    return [f"{d['mean_kld']:.4g}", f"{d['median_kld']:.4g}", f"{d['p99_kld']:.4g}", f"{d['max_kld']:.4g}",
            f"{d['same_top1']:.1%}", f"{d['rms_delta_p']:.2%}", num(d["tokens"])]


@section
def divergence(report: dict) -> Section | None:
    """Every variant x calibrator against the uncalibrated unquantized baseline on the held-out text."""
    rows = [[v["variant"], cal, *divergence_cells(d)] for v in report["variants"]
            for cal, d in (v.get("divergence") or {}).items()]
    if not rows:
        return None
    ev = report["evaluation"]["tokens"]
    return Section("Divergence from the baseline", [
        Text(f"KL(baseline ‖ variant) per token on the same {ev['tokens']:,} held-out tokens of `{ev['source']}`, "
             "with each calibrator against the **uncalibrated** baseline, so a calibrator's own change of the "
             "distribution shows too (the baseline's calibrator rows are that change alone). Same top token: the "
             "share of positions where both predict the same next token; Δp: the variant's probability of the "
             "correct token minus the baseline's. Definitions as llama.cpp's `llama-perplexity --kl-divergence` "
             "(percentiles from a fixed histogram of log KLD, within 0.1%).", muted=True),
        Table(["variant", "calibrator", *DIVERGENCE_HEADER], rows, set(range(2, 2 + len(DIVERGENCE_HEADER))))])


def calibrators_text(c: dict) -> str:
    """How the calibrators were fitted, one paragraph."""
    settings = c["settings"]
    fitted = ", ".join(f"{name} ({', '.join(f'{k} {v}' for k, v in settings[name].items())})" if settings.get(name)
                       else name for name in settings["use"])
    text = c.get("validation_text")
    validated = (f" and on {text['tokens']:,} tokens of plain text from `{text['source']}` (windows of "
                 f"{text['seq_len']}; never the evaluation text"
                 + (f", nor a calibration sample: {text['left_out_sample_windows']} sample windows left out"
                    if text.get("left_out_sample_windows") else "") + ")") if text else ""
    return (f"Fitted per variant on that model's own hidden states: {fitted}. Data: {c['fit_records']} fit records "
            f"({settings['val_fraction']:.0%} of them validate) and {c['heldout_records']} held-out records from "
            f"`{c['source']}` (seed {c['seed']}). Validated on the validation records{validated}; the selected "
            "calibrator (*) has the smallest worst-domain change of validation "
            f"{settings['select_by'].upper()} against none, so it is never worse than none on a validation domain.")


def validation_table(report: dict) -> Table | None:
    """The selection: every variant x calibrator, ECE and NLL per validation domain, and the worst-domain relative
    change of the selection metric against none. None for runs validated on one domain before domains were
    recorded."""
    by = report["calibrators"]["settings"].get("select_by", "ece")
    variants = [v for v in report["variants"] if v.get("validation") and "none" not in v["validation"]]
    if not variants:
        return None
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
    return Table(header, rows, set(range(2, len(header))), title="Validation (selection)")


@section
def calibrators(report: dict) -> Section | None:
    """Per held-out set: every variant x calibrator, reliability diagrams per variant, and the goals."""
    c = report.get("calibrators")
    if not c:
        return None
    blocks = [Text(calibrators_text(c), muted=True)]
    if (validation := validation_table(report)) is not None:
        blocks.append(validation)
    for part, title in EVAL_SETS.items():
        variants = [v for v in report["variants"] if part in v["calibrated"]]
        if not variants:
            continue
        rows = [[v["variant"], cal + (" *" if cal == v["selected"] else ""), num(m["nll"]), num(m["accuracy"]),
                 num(m["confidence"]), num(m["ece"]), num(m["adaptive_ece"]), num(m["brier"]), num(m["tokens"])]
                for v in variants for cal, m in v["calibrated"][part].items()]
        figures = [Plot(partial(plots.reliability_diagram,
                                {f"{cal} (ECE {m['ece']:.3f})": m["reliability"]
                                 for cal, m in v["calibrated"][part].items() if m.get("reliability")},
                                f"{v['variant']}: {title}"), f"{v['variant']} {part} reliability diagram")
                   for v in variants]
        blocks += [Table(["variant", "calibrator", "NLL", "acc", "conf", "ECE", "adaptive ECE", "Brier", "tokens"],
                         rows, set(range(2, 9)), title=title.capitalize()),
                   Plots(figures, grid=True)]
    if report.get("goals"):
        rows = [[g["set"], g["variant"], g["goal"], num(g["value"]), num(g["bound"]), "yes" if g["met"] else "**no**"]
                for g in report["goals"]]
        blocks += [Table(["set", "variant", "goal", "value", "bound", "met"], rows, {3, 4}, title="Goals"),
                   Text("Checked on every held-out set; unlike gates, they do not set the exit code.", muted=True)]
    return Section("Calibrators", blocks)


@section
def tasks(report: dict) -> Section | None:
    part = report.get("tasks")
    if not part:
        return None
    s, results = part["settings"], part["results"]
    rows = [[r["variant"], r["calibrator"], r["task"], str(r["n"]),
             f"{r['metric']} {ci(r['accuracy'], r['accuracy_ci'], 4)}", num(r["confidence"]),
             ci(r["ece"], r["ece_ci"], 4), ci(r["brier"], r["brier_ci"], 4)] for r in results]
    questions = f"the first {s['limit']}" if s["limit"] else "all"
    blocks = [Text(f"lm-eval {s['lm_eval']}, {questions} questions per task, data from `{s['data_dir']}`. "
                   "Answer-level calibration of multiple-choice tasks: softmax over the choices' log-likelihoods, "
                   f"confidence = top choice; ECE with {s['bins']} bins. Intervals: {s['level']:.0%} percentile "
                   f"bootstrap over questions ({s['bootstrap']} replicates, seed {s['seed']}).", muted=True),
              Table(["variant", "calibrator", "task", "n", "accuracy [CI]", "confidence", "answer ECE [CI]",
                     "Brier [CI]"], rows, {3, 5}),
              Plots([Plot(partial(plots.task_chart, results), "accuracy and answer-level ECE per task")])]
    for task in dict.fromkeys(r["task"] for r in results):
        mine = [r for r in results if r["task"] == task and r["reliability"]]
        figures = [Plot(partial(plots.reliability_diagram, {f"{r['variant']} (ECE {r['ece']:.3f})": r["reliability"]
                                                            for r in mine if r["calibrator"] == c}, f"{task}: {c}"),
                        f"{task} {c} reliability diagram")
                   for c in dict.fromkeys(r["calibrator"] for r in mine)]
        if figures:
            blocks.append(Plots(figures, title=f"{task}: answer-level reliability", grid=True))
    return Section("Tasks (lm-eval)", blocks)


@section
def answers(report: dict) -> Section | None:
    part = report.get("answers")
    if not part:
        return None
    blocks = []
    for table in answer_report.tables(part):
        blocks.append(Table(**table))
        if table["title"] == "Summary":
            chosen = [r for r in part["results"] if r["selected"] or r["calibrator"] == "none"]
            blocks.append(Plots([Plot(partial(plots.risk_coverage, chosen),
                                      "risk-coverage curves per evaluation task")]))
    return Section("Answer-level calibration (tasks the calibrators never saw)", blocks)


def deployed_decode(d: dict) -> str:
    """The decode graph's generation check in one sentence."""
    diff = d.get("max_abs_diff_vs_scoring", d.get("max_abs_diff_vs_model_onnx"))  # the key of runs before executorch
    tokens = ("the same greedy tokens as PyTorch" if d["greedy_tokens_equal"]
              else f"greedy tokens differ from PyTorch's from step {d['first_mismatch']}")
    return (f"its decode graph (KV cache, {d['decode_logits']} logits) generated {d['new_tokens']} tokens after "
            f"{d['prompt_tokens']}: {tokens}; step logits within {diff:.2g} of the scoring graph's"
            + (f"; {d['prefill_tokens_per_second']:,.0f} prefill and {d['decode_tokens_per_second']:,.1f} decode "
               f"tokens/s on {d['threads']} thread(s) in that run" if d.get("decode_tokens_per_second") else ""))


@section
def deployed(report: dict) -> Section | None:
    rows = report.get("deployed")
    if not rows:
        return None
    changes = [f"{r['variant']} as {r['format']}: {c}" for r in rows
               for c in ([deployed_decode(r["decode"])] if r.get("decode") else [])
               + ([r["note"]] if r["note"] else []) + r["changes"]]
    return Section("Deployed: each artifact on its own runtime", [
        Text("Token-level numbers of the exported artifact (calibrator fused) against the PyTorch variant with the "
             "same calibrator, on the same held-out windows.", muted=True),
        Table(["variant", "format", "calibrator", "size (MB)", "export (s)", "load (s)", "top-1 agreement",
               "max rel. logit diff", "ppl PyTorch → runtime", "ECE PyTorch → runtime", "ECE drift", "decode tokens/s"],
              [[r["variant"], r["format"], r["calibrator"], mb(r["bytes"]), num(r["seconds"], 1),
                num(r.get("load_seconds"), 2), num(r["top1"]),
                f"{r['max_rel_logit_diff']:.2g}", f"{r['ppl_reference']:.2f} → {r['ppl']:.2f}",
                f"{r['ece_reference']:.4f} → {r['ece']:.4f}", f"{r['ece_drift']:+.4f}",
                num((r.get("decode") or {}).get("decode_tokens_per_second"), 1)] for r in rows],
              {3, 4, 5, 6, 7, 8, 9, 10, 11}),
        *([table] if (table := deployed_divergence(rows)) else []),
        *([Text("What each format changed:"), Bullets(changes)] if changes else [])])


def deployed_divergence(rows: list[dict]) -> Table | None:
    """Each artifact's divergence from its PyTorch variant (none for results verified before it was measured)."""
    cells = [[r["variant"], r["format"], *divergence_cells(r["divergence"])] for r in rows if r.get("divergence")]
    return Table(["variant", "format", *DIVERGENCE_HEADER], cells, set(range(2, 2 + len(DIVERGENCE_HEADER))),
                 title="Divergence of the artifact from the PyTorch variant, KL(PyTorch ‖ runtime)") if cells else None


FORMATS_FIRST = ("gguf", "onnx")  # the exported size a point takes when several formats were exported


def size_quality_points(report: dict) -> list[dict]:
    """Per variant: its size (the exported file, else calq.quant.budget's byte accounting), mean KLD from the
    baseline (uncalibrated), calibrated token ECE (the selected calibrator) and decode tokens/s when recorded."""
    exported = {}
    for r in report.get("deployed") or []:
        if r.get("bytes"):
            exported.setdefault(r["variant"], []).append(r)
    points = []
    for v in report["variants"]:
        files = sorted(exported.get(v["variant"], []),
                       key=lambda r: FORMATS_FIRST.index(r["format"]) if r["format"] in FORMATS_FIRST else 99)
        size, source = ((files[0]["bytes"], f"{files[0]['format']} file") if files
                        else (v["accounted_bytes"], "byte accounting") if v.get("accounted_bytes")
                        else (v.get("size_bytes"), "checkpoint"))  # a run quantized before the accounting
        calibrator = v.get("selected") or "none"
        tokens = (v.get("calibrated") or {}).get("tokens") or {}
        ece = tokens[calibrator]["ece"] if calibrator in tokens else v["ece"]
        kld = ((v.get("divergence") or {}).get("none") or {}).get("mean_kld")
        speed = next((r["decode"].get("decode_tokens_per_second") for r in files if r.get("decode")), None)
        points.append({"label": v["variant"], "bytes": size, "source": source, "kld": kld, "ece": ece,
                       "calibrator": calibrator, "tokens_per_second": speed})
    return points


@section
def size_quality(report: dict) -> Section | None:
    points = size_quality_points(report)
    if sum(1 for p in points if p["bytes"]) < 2:
        return None
    fronts = {m: plots.pareto_front([(p["bytes"], p[m]) for p in points if p["bytes"] and p[m] is not None])
              for m in ("kld", "ece")}
    index = {m: [i for i, p in enumerate(points) if p["bytes"] and p[m] is not None] for m in fronts}
    on_front = {m: {index[m][i] for i in fronts[m]} for m in fronts}
    speed = any(p["tokens_per_second"] for p in points)
    rows = [[p["label"], mb(p["bytes"]), p["source"], "–" if p["kld"] is None else f"{p['kld']:.4g}",
             f"{p['ece']:.4f} ({p['calibrator']})", *([num(p["tokens_per_second"], 1)] if speed else []),
             ", ".join(m.upper() for m in ("kld", "ece") if i in on_front[m]) or "–"]
            for i, p in enumerate(points)]
    draw = partial(plots.size_quality, points, {"kld": "mean KLD from the baseline", "ece": "token ECE, calibrated"})
    return Section("Size and quality", [
        Text("Each variant's size against its mean KLD from the baseline (uncalibrated) and its token ECE with the "
             "selected calibrator, on the held-out text. Size: the exported file when the export stage ran (GGUF "
             "first), else calq's byte accounting (quantized Linears with their scales and zero points, every other "
             "parameter as float16, an int8 / int4 embedding as Q8_0 / Q4_0). On the Pareto front: no other variant "
             "is at most as large and at most as bad.",
             muted=True),
        Table(["variant", "size (MiB)", "size from", "mean KLD", "token ECE (calibrator)",
               *(["decode tokens/s"] if speed else []), "Pareto front"], rows, {1, 3} | ({5} if speed else set())),
        Plots([Plot(draw, "size against mean KLD and calibrated token ECE, Pareto front marked")])])


@section
def outliers(report: dict) -> Section:
    rows = [[o["layer"], num(o["ratio"], 1), num(o["absmax"], 3), num(o["median_absmax"]), str(o["channel"]),
             num(o["tokens"])] for o in report["outliers"]]
    smoothing = [Table(["layer", "spread before", "spread after", "reduction"],
                       [[o["layer"], num(o["spread_before"], 1), num(o["spread_after"], 1),
                         f"{o['reduction']:.1f}×" if o["reduction"] is not None else "–"] for o in layers],
                       {1, 2, 3}, title=f"SmoothQuant's effect on the activation spread ({name})",
                       note="Channel absmax / median channel absmax of each Linear input, unquantized vs "
                            "smoothed-and-quantized, on the same calibration samples; layers not preceded by a norm "
                            "(o_proj, down_proj) are not smoothed.")
                 for name, layers in report.get("smoothing", {}).items()]
    return Section("Activation outliers", [
        Text("Layers whose input has the strongest outlier channel (channel absmax / median channel absmax), "
             "measured over the calibration samples.", muted=True),
        Table(["layer", "ratio", "absmax", "median absmax", "channel", "tokens"], rows, {1, 2, 3, 4, 5}),
        *smoothing])


@section
def sensitivity(report: dict) -> Section | None:
    tables = report.get("sensitivity")
    if not tables:
        return None
    top = report["recipe_content"].get("outliers_top_k", 10)
    blocks = [Text("Mean KL(baseline ‖ model) per token on the calibration samples with one Linear alone quantized "
                   "round-to-nearest with the scheme's weights (activations unquantized), the others unquantized.",
                   muted=True)]
    tables = {key: t for key, t in tables.items() if key != "embedding"}
    if "embedding" in report["sensitivity"]:
        t = report["sensitivity"]["embedding"]
        blocks.append(Table(["embedding / head", "mean KLD", "99% KLD", "same top token"],
                            [[level, f"{m['mean_kld']:.4g}", f"{m['p99_kld']:.4g}", f"{m['same_top1']:.1%}"]
                             for level, m in t["layers"].items()], {1, 2, 3},
                            title="the token embedding and output head alone in Q4_0 / Q8_0 blocks (`embedding: auto`)",
                            note=f"{t['samples'][0]} samples of {t['samples'][1]} tokens, {t['seconds']:,.0f} s."))
    for key, t in tables.items():
        ranked = sorted(t["layers"].items(), key=lambda item: item[1]["mean_kld"], reverse=True)
        tempered = all("tempered_kld" in m for m in t["layers"].values())  # tables measured before it lack it
        blocks.append(Table(["layer", "mean KLD", "99% KLD", "same top token",
                             *(["KLD after best T", "best T"] if tempered else [])],
                            [[name, f"{m['mean_kld']:.4g}", f"{m['p99_kld']:.4g}", f"{m['same_top1']:.1%}",
                              *([f"{m['tempered_kld']:.4g}", f"{m['temperature']:.3f}"] if tempered else [])]
                             for name, m in ranked[:top]], {1, 2, 3, 4, 5},
                            title=f"{key}: the {min(top, len(ranked))} most sensitive of {len(ranked)} layers",
                            note=f"{t['samples'][0]} samples of {t['samples'][1]} tokens, {t['seconds']:,.0f} s."
                                 + (" KLD after best T: what is left with the layer's logits divided by the one "
                                    "temperature that minimises it (what a temperature calibrator cannot repair; "
                                    "`objective: ece` budgets by it)." if tempered else "")))
    blocks.append(Plots([Plot(partial(plots.sensitivity_heatmap, t["layers"], key), f"sensitivity per layer, {key}")
                         for key, t in tables.items()]))
    held = {"w8a16": "held at int8", "float": "kept unquantized"}
    promoted = [f"{v['variant']}: {len(b['promoted'])} layers {held[b.get('promoted_to', 'float')]}"
                + (f", {len(b['demoted'])} at 4 bits" if b.get("demoted") else "")
                + (f", the embedding / head {b['embedding']}" if b.get("embedding") else "")
                + f" within {mb(b['limit_bytes'])} MiB (uses {mb(b['bytes'])} MiB"
                + (", by the KLD left after the best temperature: `objective: ece`" if b.get("objective") == "ece"
                   else "") + "): "
                + (", ".join(f"`{n}`" for n in b["promoted"]) or "none")
                for v in report["variants"] if (b := v.get("budget"))]
    if promoted:
        blocks += [Text("Mixed precision under a budget (the levels with the least summed KLD that fit; the held "
                        "layers listed most KLD removed per extra byte first):"), Bullets(promoted)]
    return Section("Per-layer sensitivity", blocks)


@section
def methods(report: dict) -> Section:
    rows = [[v["variant"], v["method"], v["scheme"], num(v.get("group_size")), mb(v.get("size_bytes")),
             num(v.get("calibration_seconds"), 1)] for v in report["variants"]]
    cal = report["calibration"]
    return Section("Methods", [
        Table(["variant", "method", "scheme", "group size", "size (MB)", "calibration (s)"], rows, {3, 4, 5}),
        Text(f"Calibration: {cal['num_samples']} samples × {cal['seq_len']} tokens from `{cal['source']}` "
             f"(seed {cal['seed']}).", muted=True)])


@section
def stages(report: dict) -> Section:
    return Section("Stages", [Table(["stage", "wall (s)", "peak RSS (MB)"],
                                    [[name, num(s["seconds"], 1), num(s["peak_rss_mb"], 0)]
                                     for name, s in report["stages"].items()], {1, 2})])


@section
def versions(report: dict) -> Section:
    listed = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    return Section("Versions", [Text(f"{listed} on {report['machine']['platform']} "
                                     f"({report['machine']['cpus']} CPUs).")])


@section
def recipe(report: dict) -> Section:
    return Section("Recipe", [Code(yaml.safe_dump(report["recipe_content"], sort_keys=False), "yaml")])
