"""The architecture matrix: a tiny random model of each decoder family (tests/tiny.py FAMILIES, built from the family's
own transformers config) goes through one run of every stage: ranges, minmax W8A8 and W4A16, SmoothQuant, AWQ,
the temperature and ATS calibrators, token evaluation, and export to ONNX Runtime and GGUF re-verified on the runtime
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
from tiny import FAMILIES, make_tiny_model

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
           "evaluate", "onnx", "gguf"]
RESULTS: dict[str, dict[str, str]] = {}  # family -> column -> "✓" or "✗ reason", filled by test_family


def matrix_recipe(model: Path, texts: dict[str, Path], alpaca: Path) -> dict:
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
                                  "batch_size": 4}},
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
def family_model(tmp_path_factory):
    """family -> its tiny model folder, made once per module."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_float_weights_match_pytorch(family, family_model, tmp_path):
    """F32 weights and a float32 KV cache: llama.cpp computes the family's function (names, q/k row order, norm
    offsets, metadata). Bound 1e-5 relative (measured about 3e-7); Gemma 2e-3 (measured 3-5e-4, the same at every
    position, position 0 included, so it is in the element-wise part, not attention: ggml computes GELU through a
    float16 table, and rounding GELU's input to float16 in PyTorch alone does not remove it). Where llama.cpp's graph
    would compute something else, the exporter refuses the model before writing anything."""
    import torch
    from transformers import AutoModelForCausalLM

    from calq.export import gguf as gguf_export

    folder = family_model(family)
    exporter = gguf_export.GgufExporter(float_type="f32")
    config = AutoModelForCausalLM.from_pretrained(folder).config
    if gguf_export.unsupported(config):
        with pytest.raises(CalqError, match="llama.cpp's .* graph cannot run this"):
            exporter.export(folder, tmp_path)
        assert not any(tmp_path.iterdir())
        return
    exporter.export(folder, tmp_path)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
    got = exporter.session(tmp_path, n_ctx=64, kv_cache="f32").score(ids)
    relative = float((got - want).abs().max() / want.abs().max())
    assert relative < (2e-3 if family.startswith("gemma") else 1e-5)
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, family_model, texts, alpaca_records, tmp_path_factory):
    model = family_model(family)
    out = tmp_path_factory.mktemp(f"run-{family}")
    prepared, refused = plan_with_refusals(matrix_recipe(model, texts, alpaca_records), out / "run")
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
        lines.append(f"| {family} | " + " | ".join(row[c].replace("|", "/") for c in COLUMNS) + " |")
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
