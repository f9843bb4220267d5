"""What report.md and report.html (and the CLI summary) format alike."""

from __future__ import annotations

EVAL_SETS = {"tokens": "held-out text", "responses": "held-out instruction responses"}


def mb(n: int | None) -> str:
    """Bytes as MiB with one decimal, or a dash when unknown."""
    return f"{n / 2**20:,.1f}" if n else "–"


def calibrators_text(c: dict, code) -> str:
    """How the calibrators were fitted, one paragraph; `code(text)` marks up the data file name."""
    settings = c["settings"]
    fitted = ", ".join(f"{name} ({', '.join(f'{k} {v}' for k, v in settings[name].items())})" if settings.get(name)
                       else name for name in settings["use"])
    return (f"Fitted per variant on that model's own hidden states: {fitted}. Data: {c['fit_records']} fit records "
            f"({settings['val_fraction']:.0%} of them validate) and {c['heldout_records']} held-out records from "
            f"{code(c['source'])} (seed {c['seed']}); the selected calibrator (*) has the best validation "
            f"{settings['select_by']}.")
