"""report.html: one self-contained page (CSS inline, charts as base64 PNG) that opens offline.

Order: the verdict first (gates, then a summary per variant), then the detail: token-level, calibrator and task tables,
reliability diagrams, activation outliers, methods, and the exact recipe and versions.
Reads report.json's content; `tasks` and `gates` are optional (absent when the run had none).
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import yaml

from calq.report import answers as answer_report
from calq.report import plots
from calq.report.common import EVAL_SETS, baseline_check_lines, calibrators_text, deployed_decode, mb, validation_table
from calq.runs import write_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;\
padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem} th,td{border:1px solid #ddd;padding:.25rem .5rem}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:1rem 1.2rem;border-radius:6px;font-size:1.1rem;margin:1rem 0}
.pass{background:#e6f4ea;border:1px solid #34a853} .fail{background:#fce8e6;border:1px solid #d93025}
.none{background:#f1f3f4;border:1px solid #9aa0a6} .muted{color:#666;font-size:.9rem}
.grid{display:flex;flex-wrap:wrap;gap:.5rem} .grid img{width:32.5%}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;font-size:.82rem} img{max-width:100%}
"""


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _ci(value, ci, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{escape(str(c))}</td>' if i in numeric
                                    else f"<td>{escape(str(c))}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _label(row: dict) -> str:
    return f"{row['variant']} / {row['calibrator']}" if "calibrator" in row else row["variant"]


def _verdict(report: dict) -> str:
    gates = report.get("gates")
    if not gates:
        return '<div class="verdict none">No gates configured: this report decides nothing by itself.</div>'
    results = gates["results"]
    failed = [r for r in results if not r["passed"]]
    if not failed:
        return f'<div class="verdict pass"><b>PASS</b>: all {len(results)} gate checks passed.</div>'
    items = "".join(f"<li>{escape(_gate_line(r))}</li>" for r in failed)
    return (f'<div class="verdict fail"><b>FAIL</b>: {len(failed)} of {len(results)} gate checks failed.'
            f'<ul>{items}</ul></div>')


def _gate_line(r: dict) -> str:
    if r["value"] is None:
        return f"{r['name']}: nothing to check"
    return f"{r['name']}: {r['value']:.4f} against at most {r['threshold']:.4f} (over by {-r['margin']:.4f})"


def _gates(report: dict) -> str:
    gates = report.get("gates")
    if not gates:
        return ""
    rows = [[r["gate"], r["variant"] or "–", r["calibrator"] or "–", r["task"] or "–", _num(r["value"]),
             _num(r["threshold"]), _num(r["margin"]), "pass" if r["passed"] else "FAIL"] for r in gates["results"]]
    settings = ", ".join(f"{k}: {v}" for k, v in gates["config"].items() if v is not None)
    return ("<h2>Gates</h2>"
            + _table(["gate", "variant", "calibrator", "task", "value", "threshold", "margin", "result"], rows,
                     {4, 5, 6})
            + f'<p class="muted">Margin = threshold − value: headroom when positive. Gates: {escape(settings)}.</p>')


def _summary(report: dict) -> str:
    """Per variant: size, perplexity, token ECE; mean task accuracy and mean answer-level ECE per calibrator."""
    task_rows = (report.get("tasks") or {}).get("results", [])
    calibrators = list(dict.fromkeys(r["calibrator"] for r in task_rows))
    header = ["variant", "size (MB)", "ppl", "token ECE"]
    header += [f"mean accuracy ({c})" for c in calibrators] + [f"mean answer ECE ({c})" for c in calibrators]
    rows = []
    for v in report["variants"]:
        if v.get("calibrator", "none") != "none":
            continue
        mine = [r for r in task_rows if r["variant"] == v["variant"]]
        acc = [_mean([r["accuracy"] for r in mine if r["calibrator"] == c]) for c in calibrators]
        ece = [_mean([r["ece"] for r in mine if r["calibrator"] == c and r["ece"] is not None]) for c in calibrators]
        rows.append([v["variant"], mb(v.get("size_bytes")), _num(v["ppl"], 2), _num(v["ece"]),
                     *map(_num, acc), *map(_num, ece)])
    note = " Task means are unweighted over tasks." if task_rows else ""
    skipped = "".join(f"<p><b>Skipped variant {escape(name)}</b>: {escape(why)}</p>"
                      for name, why in report.get("skipped", {}).items())
    return ("<h2>Summary</h2>" + _table(header, rows, set(range(1, len(header))))
            + f'<p class="muted">Token-level numbers are uncalibrated (calibrated ones: Calibrators).{note}</p>'
            + skipped)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _tokens(report: dict) -> str:
    ev = report["evaluation"]["tokens"]
    rows = [[_label(v), _num(v["ppl"], 2), _num(v["accuracy"]), _num(v["confidence"]), _num(v["ece"]),
             _num(v["adaptive_ece"]), _num(v["brier"]), _num(v["tokens"])] for v in report["variants"]]
    diagram = plots.reliability_diagram({f"{_label(v)} (ECE {v['ece']:.3f})": v["reliability"]
                                         for v in report["variants"]},
                                        "next-token reliability")
    return ("<h2>Token-level calibration</h2>"
            f'<p class="muted">{ev["tokens"]:,} tokens of <code>{escape(str(ev["source"]))}</code> '
            f'in windows of {ev["seq_len"]}; '
            f'ECE with {ev["bins"]} equal-width bins (adaptive ECE: equal-mass bins).</p>'
            + _table(["variant", "ppl", "top-1 acc", "confidence", "ECE", "adaptive ECE", "Brier", "tokens"], rows,
                     set(range(1, 8)))
            + _img(diagram, "token-level reliability diagram"))


def _calibrators(report: dict) -> str:
    """Per held-out set: every variant x calibrator, reliability diagrams per variant, and the goals."""
    c = report.get("calibrators")
    if not c:
        return ""
    out = ("<h2>Calibrators</h2><p class=\"muted\">"
           + calibrators_text(c, code=lambda text: f"<code>{escape(str(text))}</code>") + "</p>")
    header, rows = validation_table(report)
    if rows:
        out += "<h3>Validation (selection)</h3>" + _table(header, rows, set(range(2, len(header))))
    for part, title in EVAL_SETS.items():
        variants = [v for v in report["variants"] if part in v["calibrated"]]
        if not variants:
            continue
        rows = [[v["variant"], cal + (" *" if cal == v["selected"] else ""), _num(m["nll"]), _num(m["accuracy"]),
                 _num(m["confidence"]), _num(m["ece"]), _num(m["adaptive_ece"]), _num(m["brier"]), _num(m["tokens"])]
                for v in variants for cal, m in v["calibrated"][part].items()]
        figures = [_img(plots.reliability_diagram({f"{cal} (ECE {m['ece']:.3f})": m["reliability"]
                                                   for cal, m in v["calibrated"][part].items() if m.get("reliability")},
                                                  f"{v['variant']}: {title}"),
                        f"{v['variant']} {part} reliability diagram")
                   for v in variants]
        out += (f"<h3>{escape(title.capitalize())}</h3>"
                + _table(["variant", "calibrator", "NLL", "acc", "conf", "ECE", "adaptive ECE", "Brier", "tokens"],
                         rows, set(range(2, 9)))
                + f'<div class="grid">{"".join(figures)}</div>')
    if report.get("goals"):
        rows = [[g["set"], g["variant"], g["goal"], _num(g["value"]), _num(g["bound"]), "yes" if g["met"] else "NO"]
                for g in report["goals"]]
        out += ("<h3>Goals</h3>" + _table(["set", "variant", "goal", "value", "bound", "met"], rows, {3, 4})
                + '<p class="muted">Checked on every held-out set; unlike gates, they do not set the exit code.</p>')
    return out


def _tasks(report: dict) -> str:
    section = report.get("tasks")
    if not section:
        return ""
    s, results = section["settings"], section["results"]
    rows = [[r["variant"], r["calibrator"], r["task"], r["n"], f"{r['metric']} {_ci(r['accuracy'], r['accuracy_ci'])}",
             _num(r["confidence"], 3), _ci(r["ece"], r["ece_ci"]), _ci(r["brier"], r["brier_ci"])] for r in results]
    questions = f"the first {s['limit']}" if s["limit"] else "all"
    out = ("<h2>Tasks (lm-eval)</h2>"
           f'<p class="muted">lm-eval {escape(str(s["lm_eval"]))}, {questions} questions per task, data from '
           f'<code>{escape(str(s["data_dir"]))}</code>. Answer-level calibration of multiple-choice tasks: '
           f'softmax over the choices\' log-likelihoods, confidence = top choice; ECE with {s["bins"]} bins. '
           f'Intervals: {s["level"]:.0%} percentile bootstrap '
           f'over questions ({s["bootstrap"]} replicates, seed {s["seed"]}).</p>'
           + _table(["variant", "calibrator", "task", "n", "accuracy [CI]", "confidence", "answer ECE [CI]",
                     "Brier [CI]"], rows, {3, 5})
           + _img(plots.task_chart(results), "accuracy and answer-level ECE per task"))
    for task in dict.fromkeys(r["task"] for r in results):
        mine = [r for r in results if r["task"] == task and r["reliability"]]
        figures = [_img(plots.reliability_diagram({f"{r['variant']} (ECE {r['ece']:.3f})": r["reliability"]
                                                   for r in mine if r["calibrator"] == c}, f"{task}: {c}"),
                        f"{task} {c} reliability diagram")
                   for c in dict.fromkeys(r["calibrator"] for r in mine)]
        if figures:
            out += f"<h3>{escape(task)}: answer-level reliability</h3><div class=\"grid\">{''.join(figures)}</div>"
    return out


def _answers(report: dict) -> str:
    section = report.get("answers")
    if not section:
        return ""
    out = "<h2>Answer-level calibration (tasks the calibrators never saw)</h2>"
    for table in answer_report.tables(section):
        out += (f"<h3>{escape(table['title'])}</h3><p class=\"muted\">{escape(table['note'])}</p>"
                + _table(table["header"], table["rows"], table["numeric"]))
        if table["title"] == "Summary":
            chosen = [r for r in section["results"] if r["selected"] or r["calibrator"] == "none"]
            out += _img(plots.risk_coverage(chosen), "risk-coverage curves per evaluation task")
    return out


def _outliers(report: dict) -> str:
    rows = [[o["layer"], _num(o["ratio"], 1), _num(o["absmax"], 3), _num(o["median_absmax"]), o["channel"],
             _num(o["tokens"])]
            for o in report["outliers"]]
    return ("<h2>Activation outliers</h2><p class=\"muted\">Layers whose input has the strongest outlier channel "
            "(channel absmax / median channel absmax) over the calibration samples.</p>"
            + _table(["layer", "ratio", "absmax", "median absmax", "channel", "tokens"], rows, {1, 2, 3, 4, 5})
            + "".join(_smoothing(name, layers) for name, layers in report.get("smoothing", {}).items()))


def _smoothing(name: str, layers: list[dict]) -> str:
    rows = [[o["layer"], _num(o["spread_before"], 1), _num(o["spread_after"], 1),
             f"{o['reduction']:.1f}×" if o["reduction"] is not None else "–"] for o in layers]
    return (f"<h3>SmoothQuant's effect on the activation spread ({escape(name)})</h3>"
            + _table(["layer", "spread before", "spread after", "reduction"], rows, {1, 2, 3}))


def _deployed(report: dict) -> str:
    rows = [[r["variant"], r["format"], r["calibrator"], mb(r["bytes"]), _num(r["seconds"], 1), _num(r["top1"]),
             f"{r['max_rel_logit_diff']:.2g}", f"{r['ppl_reference']:.2f} → {r['ppl']:.2f}",
             f"{r['ece_reference']:.4f} → {r['ece']:.4f}", f"{r['ece_drift']:+.4f}"]
            for r in report.get("deployed") or []]
    if not rows:
        return ""
    changes = "".join(f"<li>{escape(r['variant'])} as {escape(r['format'])}: {escape(c)}</li>"
                      for r in report["deployed"]
                      for c in ([deployed_decode(r["decode"])] if r.get("decode") else [])
                      + ([r["note"]] if r["note"] else []) + r["changes"])
    return ("<h2>Deployed: each artifact on its own runtime</h2>"
            '<p class="muted">The exported artifact (calibrator fused) against the PyTorch variant with the same '
            "calibrator, on the same held-out windows.</p>"
            + _table(["variant", "format", "calibrator", "size (MB)", "export (s)", "top-1 agreement",
                      "max rel. logit diff", "ppl PyTorch → runtime", "ECE PyTorch → runtime", "ECE drift"], rows,
                     {3, 4, 5, 6, 7, 8, 9})
            + f"<p>What each format changed:</p><ul>{changes}</ul>")


def _methods(report: dict) -> str:
    rows = [[v["variant"], v["method"], v["scheme"], v.get("group_size") or "–", mb(v.get("size_bytes")),
             _num(v.get("calibration_seconds"), 1)]
            for v in report["variants"] if v.get("calibrator", "none") == "none"]
    cal = report["calibration"]
    return ("<h2>Methods</h2>"
            + _table(["variant", "method", "scheme", "group size", "size (MB)", "calibration (s)"], rows, {3, 4, 5})
            + f'<p class="muted">Calibration: {cal["num_samples"]} samples × {cal["seq_len"]} tokens from '
              f'<code>{escape(str(cal["source"]))}</code> (seed {cal["seed"]}).</p>')


def _recipe(report: dict) -> str:
    stages = [[name, _num(s["seconds"], 1), _num(s["peak_rss_mb"], 0)] for name, s in report["stages"].items()]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    return ("<h2>Stages</h2>" + _table(["stage", "wall (s)", "peak RSS (MB)"], stages, {1, 2})
            + f"<h2>Versions</h2><p>{escape(versions)} on {escape(report['machine']['platform'])} "
              f"({report['machine']['cpus']} CPUs).</p>"
            + "<h2>Recipe</h2><pre>" + escape(yaml.safe_dump(report["recipe_content"], sort_keys=False)) + "</pre>")


def _baseline_check(report: dict) -> str:
    check = report.get("baseline_check")
    if not check:
        return ""
    lines = baseline_check_lines(check, code=lambda t: f"<code>{escape(str(t))}</code>",
                                 bold=lambda t: f"<strong>{t}</strong>")
    return "<h2>Baseline check</h2>" + "".join(f"<p>{line}</p>" for line in lines)


def render(report: dict) -> str:
    model = report["model"]
    notes = [n for n in (model.get("note"), report["calibration"].get("note"),
                         report["evaluation"]["tokens"].get("note")) if n]
    head = (f"<h1>calq report: {escape(report['recipe'])}</h1>"
            f'<p class="muted">Model <code>{escape(model["source"])}</code> ({escape(model["dtype"])}), '
            f'created {escape(report["created"])}.</p>'
            + "".join(f'<p class="muted">Note: {escape(n)}.</p>' for n in notes))
    body = head + _verdict(report) + _gates(report) + _baseline_check(report) + _summary(report) + _tokens(report) \
        + _calibrators(report) + _tasks(report) + _answers(report) + _deployed(report) + _outliers(report) \
        + _methods(report) + _recipe(report)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>calq report: {escape(report["recipe"])}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def write_html(path: Path, report: dict) -> Path:
    return write_text(path, render(report))
