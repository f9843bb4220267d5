"""One exception type for bad input: it prints as one line (what, where, how to fix) and exits 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CalqError(Exception):
    """Bad input from the user. The CLI prints `str(err)` and exits with code 2."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def __reduce__(self):  # keeps what/where/fix when raised in a child process (calq.isolation)
        return type(self), (self.what, self.where, self.fix)

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " — ".join(parts)


@contextlib.contextmanager
def located(prefix: str) -> Iterator[None]:
    """Re-raise a CalqError from inside with `prefix` put before its location: library code names a key
    ('variants[0].group_size'), the place that read the recipe adds the file ('recipe.yaml: variants[0]...')."""
    try:
        yield
    except CalqError as err:
        where = f"{prefix}: {err.where}" if err.where else prefix
        raise type(err)(err.what, where, err.fix) from None
