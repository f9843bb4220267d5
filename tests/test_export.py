"""Edge export: each format round-trips a tiny random Llama quantized with calq's own methods (W4A16 g32 asymmetric,
W8A8 per-token dynamic), the fused calibrator gives CalibratedLM's logits, and bad input fails before long work.

Bounds (the PyTorch variant, transformers' decompressed compressed-tensors model, is the reference):
- ONNX baseline and W4A16: float32 tolerance. MatMulNBits holds calq's exact int4 values, scales and zero points
  and runs float32 activations (accuracy_level 0), so only the summation order differs (measured: 2e-7).
- ONNX W8A8 dynamic: the graph quantizes activations exactly as compressed-tensors does, but a value sitting at a
  rounding tie can land on the other integer after a float32 difference of one ulp upstream; one step moves that
  product by 1/127 of the token's scale. Measured max |diff| / max |logit| 0.2%: bound 2%, top-1 agreement >= 0.98.
- GGUF: F32 weights with a float32 KV cache: float32 tolerance (measured 4e-7 relative). Quantized: llama.cpp
  quantizes the activations of int4/int8 products to int8 blocks of 32, keeps its KV cache in float16, and the block
  scales are float16: bound 5% relative, top-1 agreement >= 0.9 (measured here: W4A16 0.7% and 1.0, W8A8 1.0% and
  1.0; the tiny random model's logits are nearly flat, so a 1% move can flip a near-tie).
"""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from calq.calib.ats import AtsHead
from calq.calib.base import CalibratedLM
from calq.calib.temperature import Temperature
from calq.errors import CalqError
from calq.export import EXPORTERS, get, verify
from calq.export import gguf as gguf_export
from calq.export import variant as variants
from calq.quant import llmc, methods

IDS = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
SPECS = {"w4a16": {"method": "minmax", "scheme": "w4a16", "group_size": 32},
         "w8a8": {"method": "minmax", "scheme": "w8a8", "dynamic_activations": True}}


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """{'baseline': folder, 'w4a16': folder, 'w8a8': folder}: calq's variants saved with save_compressed=True."""
    llmc.quiet_logs(str(tmp_path_factory.mktemp("logs") / "llmcompressor.log"))
    samples = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    folders = {"baseline": tiny_model}
    for name, spec in SPECS.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        methods.config(spec).apply(model, samples)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name], save_compressed=True)
    return folders


def pytorch_logits(folder, calibrator=None):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        raw = model(input_ids=IDS).logits
        calibrated = raw if calibrator is None else CalibratedLM(model, calibrator)(input_ids=IDS).logits
    return raw, calibrated


def ats_head(folder):
    """A head whose scale really varies per position (a fitted head starts at zero weights: the identity)."""
    torch.manual_seed(0)
    head = AtsHead(AutoModelForCausalLM.from_pretrained(folder).config)
    torch.nn.init.normal_(head.out.weight, std=0.2)
    torch.nn.init.constant_(head.out.bias, -0.3)
    return head.eval().requires_grad_(False)


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def agreement(a, b):
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


# ---- ONNX ---------------------------------------------------------------------------------------------------------

ONNX_CASES = {"baseline": None, "w4a16": "ats", "w8a8": "temperature"}  # each variant with a different calibrator


@pytest.fixture(scope="module")
def onnx_artifacts(checkpoints, tmp_path_factory):
    """{variant: (calibrator, export info, out folder)}, exported once (the dynamo export is the slow part)."""
    pytest.importorskip("onnxruntime")
    artifacts = {}
    for name, kind in ONNX_CASES.items():
        fused = ats_head(checkpoints[name]) if kind == "ats" else Temperature(1.7) if kind else None
        out = tmp_path_factory.mktemp(f"onnx-{name}")
        artifacts[name] = (fused, get("onnx").export(checkpoints[name], out, fused), out)
    return artifacts


