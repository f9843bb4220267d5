"""The architecture matrix: a tiny random model of each decoder family (tests/tiny.py FAMILIES, built from the family's
own transformers config) goes through one run of every stage: ranges, minmax W8A8 and W4A16, SmoothQuant, AWQ,
the temperature and ATS calibrators, token evaluation, answer-level tasks through lm-eval (a small multiple-choice task
of the user's kind, tests/test_answer_runs.py), and export to ONNX Runtime and GGUF re-verified on the runtime
against the PyTorch variant. A stage calq cannot do for a family must be refused by the plan, before any work, with
one line; the refusal is the table's reason. docs/architectures.md is this table: the test fails when it is stale
(CALQ_WRITE_TABLE=1 rewrites it).

Bounds on the re-verification (the exported variant is minmax W4A16 g32 with a temperature; the runtimes score 128
held-out tokens):
- ONNX Runtime runs calq's int4 values in MatMulNBits on float32 activations: top-1 agreement 1.0, and logits within
  1% of the largest logit (only the summation order differs, and the fused temperature).
- llama.cpp quantizes the activations of int4 products to int8 blocks of 32 and keeps a float16 KV cache: agreement
  >= 0.9 and logits within 5% (the bounds of tests/test_export.py: a random model's logits are nearly flat, so a small
  move can flip a near-tie).
"""

import json
import os
from pathlib import Path

import pytest
from test_answer_runs import write_task
from tiny import FAMILIES, ROPE_SCALING, make_tiny_model

import calq
from calq.api import prepare
from calq.errors import CalqError

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")

TABLE = Path(__file__).parent.parent / "docs" / "architectures.md"
README = Path(__file__).parent.parent / "README.md"
VARIANTS = [{"method": "minmax", "scheme": "w8a8"}, {"method": "minmax", "scheme": "w4a16", "group_size": 32},
            {"method": "smoothquant", "scheme": "w8a8"}, {"method": "awq", "scheme": "w4a16", "group_size": 32}]
EXPORTED = "minmax-w4a16-g32"
COLUMNS = ["ranges", "minmax-w8a8", "minmax-w4a16-g32", "smoothquant-w8a8", "awq-w4a16-g32", "temperature", "ats",
           "evaluate", "tasks", "onnx", "gguf"]
RESULTS: dict[str, dict[str, str]] = {}  # family -> column -> "✓" or "✗ reason", filled by test_family


def matrix_recipe(model: Path, texts: dict[str, Path], alpaca: Path, tasks: Path) -> dict:
    return {
        "name": "matrix",
        # a random model is no working LM: the baseline check runs and reports, but cannot pass
        "model": {"id": str(model), "check": {"enforce": False, "tokens": 64}},
        "calibration": {"data": {"source": str(texts["calib"])}, "num_samples": 8, "seq_len": 32,
                        "allow_any_size": True},
        "variants": VARIANTS,
        "calibrators": {"data": {"source": str(alpaca)}, "fit_records": 20, "heldout_records": 6, "max_len": 64,
                        "ats": {"epochs": 1, "min_response_tokens": 50}, "validation_text": {"tokens": 256}},
        "evaluation": {"tokens": {"data": {"source": str(texts["heldout"])}, "max_tokens": 256, "seq_len": 64,
                                  "batch_size": 4},
                       "tasks": {"names": ["matrix_mc"], "include_path": [str(tasks)], "limit": 16, "batch_size": 16,
                                 "bootstrap": 20}},
        "export": {"formats": ["onnx", "gguf"], "variants": [EXPORTED], "calibrator": "temperature",
                   "max_tokens": 128, "threads": 1},
    }


def plan_with_refusals(recipe: dict, out: Path) -> tuple[dict, dict[str, str]]:
    """Plan the recipe; each refusal of a variant or an export format is recorded ({column: reason}) and the item
    dropped, until the plan passes. Any other refusal fails the test."""
    refused: dict[str, str] = {}
    while True:
        try:
            return prepare(recipe, out), refused
        except CalqError as err:
            where = err.where or ""
            if where.startswith("variants["):
                index = int(where[len("variants["):].split("]")[0])
                spec = recipe["variants"][index]
                label = f"{spec['method']}-{spec['scheme']}" + (f"-g{spec['group_size']}" if "group_size" in spec
                                                               else "")
                refused[label] = err.what
                recipe["variants"] = [v for i, v in enumerate(recipe["variants"]) if i != index]
            elif where.startswith("export.formats[") or where == "export.calibrator":
                fmt = (recipe["export"]["formats"][int(where[len("export.formats["):-1])] if "[" in where
                       else err.what.split()[0])
                refused[fmt] = err.what
                recipe["export"]["formats"] = [f for f in recipe["export"]["formats"] if f != fmt]
            else:
                raise
            assert "\n" not in err.line()


