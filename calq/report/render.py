"""The report model (calq/report/model.py) as report.md and as report.html: one self-contained page (CSS inline,
plots as base64 PNG) that opens offline. report.md leaves the plots out."""

from __future__ import annotations

import base64
import re
from html import escape

from calq.report.model import Bullets, Code, Section, Table, Text, Verdict

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


def markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        if section.title:
            lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += _markdown_block(block)
    return "\n".join(lines)


def _markdown_block(block) -> list[str]:
    if isinstance(block, Text):
        return [block.text, ""]
    if isinstance(block, Table):
        return ([f"### {block.title}", ""] if block.title else []) + ([block.note, ""] if block.note else []) + [
            "| " + " | ".join(block.header) + " |",
            "|" + "|".join("---:" if i in block.numeric else "---" for i in range(len(block.header))) + "|",
            *("| " + " | ".join(row) + " |" for row in block.rows), ""]
    if isinstance(block, Bullets):
        return [*(f"- {item}" for item in block.items), ""]
    if isinstance(block, Verdict):
        return [block.text, "", *(f"- {item}" for item in block.items), *([""] if block.items else [])]
    if isinstance(block, Code):
        return [f"```{block.language}", block.text.rstrip(), "```", ""]
    return []  # plots: report.html only


def _inline(text: str) -> str:
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def html(title: str, sections: list[Section]) -> str:
    body = f"<h1>{escape(title)}</h1>"
    for section in sections:
        if section.title:
            body += f"<h2>{_inline(section.title)}</h2>"
        body += "".join(_html_block(block) for block in section.blocks)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _html_block(block) -> str:
    if isinstance(block, Text):
        return f'<p class="muted">{_inline(block.text)}</p>' if block.muted else f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f'<td class="n">{_inline(c)}</td>' if i in block.numeric
                                        else f"<td>{_inline(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                       for row in block.rows)
        return ((f"<h3>{_inline(block.title)}</h3>" if block.title else "")
                + (f'<p class="muted">{_inline(block.note)}</p>' if block.note else "")
                + f"<table><tr>{head}</tr>{body}</table>")
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Verdict):
        items = f"<ul>{''.join(f'<li>{_inline(i)}</li>' for i in block.items)}</ul>" if block.items else ""
        return f'<div class="verdict {block.kind}">{_inline(block.text)}{items}</div>'
    if isinstance(block, Code):
        return f"<pre>{escape(block.text)}</pre>"
    # Plots
    images = "".join(f'<img alt="{escape(p.alt)}" src="data:image/png;base64,{base64.b64encode(p.draw()).decode()}">'
                     for p in block.plots)
    title = f"<h3>{_inline(block.title)}</h3>" if block.title else ""
    return title + (f'<div class="grid">{images}</div>' if block.grid else images)
