"""5-bit group weights (`bits: 5`) on a tiny random Llama: one compressed-tensors config group of num_bits 5, reloaded
by transformers as is; read by calq's kernel loader (dequantized: no 5-bit kernel) and export reader as the same
integers; GGUF Q5_0 (symmetric) / Q5_1 blocks that gguf's own dequantization reads back as calq's integers times the
float16 block scales; ONNX MatMulNBits bits 8 (ONNX Runtime's CPU kernel has no 5 bits), exact; bad input refused.

Bounds against the PyTorch variant as in tests/test_mixed_precision.py: ONNX float32 tolerance; llama.cpp (int8
activations, float16 KV cache) 5% of the largest logit and top-1 agreement >= 0.9.
"""

import json

import numpy as np
import pytest
import torch
from tiny import make_tiny_llama, save_quantized
from transformers import AutoModelForCausalLM

from calq.errors import CalqError
from calq.export import get
from calq.export import variant as variants
from calq.quant import budget, methods

IDS = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=[True, False], ids=["symmetric", "asymmetric"])
def five_bit(request, tiny, tmp_path_factory):
    """(folder of the saved 5-bit checkpoint, logits of the in-memory quantized model on IDS, symmetric)."""
    spec = {"method": "minmax", "scheme": "w4a16", "bits": 5, "group_size": 32, "symmetric": request.param}
    return (*save_quantized(AutoModelForCausalLM.from_pretrained(tiny), spec, tmp_path_factory.mktemp("five"), IDS),
            request.param)


def test_checkpoint_reloads_and_readers_hold_the_same_integers(five_bit):
    from calq.kernels import GroupWeightLinear, load_quantized

    folder, in_memory, symmetric = five_bit
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 5
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # compressed-tensors' own decompression
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, in_memory, rtol=0, atol=0)

    kernel_model = load_quantized(folder, "cpu", torch.float32)
    variant = variants.read(folder)
    assert variant.scheme == "w5a16" and len(variant.layers) == 14
    for name, layer in variant.layers.items():
        assert isinstance(layer, variants.GroupLayer) and layer.bits == 5 and layer.symmetric == symmetric
        assert int(layer.q.max()) <= 31 and int(layer.zero.max()) <= 31
        if symmetric:
            assert (layer.zero == 16).all()
        kernel_layer = kernel_model.get_submodule(name)
        assert isinstance(kernel_layer, GroupWeightLinear)
        decompressed = reloaded.get_submodule(name).weight
        torch.testing.assert_close(layer.dequantize(), decompressed, rtol=0, atol=0)
        torch.testing.assert_close(kernel_layer.dequantize(), decompressed, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(kernel_model(input_ids=IDS).logits, in_memory, rtol=1e-5, atol=1e-5)


def test_gguf_q5_blocks_hold_calqs_integers(five_bit, tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from calq.export import gguf as gguf_export

    folder, in_memory, symmetric = five_bit
    kind = "Q5_0" if symmetric else "Q5_1"
    info = get("gguf").export(folder, tmp_path)
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert int(reader.fields["general.file_type"].contents()) == gguf.LlamaFileType[f"MOSTLY_{kind}"]
    tensors = {t.name: t for t in reader.tensors}
    assert sum(t.tensor_type.name == kind for t in tensors.values()) == 14 and info["tensor_types"][kind] == 14
    assert any(change.startswith(f"14 layers as {kind}") for change in info["changes"])
    variant = variants.read(folder)
    for layer in variant.layers.values():
        blocks, written = gguf_export.group_blocks(layer)
        assert written == kind and blocks.shape[1] * 8 / layer.q.shape[1] == (5.5 if symmetric else 6.0)
        back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])
        d = layer.scale.half().float().repeat_interleave(32, 1)  # GGUF's float16 scale, one per block
        if symmetric:
            want = (layer.q.float() - 16) * d
        else:  # y = q * d + m, m = float16(-z * s)
            m = (-layer.zero.float() * layer.scale).half().float().repeat_interleave(32, 1)
            want = layer.q.float() * d + m
        np.testing.assert_array_equal(back, want.numpy())
    got = get("gguf").session(tmp_path, n_ctx=64).score(IDS)
    relative = float((got - in_memory).abs().max() / in_memory.abs().max())
    assert relative < 0.05 and float((got.argmax(-1) == in_memory.argmax(-1)).float().mean()) >= 0.9


