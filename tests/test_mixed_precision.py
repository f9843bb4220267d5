"""Mixed int4/int8 checkpoints (`int8_layers`) and the int8 / int4 embedding / head (`embedding: int8 | int4`) on a
tiny random Llama with a tied output head (as SmolLM2): one compressed-tensors checkpoint with two config groups,
reloaded by transformers, read by calq's kernel loader and export reader as two layer types, exported to GGUF
(per-tensor Q4_0 / Q8_0 types, the embedding exact) and ONNX (MatMulNBits bits 4 and 8, the embedding held as int8 or
int4); bad input refused before any work.

Bounds against the PyTorch variant (transformers' decompressed model), as in tests/test_export.py: ONNX holds calq's
exact integers with float32 activations: float32 tolerance; llama.cpp quantizes activations to int8 blocks and keeps
a float16 KV cache: 5% of the largest logit and top-1 agreement >= 0.9.
"""

import json

import pytest
import torch
from tiny import make_tiny_llama, save_quantized
from transformers import AutoConfig, AutoModelForCausalLM

from calq.errors import CalqError
from calq.export import get
from calq.export import variant as variants
from calq.quant import embedding, methods

IDS = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
INT8 = ("re:.*v_proj", "model.layers.1.mlp.down_proj")
SPEC = {"method": "minmax", "scheme": "w4a16", "group_size": 32, "symmetric": True, "int8_layers": list(INT8),
        "embedding": "int8"}


def tiny_tied(folder):
    make_tiny_llama(folder)
    config = AutoConfig.from_pretrained(folder)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return tiny_tied(tmp_path_factory.mktemp("tied"))


@pytest.fixture(scope="module")
def mixed(tied, tmp_path_factory):
    """(folder of the saved mixed checkpoint, logits of the in-memory quantized model on IDS)."""
    model = AutoModelForCausalLM.from_pretrained(tied)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return save_quantized(model, SPEC, tmp_path_factory.mktemp("mixed"), IDS)


@pytest.fixture(scope="module")
def int4_embedding(tied, tmp_path_factory):
    """A 4-bit variant with the tied embedding / head as int4 (Q4_0): (folder, in-memory logits on IDS)."""
    spec = {"method": "minmax", "scheme": "w4a16", "group_size": 32, "symmetric": True, "embedding": "int4"}
    return save_quantized(AutoModelForCausalLM.from_pretrained(tied), spec, tmp_path_factory.mktemp("int4emb"), IDS)


def pytorch_logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=IDS).logits


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def agreement(a, b):
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def test_one_checkpoint_two_config_groups(mixed):
    folder, in_memory = mixed
    config = json.loads((folder / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert groups["group_0"]["weights"]["num_bits"] == 4 and groups["group_0"]["targets"] == ["Linear"]
    assert groups["group_1"]["weights"]["num_bits"] == 8 and groups["group_1"]["targets"] == list(INT8)
    assert groups["group_1"]["weights"]["strategy"] == "channel" and groups["group_1"].get("input_activations") is None
    torch.testing.assert_close(pytorch_logits(folder), in_memory, rtol=0, atol=0)  # transformers reloads it as is


def test_readers_see_both_layer_types_and_the_int8_embedding(mixed):
    folder, in_memory = mixed
    variant = variants.read(folder)
    int8 = {name for name, layer in variant.layers.items() if isinstance(layer, variants.Int8WeightLayer)}
    assert int8 == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
                    "model.layers.1.mlp.down_proj"}
    assert all(isinstance(layer, variants.GroupLayer) and layer.symmetric
               for name, layer in variant.layers.items() if name not in int8)
    assert len(variant.layers) == 14 and variant.scheme == "mixed"
    matrix = variant.matrices["model.embed_tokens.weight"]
    weight = variant.model.get_input_embeddings().weight
    assert matrix.q.dtype == torch.int8 and torch.equal(embedding.dequantize(matrix.q, matrix.d), weight)
    assert list(variant.matrices) == ["model.embed_tokens.weight"]  # tied: the head is this matrix
    assert variant.model.get_output_embeddings().weight is weight
    with torch.no_grad():  # the float model the exporters trace computes what the PyTorch variant computes
        torch.testing.assert_close(variant.model(input_ids=IDS).logits, in_memory, rtol=1e-5, atol=1e-5)


def test_a_float_embedding_is_not_taken_for_int8(tied):
    assert variants.read(tied).matrices == {}


def test_kernel_loader_runs_the_int8_layers(mixed):
    from calq.kernels import W4A16Linear, W8A16Linear, load_quantized

    folder, in_memory = mixed
    model = load_quantized(folder, "cpu", torch.float32)
    assert isinstance(model.model.layers[1].mlp.down_proj, W8A16Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, W4A16Linear)
    reference = variants.read(folder).layers["model.layers.1.mlp.down_proj"]
    x = torch.randn(3, reference.q.shape[1])
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj(x), x @ reference.dequantize().T)


def test_gguf_per_tensor_types_and_exact_embedding(mixed, tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    folder, in_memory = mixed
    info = get("gguf").export(folder, tmp_path)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items() if not name.endswith("norm.weight")}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    assert {name for name, kind in types.items() if kind == "Q8_0"} == {
        "token_embd.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    assert {kind for name, kind in types.items()} == {"Q8_0", "Q4_0"}
    assert info["embedding_exact"] == {"token_embd.weight": True}
    embd = tensors["token_embd.weight"]
    back = torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type).copy())
    assert torch.equal(back, variants.read(folder).model.get_input_embeddings().weight)
    got = get("gguf").session(tmp_path, n_ctx=64).score(IDS)
    assert relative(got, in_memory) < 0.05 and agreement(got, in_memory) >= 0.9


