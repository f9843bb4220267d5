"""The run folder: atomic writes, stage markers keyed by a hash of their inputs, resume.

Layout:
    RUN/recipe.yaml            the recipe of the last run (for humans; ownership is in .calq/run.json)
    RUN/.calq/run.json         which recipe name owns this folder
    RUN/.calq/stages/*.json    one marker per finished stage: input hash, outputs, wall time, peak RSS
A stage is finished when its marker exists, its hash matches and its outputs exist. Outputs are
written to a temporary name and renamed into place, so a killed run never leaves a half file behind.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from calq.errors import CalqError


def stable_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` (file or folder); rename it onto `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


class PeakRSS:
    """Samples this process's resident memory in a thread; `.peak` is the maximum seen, in bytes."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._proc = psutil.Process()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@dataclass
class StageRecord:
    name: str
    key: str
    outputs: dict[str, str]
    seconds: float
    peak_rss_mb: float
    reused: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta = self.root / ".calq"
        self.records: dict[str, StageRecord] = {}

    def claim(self, recipe_name: str) -> None:
        """Create the folder, or check that it belongs to this recipe name (and sweep a killed run's temp files)."""
        owner_file = self.meta / "run.json"
        if owner_file.is_file():
            owner = json.loads(owner_file.read_text()).get("recipe")
            if owner != recipe_name:
                raise CalqError(
                    f"output folder belongs to recipe '{owner}', not '{recipe_name}'",
                    str(self.root),
                    "pass another --out, or delete that folder if its results are no longer needed",
                )
            self._sweep()
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise CalqError(
                "output folder exists, is not empty and was not made by calq",
                str(self.root),
                "pass an empty or new folder with --out",
            )
        write_json(owner_file, {"recipe": recipe_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _sweep(self) -> None:
        for litter in list(self.root.rglob(".*.tmp-*")) + list(self.root.rglob(".*.old-*")):
            shutil.rmtree(litter) if litter.is_dir() else litter.unlink(missing_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def _marker(self, stage: str) -> Path:
        return self.meta / "stages" / f"{stage}.json"

    def finished(self, stage: str, key: str) -> StageRecord | None:
        marker = self._marker(stage)
        if not marker.is_file():
            return None
        rec = json.loads(marker.read_text())
        if rec.get("key") != key or not all(self.path(p).exists() for p in rec["outputs"].values()):
            return None
        return StageRecord(**{**rec, "reused": True})

    def run_stage(self, stage: str, key: str, fn, *args, **kwargs) -> StageRecord:
        """Run `fn(*args, **kwargs)` -> (outputs: {name: path}, info: dict) unless already finished with `key`."""
        rec = self.finished(stage, key)
        if rec is None:
            self._marker(stage).unlink(missing_ok=True)
            start = time.perf_counter()
            with PeakRSS() as mem:
                outputs, info = fn(*args, **kwargs)
            gc.collect()  # the stage's model is unreachable now; free it before the next stage loads one
            rel = {k: str(Path(v).relative_to(self.root)) for k, v in outputs.items()}
            rec = StageRecord(stage, key, rel, round(time.perf_counter() - start, 2), round(mem.peak / 2**20, 1), info=info)
            write_json(self._marker(stage), {k: v for k, v in rec.__dict__.items() if k != "reused"})
        self.records[stage] = rec
        return rec