@pytest.fixture(scope="module")
def alpaca_records(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    texts = sorted(set(topics.values()))
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Explain topic {i}.", "input": "", "output": texts[i][:300]}
                                for i in range(40)]))
    return path


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> Path:
    """A folder with one lm-eval task YAML: 16 three-way multiple-choice questions in a local JSON lines file."""
    folder = tmp_path_factory.mktemp("matrix-tasks")
    write_task(folder, "matrix_mc", 16, 0, 3)
    return folder


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """(family, rope_scaling) -> its tiny model folder, made once per module. By default a family is built with its
    ROPE_SCALING where it has one: the matrix runs Llama with Llama 3.x's rope, Phi-3 with LongRoPE."""
    made: dict[tuple, Path] = {}

    def get(family: str, rope_scaling: bool | None = None, **overrides) -> Path:
        key = (family, family in ROPE_SCALING if rope_scaling is None else rope_scaling, *sorted(overrides.items()))
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(family), family, rope_scaling=key[1], **overrides)
        return made[key]

    return get


def logits(folder: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits


def relative_difference(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


FLOAT_CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in ROPE_SCALING]


@pytest.mark.parametrize(("family", "rope_scaling"), FLOAT_CASES,
                         ids=[family + ("-rope-scaling" if scaled else "") for family, scaled in FLOAT_CASES])
def test_gguf_float_weights_match_pytorch(family, rope_scaling, family_model, tmp_path):
    """F32 weights and a float32 KV cache: llama.cpp computes the family's function (names, q/k row order, norm
    offsets, metadata, RoPE scaling). Bound 1e-5 relative (measured about 3e-7); Gemma 2e-3 (measured 3-5e-4, the same
    at every position, position 0 included, so it is in the element-wise part, not attention: ggml computes GELU
    through a float16 table, and rounding GELU's input to float16 in PyTorch alone does not remove it). Where
    llama.cpp's graph would compute something else, the exporter refuses the model before writing anything. With RoPE
    scaling (40 tokens, past the original 32), the same weights without it must give logits far outside the bound, so
    a file that dropped the scaling would fail."""
    import torch
    from transformers import AutoConfig

    from calq.export import gguf as gguf_export

    folder = family_model(family, rope_scaling)
    exporter = gguf_export.GgufExporter(float_type="f32")
    if gguf_export.unsupported(AutoConfig.from_pretrained(folder)):
        with pytest.raises(CalqError, match="llama.cpp's .* graph cannot run this"):
            exporter.export(folder, tmp_path)
        assert not any(tmp_path.iterdir())
        return
    exporter.export(folder, tmp_path)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    want = logits(folder, ids)
    got = exporter.session(tmp_path, n_ctx=64, kv_cache="f32").score(ids)
    bound = 2e-3 if family.startswith("gemma") else 1e-5
    assert relative_difference(got, want) < bound
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95
    if rope_scaling:
        assert relative_difference(logits(family_model(family, False), ids), want) > 100 * bound


def test_llama3_rope_freqs_as_llama_cpp_converts_them():
    """Llama 3.1 8B's config (tests/configs): accepted, and rope_freqs equals what convert_hf_to_gguf.py's LlamaModel
    computes (its loop, restated here) to float32 rounding."""
    import math

    import gguf
    import numpy as np
    from transformers import AutoConfig

    from calq.export import gguf as gguf_export

    config = AutoConfig.from_pretrained(Path(__file__).parent / "configs" / "llama-3.1-8b-instruct")
    gguf_export.GgufExporter().check_config(config, "config.json")
    rope = config.rope_parameters
    dim = config.hidden_size // config.num_attention_heads
    low, high = (rope["original_max_position_embeddings"] / rope[k] for k in ("low_freq_factor", "high_freq_factor"))
    expected = []
    for freq in 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
            rope["high_freq_factor"] - rope["low_freq_factor"])
        expected.append(1 if wavelen < high else rope["factor"] if wavelen > low else 1 / ((1 - smooth) / rope["factor"]
                                                                                         + smooth))
    got = gguf_export.rope_factors(gguf, config)
    assert list(got) == ["rope_freqs.weight"]
    assert len(set(expected)) > 3  # high, low and smoothed frequencies all present
    np.testing.assert_allclose(got["rope_freqs.weight"], np.array(expected, dtype=np.float32), rtol=1e-5)