def test_onnx_matmulnbits_8_and_int8_embedding(mixed, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    folder, in_memory = mixed
    info = get("onnx").export(folder, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits")
    assert bits == [4] * 11 + [8] * 3
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert not any(256 in i.dims for i in floats)  # no float32 copy of the embedding / head
    assert any("Q8_0" in change for change in info["changes"])
    calibrated, raw = get("onnx").session(tmp_path).run(IDS)
    torch.testing.assert_close(raw, in_memory, rtol=1e-4, atol=1e-4)


def test_untied_head_is_held_at_int8_too(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "untied"))
    assert embedding.quantize_embeddings(model) == ["lm_head.weight", "model.embed_tokens.weight"]
    for weight in (model.lm_head.weight, model.model.embed_tokens.weight):
        assert torch.equal(embedding.dequantize(*embedding.blocks(weight)), weight)


@pytest.mark.parametrize("spec,message", [
    ({"scheme": "w8a8", "int8_layers": ["re:.*v_proj"]}, "int8_layers applies to w4a16 only"),
    ({"method": "autoawq", "int8_layers": ["re:.*v_proj"]}, "autoawq cannot take int8_layers"),
    ({"method": "awq", "int8_layers": ["re:.*v_proj"]}, "awq cannot take int8_layers"),
    ({"method": "awq", "budget": {"bits_per_weight": 5}}, "awq cannot take budget"),
    ({"embedding": "int2"}, "embedding"),
])
def test_recipe_refuses(spec, message):
    with pytest.raises(CalqError, match=message):
        methods.config({"method": "minmax", "scheme": "w4a16", **spec})


@pytest.mark.parametrize("variant,message", [
    ({"int8_layers": ["re:.*vproj"]}, "int8_layers entry 're:.*vproj' matches none of the 14 quantized layers"),
    ({"int8_layers": ["v_proj"]}, "matches none"),  # a bare name matches nothing, as in `ignore`
    ({"int8_layers": ["lm_head"], "embedding": "int8"}, "matches none"),  # ignored: not quantized at all
])
def test_plan_refuses_before_any_work(variant, message, tiny_recipe, write_recipe):
    from typer.testing import CliRunner

    from calq.cli import app

    tiny_recipe["variants"] = [{"method": "minmax", "scheme": "w4a16", "group_size": 32, **variant}]
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert result.exit_code == 2 and message in result.output


def test_bfloat16_embedding_refused_before_the_method_runs(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny"), dtype=torch.bfloat16)
    with pytest.raises(CalqError, match="float32"):
        methods.config(SPEC).apply(model, None)


@pytest.mark.parametrize("bits", [8, 4])
def test_grids_are_exact_and_told_apart(bits):
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits))
    q, d = embedding.blocks(weight, bits)
    assert int(q.min()) >= (-127 if bits == 8 else -8) and int(q.max()) <= (127 if bits == 8 else 7)
    on = embedding.dequantize(q, d)
    assert embedding.on_grid(weight) is None
    found = embedding.on_grid(on)
    assert found is not None and found[2] == bits and torch.equal(embedding.dequantize(*found[:2]), on)
    rms = float(((on - weight) ** 2).mean().sqrt() / weight.std())
    assert rms < (0.01 if bits == 8 else 0.15)  # each block's range in 255 or 16 steps


def test_int4_embedding_is_read_exported_to_q4_0_and_onnx_exactly(int4_embedding, tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    import onnx

    folder, in_memory = int4_embedding
    variant = variants.read(folder)
    assert methods.config({"method": "minmax", "scheme": "w4a16", "embedding": "int4"}).label.endswith("-int4emb")
    matrix = variant.matrices["model.embed_tokens.weight"]
    assert matrix.bits == 4 and matrix.gguf_type == "Q4_0" and list(variant.matrices) == ["model.embed_tokens.weight"]
    weight = variant.model.get_input_embeddings().weight
    assert torch.equal(embedding.dequantize(matrix.q, matrix.d), weight)

    info = get("gguf").export(folder, tmp_path / "gguf")
    tensors = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors
    embd = next(t for t in tensors if t.name == "token_embd.weight")
    assert embd.tensor_type.name == "Q4_0" and info["embedding_exact"] == {"token_embd.weight": True}
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type).copy()), weight)
    got = get("gguf").session(tmp_path / "gguf", n_ctx=64).score(IDS)
    assert relative(got, in_memory) < 0.05 and agreement(got, in_memory) >= 0.9

    info = get("onnx").export(folder, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    packed = [i for i in graph.initializer if i.name.endswith(".q4")]
    assert len(packed) == 1 and packed[0].data_type == onnx.TensorProto.UINT8 and list(packed[0].dims) == [256, 2, 16]
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert not any(256 in i.dims for i in floats)  # no float32 copy of the embedding / head
    assert any("Q4_0" in change for change in info["changes"])
    calibrated, raw = get("onnx").session(tmp_path / "onnx").run(IDS)
    torch.testing.assert_close(raw, in_memory, rtol=1e-4, atol=1e-4)


def test_the_budget_counts_an_int4_embedding_in_q4_0_blocks(tied):
    from calq.quant import budget

    model = AutoModelForCausalLM.from_pretrained(tied)
    spec = {"method": "minmax", "scheme": "w4a16"}
    sizes = {kind: budget.footprint(model, methods.config({**spec, "embedding": kind}))[1]
             for kind in ("float", "int8", "int4")}
    vocab, hidden = model.get_input_embeddings().weight.shape
    norms = sizes["float"] - vocab * hidden * 2
    assert sizes["int8"] - norms == vocab * hidden * 34 // 32 and sizes["int4"] - norms == vocab * hidden * 18 // 32
