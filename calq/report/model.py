"""The report as data: sections of blocks that report.md and report.html render alike (calq/report/render.py).

Text (paragraphs, notes, table cells) may mark code with `backticks` and emphasis with **double stars**, which both
renderers understand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Text:
    text: str
    muted: bool = False  # a note on the numbers around it, not a finding


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    title: str | None = None
    note: str | None = None


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Plot:
    draw: Callable[[], bytes]  # PNG; drawn only by the renderers that show plots
    alt: str


@dataclass
class Plots:
    plots: list[Plot]
    title: str | None = None
    grid: bool = False  # side by side, small


@dataclass
class Verdict:
    kind: str  # "pass", "fail" or "none"
    text: str
    items: list[str] = field(default_factory=list)


@dataclass
class Code:
    text: str
    language: str = ""


Block = Text | Table | Bullets | Plots | Verdict | Code


@dataclass
class Section:
    title: str  # "" for the report's opening, shown under the page title
    blocks: list[Block]


def num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def ci(value, interval, digits: int = 3) -> str:
    """A value with its confidence interval, when it has one."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "")


def mb(n: int | None) -> str:
    """Bytes as MiB with one decimal, or a dash when unknown."""
    return f"{n / 2**20:,.1f}" if n else "–"
