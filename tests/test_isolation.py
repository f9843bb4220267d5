"""Native runtimes run in a child process (calq.isolation): a crash there is one line, never the end of calq."""

from __future__ import annotations

import numpy as np
import pytest
from standin_runtime import StandInSession, crash_while_reading

from calq import isolation
from calq.errors import CalqError
from calq.isolation import Isolated, RuntimeCrashed


def test_calls_are_answered_by_the_child():
    with Isolated("stand-in", "scoring", StandInSession, "model.bin", threads=2) as session:
        np.testing.assert_array_equal(session.score([1, 2]), np.arange(6, dtype=np.float32).reshape(2, 3))
        with pytest.raises(ValueError, match="a Python error inside the runtime"):
            session.fail()
        assert session.score([1]).shape == (1, 3)  # a Python error does not end the runtime's process
        assert session.load_seconds > 0  # the factory's time in the child


@pytest.mark.parametrize("method, signal_name", [("segfault", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_crash_in_a_call_is_one_line_naming_runtime_signal_and_fix(method, signal_name):
    session = Isolated("llama.cpp", "verifying model.gguf", StandInSession, "model.gguf", where="export.gguf",
                       fix="rebuild it")
    with pytest.raises(RuntimeCrashed) as caught:
        getattr(session, method)()
    assert caught.value.line() == (f"export.gguf: llama.cpp crashed with {signal_name} while verifying model.gguf"
                                   " — fix: rebuild it")
    assert isinstance(caught.value, CalqError)  # the CLI prints it as one line and exits 2


def test_a_crash_while_loading_and_in_a_one_shot_call():
    with pytest.raises(RuntimeCrashed, match="stand-in crashed with SIGSEGV while loading"):
        Isolated("stand-in", "loading", StandInSession, "x", die_on_load=True)
    with pytest.raises(RuntimeCrashed, match="stand-in crashed with SIGSEGV while reading"):
        isolation.run("stand-in", "reading", crash_while_reading, "x")


def test_calq_errors_keep_their_place_and_fix_across_the_process_boundary(tmp_path):
    from calq.export.gguf import LlamaCppSession

    pytest.importorskip("llama_cpp")
    with pytest.raises(CalqError) as caught:
        Isolated("llama.cpp", "loading", LlamaCppSession, tmp_path / "missing.gguf")
    assert caught.value.where == str(tmp_path / "missing.gguf") and caught.value.fix == "export the variant first"


def test_a_runtime_crash_in_an_export_stage_fails_it_with_one_line_and_keeps_the_run(tiny_recipe, tmp_path,
                                                                                     monkeypatch):
    import json

    from standin_runtime import CrashingGguf
    from typer.testing import CliRunner

    import calq
    from calq.cli import app
    from calq.export.base import EXPORTERS

    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    out = tmp_path / "run"
    calq.run({**tiny_recipe, "export": None}, out=out)
    before = (out / "report.json").read_text()
    monkeypatch.setitem(EXPORTERS._classes, "gguf", CrashingGguf)
    result = CliRunner().invoke(app, ["export", str(out), "--format", "gguf"])
    assert result.exit_code == 2, result.output
    assert "export.gguf: llama.cpp crashed with SIGSEGV while running" in result.output
    assert "GGML_NATIVE=OFF" in result.output
    assert (out / "report.json").read_text() == before and json.loads(before)["variants"]  # earlier results kept
    assert not (out / "export" / "minmax-w4a16-g32" / "gguf").exists()  # no half-written artifact