def test_onnx_stores_five_bits_in_matmulnbits_8_exactly(five_bit, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    folder, in_memory, symmetric = five_bit
    info = get("onnx").export(folder, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert [next(a.i for a in n.attribute if a.name == "bits") for n in nodes] == [8] * 14
    assert all((len(n.input) == 4) != symmetric for n in nodes)  # zero points only when asymmetric
    assert any("8 bits per weight, not 5" in change for change in info["changes"])
    calibrated, raw = get("onnx").session(tmp_path).run(IDS)
    torch.testing.assert_close(raw, in_memory, rtol=1e-4, atol=1e-4)


def test_budget_counts_five_bit_groups_as_ggufs_blocks():
    sizes = {(True, 4): 4.5, (False, 4): 5.0, (True, 5): 5.5, (False, 5): 6.0}  # Q4_0, Q4_1, Q5_0, Q5_1
    for (symmetric, bits), per_weight in sizes.items():
        assert budget.linear_bytes(64, 128, "w4a16", 32, symmetric, bits) * 8 / (64 * 128) == per_weight
    variant = methods.config({"method": "gptq", "scheme": "w4a16", "bits": 5, "group_size": 32, "symmetric": True})
    assert budget.variant_bytes(variant, {"a": (64, 128)}) == 64 * 128 * 5.5 / 8
    assert variant.label == "gptq-w5a16-g32"


@pytest.mark.parametrize("spec,message", [
    ({"scheme": "w8a8", "bits": 5}, "bits applies to w4a16 only"),
    ({"bits": 6}, "bits"),
    ({"bits": 8}, "bits"),
    ({"method": "autoawq", "bits": 5}, "autoawq quantizes with AutoAWQ's 4-bit search"),
])
def test_recipe_refuses(spec, message):
    with pytest.raises(CalqError, match=message):
        methods.config({"method": "minmax", "scheme": "w4a16", **spec})


def test_executorch_refuses_five_bits(five_bit):
    folder, _, _ = five_bit
    with pytest.raises(CalqError, match="not 5-bit weights"):
        get("executorch").check(folder)


# ---- three levels: 5-bit groups with some Linears at 4 bits (int4_layers) and some at int8 (int8_layers) -------------

THREE = {"method": "minmax", "scheme": "w4a16", "bits": 5, "group_size": 32, "symmetric": True,
         "int4_layers": ["re:.*q_proj$"], "int8_layers": ["re:.*v_proj$"]}


@pytest.fixture(scope="module")
def three_levels(tiny, tmp_path_factory):
    """(folder of the saved checkpoint, logits of the in-memory quantized model on IDS)."""
    return save_quantized(AutoModelForCausalLM.from_pretrained(tiny), THREE, tmp_path_factory.mktemp("three"), IDS)


def test_three_levels_one_checkpoint_every_reader(three_levels):
    from calq.kernels import load_quantized

    folder, in_memory = three_levels
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 5, 8]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, in_memory, rtol=0, atol=0)
        torch.testing.assert_close(load_quantized(folder, "cpu", torch.float32)(input_ids=IDS).logits, in_memory,
                                   rtol=1e-5, atol=1e-5)
    layers = variants.read(folder).layers
    bits = {name: layer.bits if isinstance(layer, variants.GroupLayer) else type(layer).__name__
            for name, layer in layers.items()}
    assert {bits[n] for n in bits if n.endswith("q_proj")} == {4}
    assert {bits[n] for n in bits if n.endswith("v_proj")} == {"Int8WeightLayer"}
    assert {bits[n] for n in bits if not n.endswith(("q_proj", "v_proj"))} == {5}
    for name, layer in layers.items():
        torch.testing.assert_close(layer.dequantize(), reloaded.get_submodule(name).weight, rtol=0, atol=0)