@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_round_trip_with_fused_calibrator(name, checkpoints, onnx_artifacts):
    fused, info, out = onnx_artifacts[name]
    assert info["scheme"] == name and json.loads((out / "export.json").read_text()) == info
    calibrated, raw = get("onnx").session(out).run(IDS)
    want_raw, want_calibrated = pytorch_logits(checkpoints[name], fused)
    if name == "w8a8":
        assert relative(raw, want_raw) < 0.02 and agreement(raw, want_raw) >= 0.98
        assert relative(calibrated, want_calibrated) < 0.02
    else:
        torch.testing.assert_close(raw, want_raw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(calibrated, want_calibrated, rtol=1e-4, atol=1e-4)
    if fused is not None:
        assert not torch.allclose(calibrated, raw)  # the calibrator did something
    if isinstance(fused, Temperature):  # on the runtime's own raw logits, exactly
        torch.testing.assert_close(calibrated, raw / 1.7, rtol=1e-6, atol=1e-6)


def test_onnx_holds_calqs_int4_values(checkpoints, onnx_artifacts):
    """The MatMulNBits initializers are calq's unsigned int4 values, scales and zero points, packed two per byte."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_artifacts["w4a16"][2] / "model.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    layer = variants.read(checkpoints["w4a16"]).layers["model.layers.0.mlp.down_proj"]
    assert len(nodes) == 14
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    node = next(n for n in nodes if "layers.0.mlp.down_proj" in n.input[1])
    packed, scales, zeros = (torch.from_numpy(inits[name].copy()) for name in node.input[1:4])
    unpacked = torch.stack([packed & 0xF, packed >> 4], -1).reshape(layer.q.shape)
    assert torch.equal(unpacked, layer.q) and torch.equal(scales, layer.scale)
    zeros = torch.stack([zeros & 0xF, zeros >> 4], -1).reshape(layer.zero.shape[0], -1)
    assert torch.equal(zeros[:, :layer.zero.shape[1]], layer.zero)  # K = 160: 5 blocks, the 6th nibble is padding


# ---- GGUF ---------------------------------------------------------------------------------------------------------

# what calq's own table wrote before it took the gguf package's map: the file must not change
LLAMA_NAMES = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
    f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                      "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}


def test_gguf_holds_calqs_integers(checkpoints, tmp_path):
    """Every quantized tensor in the file dequantizes (gguf's own reader) to calq's weights up to float16 scales,
    with llama.cpp's q/k row order; W4A16 asymmetric -> Q4_1, W8A8 -> Q8_0."""
    gguf = pytest.importorskip("gguf")
    exporter = gguf_export.GgufExporter()
    for name, kind in (("w4a16", "Q4_1"), ("w8a8", "Q8_0")):
        out = tmp_path / name
        exporter.export(checkpoints[name], out)
        tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
        variant = variants.read(checkpoints[name])
        config = variant.model.config
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        assert set(tensors) == {names.get_name(k, (".weight",)) for k in variant.model.state_dict()} == LLAMA_NAMES
        for module, layer in variant.layers.items():
            tensor = tensors[names.get_name(f"{module}.weight", (".weight",))]
            assert tensor.tensor_type.name == kind
            weight = layer.dequantize()
            if module.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
                weight = weight[gguf_export.rope_rows(weight.shape[0], heads)]
            got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            assert relative(got, weight) < 2e-3  # float16 block scales: 2^-11 of a weight at most, plus m's rounding


def llama_session(folder, tmp_path, exporter, calibrator=None, kv_cache="f16"):
    pytest.importorskip("llama_cpp")
    info = exporter.export(folder, tmp_path, calibrator)
    return exporter.session(tmp_path, n_ctx=64, kv_cache=kv_cache), info


def test_gguf_float_baseline_matches_pytorch(checkpoints, tmp_path):
    """With F32 weights and a float32 KV cache, llama.cpp computes what PyTorch computes (so names, q/k row order,
    norms and rotary base are right); its default float16 KV cache alone moves logits by about 2e-4 (measured)."""
    session, _ = llama_session(checkpoints["baseline"], tmp_path, gguf_export.GgufExporter(float_type="f32"),
                               kv_cache="f32")
    want, _ = pytorch_logits(checkpoints["baseline"])
    got = session.score(IDS)
    assert relative(got, want) < 1e-5 and agreement(got, want) == 1.0
    got = get("gguf").session(tmp_path, n_ctx=64).score(IDS)
    assert relative(got, want) < 2e-3 and agreement(got, want) >= 0.95


@pytest.mark.parametrize("name", ["w4a16", "w8a8"])
def test_gguf_quantized_round_trip_with_temperature(name, checkpoints, tmp_path):
    temperature = Temperature(1.7)
    session, info = llama_session(checkpoints[name], tmp_path, get("gguf"), temperature)
    assert "temperature 1.7000 folded into output_norm.weight" in " ".join(info["changes"])
    _, want = pytorch_logits(checkpoints[name], temperature)
    got = session.score(IDS)
    assert relative(got, want) < 0.05 and agreement(got, want) >= 0.9


# ---- re-verification ----------------------------------------------------------------------------------------------

def test_verify_measures_agreement_and_drift(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["baseline"]).eval()
    stream = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(2))

    def reference(ids):
        return model(input_ids=ids).logits

    same = verify(reference, reference, stream, seq_len=64, batch_size=2)
    assert same["windows"] == 3 and same["positions"] == 192 and same["top1_agreement"] == 1.0
    assert same["max_abs_logit_diff"] == 0 and same["drift"]["ece"] == 0 and same["drift"]["ppl_ratio"] == 1

    sharper = verify(reference, lambda ids: reference(ids) * 3, stream, seq_len=64)
    assert sharper["top1_agreement"] == 1.0  # a positive scale never changes the argmax
    assert sharper["artifact"]["confidence"] > sharper["reference"]["confidence"]
    assert sharper["drift"]["ece"] == pytest.approx(sharper["artifact"]["ece"] - sharper["reference"]["ece"])


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_unknown_format_and_registry():
    assert set(EXPORTERS.discover()) >= {"onnx", "gguf"}
    with pytest.raises(CalqError, match="unknown export format 'tflite'.*onnx"):
        get("tflite")


def test_formats_refuse_what_they_cannot_hold(checkpoints, tmp_path):
    with pytest.raises(CalqError, match="cannot carry the 'ats' calibrator"):
        get("gguf").check(checkpoints["baseline"], ats_head(checkpoints["baseline"]))
    odd = tmp_path / "g16"
    shutil.copytree(checkpoints["w4a16"], odd)
    config = json.loads((odd / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(CalqError, match="group size 16 is not a multiple of GGUF's block of 32"):
        get("gguf").check(odd)
    with pytest.raises(CalqError, match="calibrator 'ats' cannot be fused"):  # a name, not a calibrator
        get("onnx").check(checkpoints["baseline"], "ats")


@pytest.mark.parametrize("fmt,package", [("onnx", "onnxruntime"), ("gguf", "llama_cpp")])
def test_missing_runtime_names_the_extra(fmt, package, checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(CalqError) as err:
        get(fmt).check_runtime()
    assert f"'{package}'" in str(err.value) and "pip install 'calq[edge]'" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CalqError, match="calq\\[edge\\]"):
        get(fmt).session(checkpoints["baseline"])


def test_export_and_verify_stage_and_gates(checkpoints, tmp_path):
    """The stage entry point writes the artifact, export.json and verify.json; the gates read its result."""
    pytest.importorskip("llama_cpp")
    from calq.export.base import deployed_failures, export_and_verify

    model = AutoModelForCausalLM.from_pretrained(checkpoints["w4a16"]).eval()
    stream = torch.randint(3, 256, (130,), generator=torch.Generator().manual_seed(3))
    result = export_and_verify("gguf", checkpoints["w4a16"], tmp_path, lambda ids: model(input_ids=ids).logits,
                               stream, seq_len=64, threads=1)
    assert result["verify"]["top1_agreement"] >= 0.9 and result["verify"]["windows"] == 2
    assert json.loads((tmp_path / "verify.json").read_text()) == result["verify"]
    assert json.loads((tmp_path / "export.json").read_text()) == result["export"]
    results = {"w4a16": {"gguf": result}}
    assert deployed_failures(results, max_deployed_ece_drift=0.5, min_deployed_top1_agreement=0.5) == []
    result["verify"]["top1_agreement"], result["verify"]["drift"]["ece"] = 0.5, -0.03
    failures = deployed_failures(results, max_deployed_ece_drift=0.01, min_deployed_top1_agreement=0.99)
    assert len(failures) == 2 and "w4a16 as gguf: token ECE drifted by 0.0300" in failures[0]



# ---- ONNX accuracy_level ------------------------------------------------------------------------------------------

class _OneLinear(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.model = torch.nn.Module()  # the exporter finds a layer's weight as model.<name>.weight
        self.model.proj = linear

    def forward(self, x):
        return self.model.proj(x)


@pytest.mark.parametrize("level", [0, 4])
def test_onnx_accuracy_level_goes_into_matmulnbits(level):
    """One int4 layer (K 128, group 32) as MatMulNBits: level 0 computes calq's dequantized weight in float32 (float
    tolerance); level 4 lets ONNX Runtime quantize the activations to int8 per block, which moves the product by
    about one int8 step of each block's absmax (bound: 2% of the largest output), and the export info says so."""
    ort = pytest.importorskip("onnxruntime")
    from calq.export import onnx as onnx_export

    generator = torch.Generator().manual_seed(0)
    layer = variants.GroupLayer(q=torch.randint(0, 16, (48, 128), generator=generator, dtype=torch.uint8),
                                scale=torch.rand(48, 4, generator=generator) / 10 + 0.01,
                                zero=torch.randint(0, 16, (48, 4), generator=generator, dtype=torch.uint8),
                                group_size=32, symmetric=False)
    linear = torch.nn.Linear(128, 48, bias=False)
    linear.weight.data = layer.dequantize()
    variant = variants.Variant(linear, {"proj": layer}, None)  # the layers are what the graph edit reads
    x = torch.randn(2, 5, 128, generator=generator)
    proto, blocks = onnx_export.OnnxExporter()._quantized_graph(
        _OneLinear(linear), (x,), variant, level, "float32", input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: "batch", 1: "sequence"},))
    node, = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == level
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])
    want = linear(x).detach()
    if level == 0:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert relative(got, want) < 0.02
    change = onnx_export._changes(variant, blocks, None, level)[0]
    assert f"accuracy_level {level}" in change and ("int8" in change) == (level == 4)


