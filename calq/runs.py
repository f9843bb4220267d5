"""The run folder: atomic durable writes, stage markers with checksums, resume, one writer at a time.

Layout:
    RUN/recipe.yaml            the recipe of the last run (for humans; ownership is in .calq/run.json)
    RUN/.calq/run.json         which recipe name owns this folder
    RUN/.calq/lock             flock'ed by the one process writing the folder (its pid, host, start time inside)
    RUN/.calq/stages/*.json    one marker per finished stage: input hash, outputs, size and sha256 of every
                               output file, wall time, peak RSS
A stage is finished when its marker exists, its hash matches and every output file has its recorded size and
sha256. Outputs are written to a temporary name, fsync'ed, renamed into place and the folder fsync'ed, so neither a
killed run nor a power loss leaves a half file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

from calq import stages
from calq.errors import CalqError

CHUNK = 1 << 20

# sha256 of files just written by atomic_path, keyed by path, with the (size, mtime_ns, inode) they had then:
# a stage's marker takes them from here instead of reading the bytes a second time.
_written: dict[str, tuple[tuple[int, int, int], str]] = {}
# sha256 of input files by (absolute path, size, mtime_ns): content_sha256 reads each once per process.
_contents: dict[tuple[str, int, int], str] = {}


def stable_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _hash_and_sync(path: Path, durable: bool) -> str:
    """sha256 of a file just written (its bytes are still in the page cache), and fsync it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        if durable:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]


def _is_disk_full(exc: BaseException | None) -> bool:
    # Libraries wrap the OSError (safetensors raises its own error type with the OS message).
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if os.strerror(errno.ENOSPC) in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(final: Path, tmp: Path) -> CalqError:
    written = sum(f.stat().st_size for f in _files(tmp) if f.exists()) if tmp.exists() else 0
    existing = next(p for p in [final.parent, *final.parent.parents] if p.exists())  # the mkdir may have failed
    free = shutil.disk_usage(existing).free
    return CalqError(f"disk full while writing {final.name}: {_mb(free)} free on that disk, {_mb(written)} had been "
                     f"written when it filled (earlier results are intact)", str(final.parent),
                     "free some space (or pass another --out) and run the same command again to resume")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