def test_three_levels_export_a_type_per_tensor(three_levels, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    import onnx

    folder, in_memory = three_levels
    info = get("gguf").export(folder, tmp_path / "gguf")
    assert {k: info["tensor_types"][k] for k in ("Q4_0", "Q5_0", "Q8_0")} == {"Q4_0": 2, "Q5_0": 10, "Q8_0": 2}
    got = get("gguf").session(tmp_path / "gguf", n_ctx=64).score(IDS)
    assert float((got - in_memory).abs().max() / in_memory.abs().max()) < 0.05
    assert float((got.argmax(-1) == in_memory.argmax(-1)).float().mean()) >= 0.9
    get("onnx").export(folder, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits")
    assert bits == [4] * 2 + [8] * 12  # 5-bit groups and int8 layers both as bits 8
    _, raw = get("onnx").session(tmp_path / "onnx").run(IDS)
    torch.testing.assert_close(raw, in_memory, rtol=1e-4, atol=1e-4)


def test_budget_with_demote_spends_four_bit_savings_on_int8():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    kld, kld_low = {"a": 0.1, "b": 0.5, "c": 0.01}, {"a": 0.3, "b": 0.9, "c": 0.011}
    spec = {**THREE, "int4_layers": [], "int8_layers": []}
    plain = methods.config(spec)
    five = budget.variant_bytes(plain, shapes)  # every Linear at 5 bits
    variant = methods.config({**spec, "budget": {"size_mb": five / 2**20, "demote": True}})
    chosen = budget.select(variant, shapes, 0, kld, kld_low)
    # a and c at 4 bits pay for b's int8: summed KLD 0.3 + 0.011 against 0.611 with all three at 5 bits (a greedy
    # step by KLD per byte takes b and a to 5 bits first and is left without room for b's int8)
    assert chosen == {"promoted": ["b"], "demoted": ["a", "c"], "bytes": chosen["bytes"], "limit_bytes": five}
    assert chosen["bytes"] == budget.variant_bytes(variant, shapes, ["b"], ["a", "c"]) <= five
    held = budget.apply_choice(variant, chosen)
    assert held.label == variant.label and held.int8_layers == ("b",) and held.int4_layers == ("a", "c")
    without = budget.select(methods.config({**spec, "budget": {"size_mb": five / 2**20}}), shapes, 0, kld)
    assert without == {"promoted": [], "demoted": [], "bytes": five, "limit_bytes": five}  # no room without demote
    floor = budget.variant_bytes(variant, shapes, demoted=list(shapes))
    with pytest.raises(CalqError, match="below the size with every layer quantized"):
        budget.check(methods.config({**spec, "budget": {"size_mb": (floor - 1) / 2**20, "demote": True}}), shapes, 0)


@pytest.mark.parametrize("spec,message", [
    ({"bits": None}, "int4_layers holds layers of a 5-bit variant"),
    ({"int4_layers": [], "bits": 4, "budget": {"bits_per_weight": 6, "demote": True}}, "budget.demote"),
    ({"method": "awq"}, "awq cannot take int4_layers"),
])
def test_three_levels_refused(spec, message):
    with pytest.raises(CalqError, match=message):
        methods.config({**THREE, "int8_layers": [], **spec})


def test_a_layer_in_two_levels_is_refused_at_plan_time(tiny_recipe, write_recipe):
    from typer.testing import CliRunner

    from calq.cli import app

    tiny_recipe["variants"] = [{**THREE, "int4_layers": ["re:.*proj$"]}]
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run"])
    assert result.exit_code == 2 and "in both int8_layers and int4_layers" in result.output
