"""A stand-in native runtime for the crash-isolation tests: it answers, fails like Python, or dies like C."""

from __future__ import annotations

import os
import signal

import numpy as np

from calq.export.gguf import GgufExporter


class StandInSession:
    def __init__(self, path, threads: int = 1, die_on_load: bool = False):
        if die_on_load:
            os.kill(os.getpid(), signal.SIGSEGV)
        self.path, self.threads = path, threads

    def score(self, ids: list[int]) -> np.ndarray:
        return np.arange(len(ids) * 3, dtype=np.float32).reshape(len(ids), 3)

    def fail(self):
        raise ValueError("a Python error inside the runtime")

    def segfault(self):
        os.kill(os.getpid(), signal.SIGSEGV)

    def abort(self):
        os.abort()


def crash_while_reading(*args, **kwargs):
    """Stands in for calq.evaluation.gguf_check.llama_cpp_reading: llama.cpp dying inside eval()."""
    os.kill(os.getpid(), signal.SIGSEGV)



class CrashingGguf(GgufExporter):
    """calq's GGUF exporter whose llama.cpp session dies on load, as a llama.cpp built for another CPU does."""

    def session(self, out_dir, threads: int = 1, **kwargs):
        os.kill(os.getpid(), signal.SIGSEGV)