@contextlib.contextmanager
def atomic_path(final: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `final` (file or folder); rename it onto `final` on success.

    Before the rename every file is hashed (recorded for the stage marker) and, with `durable`, fsync'ed; after
    it the parent folder is fsync'ed, so after a power loss `final` holds either the old or the complete new bytes.
    A write that fails because the disk is full removes the temporary and raises CalqError (exit 2).
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        hashes = {f.relative_to(tmp) if tmp.is_dir() else Path(): _hash_and_sync(f, durable) for f in _files(tmp)}
        if durable and tmp.is_dir():
            for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                _fsync_dir(folder)
        if final.is_dir() and tmp.is_dir():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
        for rel, sha in hashes.items():  # final / Path() is final itself
            _written[str(final / rel)] = (_signature((final / rel).stat()), sha)
    except Exception as exc:
        if _is_disk_full(exc):
            raise _disk_full(final, tmp) from exc
        raise
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file: from atomic_path's record when the file is unchanged since, else read."""
    st = path.stat()
    seen = _written.pop(str(path), None)
    if seen is not None and seen[0] == _signature(st):
        return {"size": st.st_size, "sha256": seen[1]}
    return {"size": st.st_size, "sha256": _sha256(path)}


def content_sha256(path: str | Path) -> str:
    """sha256 of an input file (data, model weights) for resume keys, so that they name content, not places.
    Read once per process for each (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _contents:
        _contents[key] = _sha256(path)
    return _contents[key]


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
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path -> {"size", "sha256"}
    redone: str | None = None  # why an earlier result of this stage was not reused (damaged output), if it was


@dataclass
class Problem:
    """One thing wrong in a run folder: `path` (relative to it) of `stage` is missing, truncated, ... damaged."""

    stage: str
    path: str
    kind: str  # missing | truncated | grown | damaged | unreadable | without checksums
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path} ({self.stage}): {self.kind}" + (f" ({self.detail})" if self.detail else "")

    def note(self) -> str:
        """The line shown when the stage is redone because of this problem."""
        return f"{self.path} was {self.kind}: {stages.words(self.stage)} redone"


def check_files(root: Path, stage: str, marker: dict, deep: bool = True) -> list[Problem]:
    """Compare a marker's recorded files with the folder; `deep` also compares sha256 (reads every byte)."""
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return [Problem(stage, f".calq/stages/{stage}.json", "without checksums",
                        "the marker was written by an older calq or edited")]
    problems = []
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(Problem(stage, rel, "missing"))
            continue
        size = path.stat().st_size
        if size != want["size"]:
            kind = "truncated" if size < want["size"] else "grown"
            problems.append(Problem(stage, rel, kind, f"{size:,} bytes, recorded {want['size']:,}"))
        elif deep and file_digest(path)["sha256"] != want["sha256"]:
            problems.append(Problem(stage, rel, "damaged", "its sha256 differs from the one recorded"))
    return problems


def read_marker(path: Path) -> dict | None:
    """A marker's content, or None when it cannot be read or is not shaped like one (a legacy marker without
    `files` is returned: `check_files` reports it)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        return None
    files = rec.get("files", {})
    shaped = isinstance(files, dict) and all(isinstance(f, dict) and isinstance(f.get("size"), int)
                                             and isinstance(f.get("sha256"), str) for f in files.values())
    return rec if shaped else None


def verify(root: str | Path) -> list[Problem]:
    """Every problem in a run folder's finished stages (outputs missing, truncated, changed), reading every byte
    once and running nothing. Raises CalqError when `root` is not a calq run folder."""
    root = Path(root)
    stages = root / ".calq" / "stages"
    if not (root / ".calq" / "run.json").is_file():
        raise CalqError("not a calq run folder", str(root), "pass the folder a `calq run` wrote")
    problems = []
    for marker in sorted(stages.rglob("*.json")) if stages.is_dir() else []:
        stage = marker.relative_to(stages).with_suffix("").as_posix()
        rec = read_marker(marker)
        if rec is None:
            problems.append(Problem(stage, marker.relative_to(root).as_posix(), "unreadable"))
        else:
            problems.extend(check_files(root, stage, rec))
    return problems


def require_intact(root: str | Path) -> None:
    """Raise CalqError naming the damaged files when `verify` finds any (for `calq report`: exit 2)."""
    problems = verify(root)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        shown = "; ".join(str(p) for p in problems[:3]) + more
        raise CalqError(f"damaged run folder: {shown}", str(root),
                        "run the same `calq run` again to redo the damaged stages (`calq verify` lists them all)")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta = self.root / ".calq"
        self.records: dict[str, StageRecord] = {}
        self.notes: list[str] = []  # stages redone because their outputs were damaged, for the console and report
        self.current_stage: str | None = None  # the stage running now, or the one that raised ("interrupted during")
        self._damaged: dict[str, str] = {}  # stage -> the note on why its earlier result was not reused

    def claim(self, recipe_name: str) -> None:
        """Create the folder, or check that it belongs to this recipe name (and sweep a killed run's temp files).

        Sweeping deletes temporary files, so call it while holding `lock()` when another process could be writing.
        """
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
        self._refuse_foreign()
        write_json(owner_file, {"recipe": recipe_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _refuse_foreign(self) -> None:
        """Refuse a non-empty folder that calq did not make (a lone `.calq/lock` from `lock()` does not count)."""
        if (self.meta / "run.json").is_file() or not self.root.exists():
            return
        others = [p for p in self.root.iterdir() if p != self.meta]
        if others or (self.meta.exists() and any(p.name != "lock" for p in self.meta.iterdir())):
            raise CalqError(
                "output folder exists, is not empty and was not made by calq",
                str(self.root),
                "pass an empty or new folder with --out",
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold an exclusive lock on the folder (flock on .calq/lock) while the block runs; a second writer gets
        CalqError naming the process that holds it. The kernel drops the lock when its process dies, however it
        dies, so a killed run's lock is taken over by the next run with nothing to clean up."""
        self._refuse_foreign()
        self.meta.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        held = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(fd) from None
            held = True
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
            yield self
        finally:
            if held:
                os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock

    def _busy(self, fd: int) -> CalqError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:  # the holder is between taking the lock and writing its details
            holder = {}
        pid = holder.get("pid", "?")
        return CalqError(f"run folder is in use by calq process {pid} on {holder.get('host', '?')} "
                         f"(since {holder.get('started', '?')}): two runs must not write one folder", str(self.root),
                         f"wait for that run to end, or stop it (kill {pid}), then run again")

    def _sweep(self) -> None:
        for litter in list(self.root.rglob(".*.tmp-*")) + list(self.root.rglob(".*.old-*")):
            shutil.rmtree(litter) if litter.is_dir() else litter.unlink(missing_ok=True)

    def path(self, *parts: str) -> Path:
        """A path inside the run folder; CalqError when the parts would lead outside it ('..', absolute, links)."""
        path = self.root.joinpath(*parts)
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise CalqError(f"path {'/'.join(map(str, parts))!r} leads outside the run folder", str(self.root),
                            "use plain names (letters, digits, '-', '_', '.') for the recipe and its variants")
        return path

    def _marker(self, stage: str) -> Path:
        return self.path(".calq", "stages", f"{stage}.json")

    def _note(self, stage: str, line: str) -> None:
        self._damaged[stage] = line
        if line not in self.notes:
            self.notes.append(line)

    def finished(self, stage: str, key: str, deep: bool = True) -> StageRecord | None:
        """The stage's record when it finished with inputs `key` and its outputs are intact, else None. Damaged
        outputs add a line to `notes`. `deep=False` checks sizes only (for a quick listing: reads no bytes)."""
        marker = self._marker(stage)
        if not marker.is_file():
            return None
        rec = read_marker(marker)
        if rec is None:
            self._note(stage, Problem(stage, marker.relative_to(self.root).as_posix(), "unreadable").note())
            return None
        if rec.get("key") != key:
            return None
        problems = check_files(self.root, stage, rec, deep)
        if problems:
            self._note(stage, problems[0].note())
            return None
        known = {f.name for f in fields(StageRecord)}
        return StageRecord(**{**{k: v for k, v in rec.items() if k in known}, "reused": True})

    def run_stage(self, stage: str, key: str, fn, *args, **kwargs) -> StageRecord:
        """Run `fn(*args, **kwargs)` -> (outputs: {name: path}, info: dict) unless already finished with `key`."""
        rec = self.finished(stage, key)
        if rec is None:
            self._marker(stage).unlink(missing_ok=True)
            start = time.perf_counter()
            self.current_stage = stage
            with PeakRSS() as mem:
                outputs, info = fn(*args, **kwargs)
            self.current_stage = None
            gc.collect()  # the stage's model is unreachable now; free it before the next stage loads one
            rel = {k: Path(v).relative_to(self.root).as_posix() for k, v in outputs.items()}
            files = {f.relative_to(self.root).as_posix(): file_digest(f)
                     for out in rel.values() for f in _files(self.path(out))}
            rec = StageRecord(stage, key, rel, round(time.perf_counter() - start, 2), round(mem.peak / 2**20, 1),
                              info=info, files=files, redone=self._damaged.pop(stage, None))
            write_json(self._marker(stage), {k: v for k, v in rec.__dict__.items() if k != "reused"})
        self.records[stage] = rec
        return rec
