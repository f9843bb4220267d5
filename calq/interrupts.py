"""Stopping cleanly: SIGINT/SIGTERM as an exception that unwinds (so temporary files are removed) and carries the
exit code and the stage it stopped; an unexpected error's traceback saved to a file instead of the console."""

from __future__ import annotations

import contextlib
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

RESUME_HINT = "run the same command to resume"


class Interrupted(KeyboardInterrupt):
    """A stop signal. A KeyboardInterrupt, so `except Exception` in a library cannot swallow it, and code that
    already handles Ctrl-C handles SIGTERM the same way. `exit_code` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, stage: str | None = None):
        self.signum, self.stage = signum, stage
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)

    def line(self) -> str:
        where = f" during {self.stage}" if self.stage else ""
        return f"interrupted ({signal.Signals(self.signum).name}){where}; finished stages are kept; {RESUME_HINT}"


def interrupted_line(exc: KeyboardInterrupt, stage: str | None = None) -> tuple[str, int]:
    """(one line, exit code) for any interrupt: an `Interrupted`, or a plain KeyboardInterrupt (code 130)."""
    if not isinstance(exc, Interrupted):
        exc = Interrupted(signal.SIGINT, stage)
    return exc.line(), exc.exit_code


@contextlib.contextmanager
def stop_signals(current_stage: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` naming `current_stage()` (e.g. `lambda:
    run_dir.current_stage`). The previous handlers come back on exit. Outside the main thread (where Python
    cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum, current_stage())

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def save_crash(exc: BaseException, log_dir: str | Path) -> Path:
    """Write the traceback of an unexpected error (with Python/platform/command) to
    `log_dir/crash-<UTC time>.txt` and return its path. For the exit-code-3 path of the CLI."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = log_dir / f"crash-{stamp}.txt"
    n = 1
    while path.exists():
        n += 1
        path = log_dir / f"crash-{stamp}-{n}.txt"
    head = [f"command: {' '.join(sys.argv)}", f"python: {sys.version.split()[0]} on {platform.platform()}",
            f"time: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", ""]
    path.write_text("\n".join(head) + "".join(traceback.format_exception(exc)))
    return path


def crash_line(exc: BaseException, saved: Path | None) -> str:
    """The one console line for an unexpected error (exit code 3)."""
    where = f"the traceback is in {saved}" if saved else "no run folder to save the traceback in"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"internal error: {type(exc).__name__}: {first} — {where}; "
            "rerun with --debug to see it here, and please report it")