def test_onnx_float16_scales_halve_the_scale_bytes(checkpoints, tmp_path):
    """`scale_dtype: float16`: every MatMulNBits reads its scales through a Cast from a float16 initializer holding
    calq's scales rounded to float16 (nothing else moves), the weights shrink by those bytes, decode.onnx still reads
    model.onnx.data's weights, and the runtime's logits are the variant's up to that rounding (measured: 3e-4 of the
    largest logit on this model; bound 1%), with the export's changes saying so."""
    import onnx
    from onnx import numpy_helper

    def weights(folder):
        graph = onnx.load(str(folder / "model.onnx")).graph
        return graph, {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    info = get("onnx").export(checkpoints["w4a16"], tmp_path / "float16", None, scale_dtype="float16")
    get("onnx").export(checkpoints["w4a16"], tmp_path / "float32", None)
    graph, inits = weights(tmp_path / "float16")
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    layer = variants.read(checkpoints["w4a16"]).layers["model.layers.0.mlp.down_proj"]
    node = next(n for n in graph.node if n.op_type == "MatMulNBits" and "layers.0.mlp.down_proj" in n.input[1])
    half = inits[casts[node.input[2]]]
    assert half.dtype == np.float16 and np.array_equal(half, layer.scale.numpy().astype(np.float16))
    scale_bytes = sum(inits[casts[n.input[2]]].nbytes for n in graph.node if n.op_type == "MatMulNBits")
    assert sum(a.nbytes for a in weights(tmp_path / "float32")[1].values()) - sum(a.nbytes for a in inits.values()) \
        == scale_bytes
    assert info["scale_dtype"] == "float16" and any("float16" in change for change in info["changes"])
    assert not (tmp_path / "float16" / "decode.onnx.data").exists()  # every stored weight is model.onnx.data's
    raw = get("onnx").session(tmp_path / "float16").run(IDS)[1]
    want = pytorch_logits(checkpoints["w4a16"])[0]
    assert 0 < relative(raw, want) < 0.01


@pytest.mark.parametrize("level,ok", [(4, True), (0, True), (5, False), ("int8", False)])
def test_recipe_onnx_accuracy_level(level, ok, tiny_recipe):
    from calq.recipe import parse_recipe

    tiny_recipe["export"] = {"formats": ["onnx"], "onnx_accuracy_level": level}
    if ok:
        assert parse_recipe(tiny_recipe).export.onnx_accuracy_level == level
    else:
        with pytest.raises(CalqError, match=r"export\.onnx_accuracy_level"):
            parse_recipe(tiny_recipe)
    with pytest.raises(CalqError, match="accuracy_level 7 is not one of 0, 1, 2, 3, 4"):
        get("onnx").export(tiny_recipe["model"]["id"], "unused", accuracy_level=7)


@pytest.mark.parametrize("dtype,ok", [("float16", True), ("float32", True), ("bfloat16", False)])
def test_recipe_onnx_scale_dtype(dtype, ok, tiny_recipe):
    """The recipe's `export.onnx_scale_dtype` reaches the exporter's `scale_dtype`; anything else is refused."""
    from calq.recipe import parse_recipe

    tiny_recipe["export"] = {"formats": ["onnx"], "onnx_scale_dtype": dtype}
    if ok:
        assert get("onnx").options(parse_recipe(tiny_recipe))["scale_dtype"] == dtype
    else:
        with pytest.raises(CalqError, match=r"export\.onnx_scale_dtype"):
            parse_recipe(tiny_recipe)
        with pytest.raises(CalqError, match="scale_dtype 'bfloat16' is not one of float32, float16"):
            get("onnx").export(tiny_recipe["model"]["id"], "unused", scale_dtype=dtype)