def test_rope_scaling_gguf_does_not_write_is_refused():
    """A RoPE scaling llama.cpp would not compute for that architecture is refused from the config alone."""
    from transformers import Qwen2Config

    from calq.export import gguf as gguf_export

    yarn = Qwen2Config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 32})
    with pytest.raises(CalqError, match="graph cannot run this qwen2 model: rope_type 'yarn'.*fix: export it to onnx"):
        gguf_export.GgufExporter().check_config(yarn, "config.json")


def test_gguf_longrope_short_factors(family_model, tmp_path):
    """LongRoPE within the original length: transformers takes the short factors for a sequence no longer than
    original_max_position_embeddings, llama.cpp for a context no longer (its context is a multiple of 256, so the
    original length here is 256)."""
    import torch

    from calq.export import gguf as gguf_export

    folder = family_model("phi3", True, original_max_position_embeddings=256)
    exporter = gguf_export.GgufExporter(float_type="f32")
    exporter.export(folder, tmp_path)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    want = logits(folder, ids)
    assert relative_difference(exporter.session(tmp_path, n_ctx=64, kv_cache="f32").score(ids), want) < 1e-5
    assert relative_difference(logits(family_model("phi3", False), ids), want) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, family_model, texts, alpaca_records, mc_task, tmp_path_factory):
    model = family_model(family)
    out = tmp_path_factory.mktemp(f"run-{family}")
    prepared, refused = plan_with_refusals(matrix_recipe(model, texts, alpaca_records, mc_task), out / "run")
    report = calq.run(prepared)
    run = out / "run"
    row = {column: "✗ " + reason for column, reason in refused.items()}

    assert (run / "ranges.safetensors").is_file()
    row["ranges"] = "✓"
    variants = {v["variant"]: v for v in report.data["variants"]}
    for spec in prepared.recipe.variants:
        entry = variants[spec.label]
        assert (run / "variants" / spec.label / "config.json").is_file()
        assert set(entry["calibrated"]["tokens"]) == {"none", "temperature", "ats"}
        row[spec.label] = "✓"
    for name in ("temperature", "ats"):
        assert all((run / "calibrators" / v / name).is_dir() for v in variants)
        row[name] = "✓"
    assert all((run / "eval" / f"{v}.json").is_file() for v in variants)
    row["evaluate"] = "✓"
    for v in variants:  # lm-eval scored every choice of every question under every calibrator
        task = json.loads((run / "tasks" / f"{v}.json").read_text())["tasks"]["matrix_mc"]
        assert task["n"] == 16 and set(task["calibrators"]) == {"none", "temperature", "ats"}
        for result in task["calibrators"].values():
            assert len(result["scores"]) == 16 and all(len(lls) == 3 for lls in result["loglikelihoods"])
    row["tasks"] = "✓"

    deployed = {r["format"]: r for r in report.data.get("deployed", [])}
    assert set(deployed) == set(prepared.recipe.export.formats)
    for fmt, r in deployed.items():
        assert r["variant"] == EXPORTED
        if fmt == "onnx":
            assert r["top1"] == 1.0 and r["max_rel_logit_diff"] < 0.01, r
        else:
            assert r["top1"] >= 0.9 and r["max_rel_logit_diff"] < 0.05, r
        row[fmt] = "✓" if r["calibrator"] == "temperature" else f"✓ (calibrator {r['calibrator']}: {r['note']})"
    assert set(row) == set(COLUMNS)
    RESULTS[family] = row


def render(results: dict[str, dict[str, str]]) -> str:
    lines = ["# Architecture matrix", "",
             "Written by `tests/test_architectures.py` (`CALQ_WRITE_TABLE=1` rewrites it): a tiny random model of each "
             "family, built from its transformers config, through one run of every stage. ✓: the stage ran and, for "
             "an export, the artifact agreed with the PyTorch variant on its runtime; ✗: calq refuses it before any "
             "work, for the reason given.", "",
             "| family | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for family, row in results.items():
        label = (f"{family} ({ROPE_SCALING[family]['rope_parameters']['rope_type']} RoPE)" if family in ROPE_SCALING
                 else family)
        lines.append(f"| {label} | " + " | ".join(row[c].replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def test_table_is_current():
    if set(RESULTS) != set(FAMILIES):
        pytest.skip("the table needs every family's run (run the whole module)")
    text = render({family: RESULTS[family] for family in FAMILIES})
    if os.environ.get("CALQ_WRITE_TABLE"):
        TABLE.write_text(text)
    assert TABLE.is_file() and TABLE.read_text() == text, "docs/architectures.md is stale: CALQ_WRITE_TABLE=1 rewrites"
    rows = "\n".join(line for line in text.splitlines() if line.startswith("|"))
    assert rows in README.read_text(), "README.md's architecture table differs from docs/architectures.md: copy it"
