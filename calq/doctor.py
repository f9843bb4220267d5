"""`calq doctor [RECIPE]`: can this machine run what calq (or one recipe) needs?

Python and package versions, the CPU and its features, threads, the accelerator, the data folder, and each optional
native runtime probed for real on a tiny model in a child process (calq.isolation): llama.cpp evaluates a tiny GGUF
and reports what its build was compiled for; ONNX Runtime runs MatMulNBits (calq's int4 layout) against numpy. A
runtime is ok, missing, crashed (a signal in the child) or failed (wrong numbers, an error), each with the fix.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from calq import isolation

PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "lm_eval", "datasets", "gguf",
            "onnxruntime", "llama-cpp-python", "triton", "ray", "autoawq")
# What a portable build of llama.cpp may report (GGML_NATIVE=OFF: the x86-64 AVX2 baseline, or ARMv8 with NEON)
# besides features that are not instruction sets. Anything else (AVX512*, AVX_VNNI, AMX_*, SVE, SME, I8MM, ...)
# was compiled for the building CPU and may crash on another.
PORTABLE_FEATURES = {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "NEON", "ARM_FMA",
                     "LLAMAFILE", "OPENMP", "REPACK", "ACCELERATE", "KLEIDIAI"}
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
             "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")
OK, MISSING, CRASHED, FAILED, INFO, WARN = "ok", "missing", "crashed", "failed", "info", "warn"


@dataclass
class Finding:
    what: str
    status: str
    detail: str
    fix: str = ""
    needed: bool = False  # the recipe asked about needs it
    facts: dict = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        """A problem that stops the recipe (or, with no recipe, a runtime that is installed but does not work)."""
        return self.status in (CRASHED, FAILED) or (self.needed and self.status == MISSING)


# ---- the machine ---------------------------------------------------------------------------------------

def cpu_flags() -> list[str]:
    """The CPU features calq's native parts care about, as the kernel reports them (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in have]
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> list[Finding]:
    import torch

    threads = f"{os.cpu_count()} logical CPUs, torch uses {torch.get_num_threads()} threads"
    flags = cpu_flags()
    found = [Finding("python", OK, f"{platform.python_version()} on {platform.system()} {platform.machine()}"),
             Finding("cpu", INFO, f"{cpu_name()}; {threads}; features: {' '.join(flags) or 'not reported'}",
                     facts={"flags": flags, "torch_capability": torch.backends.cpu.get_cpu_capability()})]
    if torch.cuda.is_available():
        found.append(Finding("accelerator", OK, f"CUDA: {torch.cuda.get_device_name()} (torch {torch.__version__})"))
    else:
        found.append(Finding("accelerator", INFO, "none: CPU only (the Triton kernels and `calq bench` need CUDA)"))
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} -")
    found.append(Finding("packages", INFO, ", ".join(versions)))
    return found


# ---- native runtimes, each probed in a child process ------------------------------------------------------

