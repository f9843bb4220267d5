"""`calq doctor`: what this machine can run, each native runtime probed in a child process."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from calq import doctor
from calq.cli import app

runner = CliRunner()


def findings(*args) -> tuple[int, dict]:
    result = runner.invoke(app, ["doctor", "--json", *args])
    return result.exit_code, {f["what"]: f for f in json.loads(result.stdout)}


def test_this_machine_runs_the_runtimes_it_has_and_llama_cpp_is_a_portable_build():
    code, found = findings()
    assert code == 0, found
    assert found["python"]["status"] == "ok" and "cpu" in found and "accelerator" in found
    llama = found["llama.cpp"]
    if llama["status"] != "missing":
        assert llama["status"] in ("ok", "warn"), llama
        # `make` builds llama-cpp-python with GGML_NATIVE=OFF; LLAMA_NATIVE=1 is the developer's own choice
        if not os.environ.get("LLAMA_NATIVE"):
            assert llama["status"] == "ok" and llama["facts"]["beyond_portable"] == [], llama["facts"]
            assert "AVX2" in llama["facts"]["features"] or "NEON" in llama["facts"]["features"]
    onnx = found["ONNX Runtime"]
    assert onnx["status"] in ("ok", "missing"), onnx


@pytest.mark.parametrize("info, beyond", [
    ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
     "REPACK = 1 | ", []),
    ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | OPENMP = 1 | ",
     ["AVX512", "AVX512_BF16", "AMX_INT8"]),
    ("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | SVE = 1 | ", ["DOTPROD", "SVE"]),
])
def test_build_features_name_what_is_beyond_the_portable_baseline(info, beyond):
    assert [f for f in doctor.build_features(info) if f not in doctor.PORTABLE_FEATURES] == beyond


def test_a_recipe_that_needs_a_crashing_runtime_exits_2(tiny_recipe, write_recipe, monkeypatch):
    pytest.importorskip("llama_cpp")
    from standin_runtime import crash_while_reading

    monkeypatch.setattr(doctor, "_llama_probe", crash_while_reading)
    tiny_recipe["export"] = {"formats": ["gguf"]}
    code, found = findings(str(write_recipe(tiny_recipe)))
    assert code == 2
    llama = found["llama.cpp"]
    assert llama["status"] == "crashed" and llama["needed"] and "SIGSEGV" in llama["detail"]
    assert "GGML_NATIVE=OFF" in llama["fix"]


def test_a_recipe_whose_data_file_is_missing_exits_2(tiny_recipe, write_recipe, tmp_path, monkeypatch):
    tiny_recipe["calibration"]["data"] = {"source": "@data/nope/missing.txt"}
    code, found = findings(str(write_recipe(tiny_recipe)), "--data-dir", str(tmp_path))
    assert code == 2 and found["data"]["status"] == "failed" and "missing.txt" in found["data"]["detail"]
    monkeypatch.delenv("CALQ_DATA_DIR", raising=False)
    code, found = findings(str(write_recipe({**tiny_recipe, "calibration": {**tiny_recipe["calibration"],
                                                                           "data": {"source": "builtin:pydoc"}}})))
    assert found["data"]["status"] == "info"


def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnope: 1\n")
    result = runner.invoke(app, ["doctor", str(bad)])
    assert result.exit_code == 2 and "error:" in result.output
