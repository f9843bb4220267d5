"""Native runtimes (llama.cpp, ONNX Runtime) run in a child process, so that a crash there cannot take calq down.

A runtime compiled for another CPU, or one with a bug on this one, dies with a signal (SIGSEGV, SIGILL, an abort),
and in-process that would end the whole run with no word and no report. `Isolated(runtime, doing, factory, ...)`
builds `factory(...)` in a child process and forwards method calls to it through a pipe; a crash in the child raises
`RuntimeCrashed`, one CalqError line naming the runtime, the signal and what to do, and the parent goes on (the
stage fails with exit 2, or an optional check records "could not run"). The child is started with `spawn`, not
`fork`: a forked copy of a process whose OpenMP thread pool (torch's) has run can hang in the runtime's own.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import time
from collections.abc import Callable
from typing import Any

from calq.errors import CalqError

LLAMA_CPP_FIX = ("rebuild llama-cpp-python for a portable CPU target: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install "
                 "--force-reinstall --no-cache-dir --no-deps llama-cpp-python (`make` does this; `calq doctor` "
                 "probes it)")
ONNXRUNTIME_FIX = "reinstall onnxruntime from PyPI (pip install --force-reinstall onnxruntime); `calq doctor` probes it"


class RuntimeCrashed(CalqError):
    """A native runtime died in its child process (a signal, an abort, an out-of-memory kill)."""


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


# Plain pickle, not multiprocessing's: that one moves torch tensors through shared memory (/dev/shm), which is small
# in containers, and logits are large.
def _send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


def _serve(conn, factory: Callable, args: tuple, kwargs: dict) -> None:
    try:
        start = time.perf_counter()
        target = factory(*args, **kwargs)
        seconds = time.perf_counter() - start
    except BaseException as err:
        _send(conn, ("error", _picklable(err)))
        return
    _send(conn, ("ok", seconds))
    while (message := _recv(conn)) is not None:
        name, call_args, call_kwargs = message
        try:
            _send(conn, ("ok", getattr(target, name)(*call_args, **call_kwargs)))
        except BaseException as err:
            _send(conn, ("error", _picklable(err)))


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Isolated:
    """`factory(*args, **kwargs)` living in a child process; `isolated.method(...)` runs there and returns its
    (picklable) result. `runtime` and `doing` name the crash ("llama.cpp crashed with SIGSEGV while `doing`"),
    `where` and `fix` complete its line. `load_seconds`: how long `factory` took in the child (the runtime's import
    and load of the artifact, not the process start). Use as a context manager, or call close()."""

    def __init__(self, runtime: str, doing: str, factory: Callable, *args, where: str | None = None,
                 fix: str | None = None, **kwargs):
        self.runtime, self.doing, self.where, self.fix = runtime, doing, where, fix
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args, kwargs), daemon=True)
        self._process.start()
        child.close()
        try:
            self.load_seconds = self._receive()  # the factory's own time in the child (what loading the runtime costs)
        except BaseException:  # the factory failed: its child has ended, nothing to keep
            self.close()
            raise

    def _receive(self) -> Any:
        while not self._conn.poll(0.2):
            if not self._process.is_alive():
                self._crashed()
        try:
            status, value = _recv(self._conn)
        except (EOFError, ConnectionError):
            self._crashed()
        if status == "error":  # a Python error in the runtime: the child lives on for further calls
            raise value
        return value

    def _crashed(self):
        self._process.join(10)
        how = describe_exit(self._process.exitcode)
        self.close()
        raise RuntimeCrashed(f"{self.runtime} crashed with {how} while {self.doing}", self.where, self.fix)

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            try:
                _send(self._conn, (name, args, kwargs))
            except (BrokenPipeError, ConnectionError, OSError):
                self._crashed()
            return self._receive()

        return call

    def close(self) -> None:
        if self._process.is_alive():
            try:
                _send(self._conn, None)
            except (BrokenPipeError, ConnectionError, OSError):
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call(fn: Callable, *args, **kwargs):
    return _Result(fn(*args, **kwargs))


class _Result:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def run(runtime: str, doing: str, fn: Callable, *args, where: str | None = None, fix: str | None = None, **kwargs):
    """fn(*args, **kwargs) once in a child process (fn must be importable by name: a module-level function)."""
    with Isolated(runtime, doing, _call, fn, *args, where=where, fix=fix, **kwargs) as child:
        return child.get()