def _llama_probe(path: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(list(range(3, 67)))
        scores = llm.scores[:64]
        finite = bool(np.isfinite(scores).all())
    finally:
        llm.close()
    return {"shape": list(scores.shape), "finite": finite,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace")}


def build_features(system_info: str) -> list[str]:
    """The features llama.cpp's `llama_print_system_info()` says its build uses ('AVX2 = 1 | ...')."""
    features = []
    for part in system_info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() not in ("", "0"):
            features.append(name)
    return features


def probe_llama_cpp(folder: Path) -> Finding:
    if importlib.util.find_spec("llama_cpp") is None:
        return Finding("llama.cpp", MISSING, "llama-cpp-python is not installed (GGUF export and cross-check)",
                       "pip install 'calq[edge]' with CMAKE_ARGS='-DGGML_NATIVE=OFF' (or `make test`)")
    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(folder / "probe.gguf", "the quick brown fox jumps over the lazy dog " * 8, words=20)
    try:
        out = isolation.run("llama.cpp", "evaluating a tiny GGUF", _llama_probe, str(path), fix=isolation.LLAMA_CPP_FIX)
    except isolation.RuntimeCrashed as err:
        return Finding("llama.cpp", CRASHED, err.what, isolation.LLAMA_CPP_FIX)
    except Exception as err:
        return Finding("llama.cpp", FAILED, f"{type(err).__name__}: {err}", isolation.LLAMA_CPP_FIX)
    if out["shape"][0] != 64 or not out["finite"]:
        return Finding("llama.cpp", FAILED, f"logits of shape {out['shape']}, finite: {out['finite']}",
                       isolation.LLAMA_CPP_FIX)
    features = build_features(out["system_info"])
    native = [f for f in features if f not in PORTABLE_FEATURES]
    version = metadata.version("llama-cpp-python")
    facts = {"features": features, "beyond_portable": native, "system_info": out["system_info"].strip()}
    if native:
        return Finding("llama.cpp", WARN, f"llama-cpp-python {version} works here, but was built for this CPU "
                       f"({', '.join(native)}): a copy of it may crash on another CPU", isolation.LLAMA_CPP_FIX,
                       facts=facts)
    return Finding("llama.cpp", OK, f"llama-cpp-python {version}, portable build ({' '.join(features)}); a tiny "
                   "GGUF evaluated", facts=facts)


def _matmul_nbits_model(k: int, n: int, block: int, rng: np.random.Generator):
    """A one-node ONNX graph: MatMulNBits (4-bit, zero point 8) as calq's ONNX export writes it, and its reference
    weight [K, N]."""
    import onnx
    from onnx import TensorProto, helper

    q = rng.integers(0, 16, size=(n, k // block, block), dtype=np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, k // block)).astype(np.float32)
    weight = ((q.astype(np.float32) - 8) * scales[..., None]).reshape(n, k).T
    node = helper.make_node("MatMulNBits", ["x", "w", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [onnx.numpy_helper.from_array(packed, "w"),
                               onnx.numpy_helper.from_array(scales.reshape(-1), "scales")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return model.SerializeToString(), weight


def _onnxruntime_probe(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def probe_onnxruntime() -> Finding:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return Finding("ONNX Runtime", MISSING, "onnxruntime / onnx are not installed (ONNX export)",
                       "pip install 'calq[edge]'")
    rng = np.random.default_rng(0)
    model, weight = _matmul_nbits_model(64, 16, 32, rng)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    try:
        y = isolation.run("ONNX Runtime", "running MatMulNBits", _onnxruntime_probe, model, x,
                          fix=isolation.ONNXRUNTIME_FIX)
    except isolation.RuntimeCrashed as err:
        return Finding("ONNX Runtime", CRASHED, err.what, isolation.ONNXRUNTIME_FIX)
    except Exception as err:
        return Finding("ONNX Runtime", FAILED, f"{type(err).__name__}: {err}", isolation.ONNXRUNTIME_FIX)
    error = float(np.abs(y - x @ weight).max() / np.abs(x @ weight).max())
    version = metadata.version("onnxruntime")
    if not error < 1e-4:
        return Finding("ONNX Runtime", FAILED, f"onnxruntime {version}: MatMulNBits is off by {error:.2g} (relative)",
                       isolation.ONNXRUNTIME_FIX)
    return Finding("ONNX Runtime", OK, f"onnxruntime {version}: MatMulNBits (int4) matches numpy ({error:.1g} "
                   "relative)", facts={"relative_error": error})


def optional_package(name: str, module: str, what: str, fix: str) -> Finding:
    if importlib.util.find_spec(module) is None:
        return Finding(name, MISSING, f"not installed ({what})", fix)
    return Finding(name, OK, f"{metadata.version(name)} ({what})")


# ---- a recipe's needs and data ------------------------------------------------------------------------

def needs(recipe, executor: str = "local") -> set[str]:
    """The findings a recipe cannot run without."""
    out = set()
    formats = recipe.export.formats if recipe.export is not None else ()
    if "gguf" in formats:
        out.add("llama.cpp")
    if "onnx" in formats:
        out.add("ONNX Runtime")
    if any(v.method == "autoawq" for v in recipe.variants):
        out.add("autoawq")
    if executor == "ray":
        out.add("ray")
    return out


def data_specs(section, where: str = "") -> list[tuple[str, object]]:
    """(key, DataSpec) for every data source in a recipe section, found by walking its fields."""
    from pydantic import BaseModel

    from calq.data import DataSpec

    if isinstance(section, DataSpec):
        return [(where, section)]
    if not isinstance(section, BaseModel):
        return []
    return [found for name in type(section).model_fields
            for found in data_specs(getattr(section, name), f"{where}.{name}" if where else name)]


def data_finding(data_root: Path | None, recipe=None) -> Finding:
    if data_root is None:
        detail = "no data folder given (--data-dir or $CALQ_DATA_DIR)"
        if recipe is not None:
            from calq.pipeline import without_unavailable_data

            _, notes = without_unavailable_data(recipe, None)
            detail += ": " + ("; ".join(notes) if notes else "the recipe needs none")
        return Finding("data", INFO, detail, "pass --data-dir FOLDER (the offline data) to run everything")
    if not data_root.is_dir():
        return Finding("data", FAILED, f"{data_root} is not a folder", "check --data-dir / $CALQ_DATA_DIR",
                       needed=True)
    if recipe is not None:
        from calq import data as data_mod

        for where, spec in data_specs(recipe):
            try:
                data_mod.check_available(spec, where, data_root)
            except data_mod.SourceUnavailable as err:
                return Finding("data", FAILED, err.line(), needed=True)
    return Finding("data", OK, f"{data_root} ({sum(1 for _ in data_root.rglob('*') if _.is_file())} files)")


def diagnose(recipe=None, data_root: Path | None = None, executor: str = "local") -> list[Finding]:
    """Every finding, in the order the report shows them; `recipe` (a Recipe) marks what it needs."""
    with tempfile.TemporaryDirectory(prefix="calq-doctor-") as folder:
        found = [*machine(), probe_llama_cpp(Path(folder)), probe_onnxruntime(),
                 optional_package("ray", "ray", "--executor ray", "pip install 'calq[ray]'"),
                 optional_package("autoawq", "awq", "method: autoawq", "pip install 'calq[autoawq]'"),
                 data_finding(data_root, recipe)]
    wanted = needs(recipe, executor) if recipe is not None else set()
    for f in found:
        f.needed = f.needed or f.what in wanted
    return found


def exit_code(found: list[Finding]) -> int:
    return 2 if any(f.blocks for f in found) else 0

