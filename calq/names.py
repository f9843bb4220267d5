"""Names that become file or folder names (recipe name, variant names): one plain file name each, never a path."""

from __future__ import annotations

import re

from calq.errors import CalqError

MAX_LENGTH = 100
ALLOWED = re.compile(r"[A-Za-z0-9_.-]+")
# Names Windows refuses as a file name whatever the extension; a run folder may be copied there.
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def check_name(value: object, what: str) -> str:
    """Return `value` when it is a safe file name; raise CalqError (what, where = `what`, fix) otherwise.

    Safe: letters, digits, '-', '_', '.'; not empty; at most 100 characters; not starting with '.'
    (which also excludes '.' and '..' and calq's hidden temporary names); not a reserved device name.
    """
    if not isinstance(value, str):
        raise CalqError(f"a name must be text, got {type(value).__name__} {value!r}", what,
                        "write a plain name like 'my-run'")
    problem = None
    if not value:
        problem = "name is empty"
    elif "/" in value or "\\" in value:
        problem = f"name {value!r} contains a path separator"
    elif value.startswith("."):
        problem = f"name {value!r} starts with '.'"
    elif not ALLOWED.fullmatch(value):
        bad = "".join(sorted({c for c in value if not ALLOWED.fullmatch(c)}))
        problem = f"name {value!r} contains characters other than letters, digits, '-', '_', '.': {bad!r}"
    elif len(value) > MAX_LENGTH:
        problem = f"name is {len(value)} characters long (at most {MAX_LENGTH})"
    elif value.split(".")[0].lower() in RESERVED:
        problem = f"name {value!r} is a reserved device name on Windows"
    if problem is None:
        return value
    raise CalqError(problem, what, f"use letters, digits, '-', '_' and '.' only, e.g. '{suggest(value)}'")


def suggest(value: str) -> str:
    """A safe name close to `value`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip(".-")[:MAX_LENGTH].strip(".-") or "name"
    return f"{name}-1" if name.split(".")[0].lower() in RESERVED else name
