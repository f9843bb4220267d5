"""Quantization methods on the tiny model: every method round-trips through a compressed-tensors checkpoint,
scheme/method mismatches and bad settings fail before long work, the AWQ CPU workaround is still needed,
and AutoAWQ is optional."""

import json
import re
import sys
from contextlib import nullcontext
from typing import Literal
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from calq import models
from calq.calib import ranges
from calq.errors import CalqError
from calq.quant import autoawq, llmc, methods, smoothquant
from calq.quant.base import MethodConfig, MethodUnavailable
from calq.recipe import parse_recipe


def VariantSpec(**spec):  # noqa: N802 (reads like the config it builds)
    return methods.config(spec)


@pytest.fixture(scope="module", autouse=True)
def single_thread_quiet_logs(tmp_path_factory):
    # The tiny model's matmuls are far too small for two threads on a shared machine: they only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llmc.quiet_logs(str(tmp_path_factory.mktemp("logs") / "llmcompressor.log"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samples():
    return torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_awq_model(tiny_model, tmp_path_factory):
    """The tiny Llama with the output widths AutoAWQ's clip search accepts (multiples of 64)."""
    folder = tmp_path_factory.mktemp("tiny-awq")
    config = LlamaConfig.from_pretrained(tiny_model)
    config.intermediate_size, config.num_key_value_heads = 128, 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def logits(model, ids=torch.arange(3, 43).reshape(2, 20)):
    with torch.no_grad():
        return model(input_ids=ids).logits


VARIANTS = {
    "minmax-w8a8": dict(method="minmax", scheme="w8a8"),
    "minmax-w4a16": dict(method="minmax", scheme="w4a16", group_size=32),
    "smoothquant-w8a8": dict(method="smoothquant", scheme="w8a8"),
    "smoothquant-w8a8-dynamic": dict(method="smoothquant", scheme="w8a8", dynamic_activations=True,
                                     smoothing_strength=0.5),
    "awq-w4a16": dict(method="awq", scheme="w4a16", group_size=32, max_samples=4, max_seq_len=16),
    "awq-w4a16-sym": dict(method="awq", scheme="w4a16", group_size=32, symmetric=True),
    "gptq-w4a16": dict(method="gptq", scheme="w4a16", group_size=32, max_samples=4, max_seq_len=16),
    "gptq-w8a8-natural-order": dict(method="gptq", scheme="w8a8", actorder=None, dampening_frac=0.05),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_method_checkpoint_reloads_with_plain_transformers(name, tiny_model, samples, tmp_path):
    variant = VariantSpec(**VARIANTS[name])
    model = load(tiny_model)
    before = logits(model)
    variant.apply(model, samples)
    quantized = logits(model)
    assert not torch.allclose(quantized, before)  # it did quantize

    model.save_pretrained(tmp_path, save_compressed=True)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == ("pack-quantized" if variant.scheme == "w4a16" else "int-quantized")
    torch.testing.assert_close(logits(load(tmp_path)), quantized, rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["built from a config", "a folder without config.json (as a GGUF's)"])
def test_a_model_without_config_on_disk_quantizes(where, tiny_model, samples, tmp_path):
    """llm-compressor's oneshot re-reads config.json from config.name_or_path; a model from a GGUF file or from a
    config has none there. calq.quantize lends it the in-memory config and puts the name back."""
    import calq

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model)).eval()
    model.config.name_or_path = "" if where.startswith("built") else str(tmp_path)
    before = model.config.name_or_path
    calq.quantize(model, {"method": "minmax", "scheme": "w4a16", "group_size": 32}, samples)
    assert model.config.name_or_path == before
    assert hasattr(model.model.layers[0].self_attn.q_proj, "weight_scale")


def test_the_layers_checked_at_plan_time_are_the_layers_quantized(tiny_model, samples):
    variant = VariantSpec(method="minmax", scheme="w8a8", ignore=["lm_head", "q_proj", r"re:model\.layers\.1\."])
    planned = variant.quantized_layers(models.linear_layers(LlamaConfig.from_pretrained(tiny_model)))
    model = load(tiny_model)
    variant.apply(model, samples)
    quantized = {name for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert set(planned) == quantized
    assert "model.layers.0.self_attn.q_proj" in quantized and len(quantized) == 7  # 'q_proj' is no suffix rule


def test_autoawq_checkpoint_holds_autoawq_int4_values(tiny_awq_model, samples, tmp_path):
    pytest.importorskip("awq")
    from awq.quantize.quantizer import AwqQuantizer
    from compressed_tensors.quantization import fake_quantize

    variant = VariantSpec(method="autoawq", scheme="w4a16", group_size=32)
    model = load(tiny_awq_model)
    before = logits(model)
    variant.apply(model, samples)
    quantized = logits(model)
    assert not torch.allclose(quantized, before)

    # the weights compressed-tensors dequantizes are the ones AutoAWQ's own quantizer produces
    layer = model.model.layers[0].mlp.down_proj
    autoawq_rounding = type("Q", (), {"group_size": 32, "zero_point": True, "w_bit": 4})()
    expected = AwqQuantizer.pseudo_quantize_tensor(autoawq_rounding, layer.weight.data)[0]
    got = fake_quantize(layer.weight, layer.weight_scale, layer.weight_zero_point, layer.quantization_scheme.weights)
    torch.testing.assert_close(got, expected)

    model.save_pretrained(tmp_path, save_compressed=True)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    torch.testing.assert_close(logits(load(tmp_path)), quantized, rtol=0, atol=1e-5)


def test_autoawq_cpu_workaround_is_needed_and_works(tiny_awq_model, samples):
    """AutoAWQ's scale search alone (no clipping, no rounding) must leave the function unchanged: the scales are
    folded into the norms and the preceding layers. On a CPU it does not without calq's workaround; this fails the
    day AutoAWQ's snapshot copies by itself (then the workaround can go)."""
    pytest.importorskip("awq")
    from awq.utils.utils import get_best_device

    if get_best_device() != "cpu":
        pytest.skip("the corruption happens only when AutoAWQ runs on the CPU")
    variant = VariantSpec(method="autoawq", scheme="w4a16", group_size=32)

    def rel_change() -> float:
        model = load(tiny_awq_model)
        before = logits(model)
        autoawq.scale_and_clip(model, samples, variant, clip=False)
        return ((logits(model) - before).norm() / before.norm()).item()

    assert rel_change() < 1e-4
    with mock.patch.object(autoawq, "_snapshots_that_copy", nullcontext):
        assert rel_change() > 1e-2


def test_autoawq_refuses_widths_its_clip_search_cannot_split(tiny_model):
    pytest.importorskip("awq")
    variant = VariantSpec(method="autoawq", scheme="w4a16", group_size=32)
    with pytest.raises(CalqError, match="multiples of 64") as err:
        variant.check_model(LlamaConfig.from_pretrained(tiny_model))  # intermediate size 160
    assert err.value.where == "method" and "mlp.up_proj (160)" in err.value.what


def test_autoawq_missing_raises_method_unavailable(monkeypatch, tiny_model):
    # makes every import of autoawq fail, whether or not it is installed and whether or not earlier tests imported it
    for name in {"awq", "awq.models", "awq.models.auto", *(m for m in sys.modules if m.startswith("awq."))}:
        monkeypatch.setitem(sys.modules, name, None)
    variant = VariantSpec(method="autoawq", scheme="w4a16", group_size=32)
    with pytest.raises(MethodUnavailable, match="autoawq") as err:
        variant.check_model(LlamaConfig.from_pretrained(tiny_model))
    assert isinstance(err.value, CalqError) and "calq[autoawq]" in err.value.fix
    with pytest.raises(MethodUnavailable):
        variant.quantize(load(tiny_model), torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.skipif(torch.accelerator.is_available(), reason="pinning works where there is an accelerator")
def test_awq_without_workaround_still_fails_on_cpu(tiny_model, samples):
    """If this fails, llm-compressor no longer pins memory without an accelerator: remove
    calq.quant.awq.no_pinning_without_accelerator and this test."""
    variant = VariantSpec(method="awq", scheme="w4a16", group_size=32)
    with pytest.raises(RuntimeError, match="accelerator|NVIDIA"):
        llmc.run_oneshot(load(tiny_model), variant.modifiers(), samples)


def test_awq_workaround_is_scoped(tiny_model, samples):
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    variant = VariantSpec(method="awq", scheme="w4a16", group_size=32)
    variant.quantize(load(tiny_model), samples)
    assert IntermediatesCache.pin_memory is original


def test_awq_grid_size_reaches_llm_compressor():
    """n_grid is AWQModifier's own: the number of scale ratios its search tries (20 unless set)."""
    assert VariantSpec(method="awq", scheme="w4a16").modifiers()[0].n_grid == 20
    assert VariantSpec(method="awq", scheme="w4a16", n_grid=10).modifiers()[0].n_grid == 10
    with pytest.raises(CalqError, match="greater than or equal to 2") as err:
        VariantSpec(method="awq", scheme="w4a16", n_grid=1)
    assert err.value.where == "n_grid"


def test_awq_refuses_architecture_without_mappings():
    from transformers import GPT2Config

    gpt2 = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CalqError, match="no AWQ mappings for GPT2LMHeadModel") as err:
        VariantSpec(method="awq", scheme="w4a16").check_model(gpt2)
    assert err.value.where == "method" and "minmax" in err.value.fix


@pytest.mark.parametrize("method,scheme,supported", [("awq", "w8a8", "w4a16"), ("autoawq", "w8a8", "w4a16"),
                                                     ("smoothquant", "w4a16", "w8a8")])
def test_scheme_the_method_cannot_do_fails_when_the_recipe_is_read(method, scheme, supported, tiny_recipe):
    tiny_recipe["variants"].append({"method": method, "scheme": scheme,
                                    "group_size": 32 if scheme == "w4a16" else None})
    with pytest.raises(CalqError) as err:
        parse_recipe(tiny_recipe)
    assert err.value.what.startswith("'variants[2].scheme': ")
    assert f"method '{method}' cannot do scheme '{scheme}' (it supports: {supported})" in err.value.what


@pytest.mark.parametrize("spec,where,text", [
    (dict(method="hqq", scheme="w4a16"), "method", "unknown method 'hqq'"),
    (dict(method="minmax", scheme="w3a16"), "scheme", "unknown scheme 'w3a16'"),
])
def test_unknown_method_or_scheme(spec, where, text):
    with pytest.raises(CalqError, match=text) as err:
        methods.config(spec)
    assert err.value.where == where


@pytest.mark.parametrize("spec,text", [
    (dict(method="awq", scheme="w4a16", smoothing_strength=0.5),
     "does not apply to method awq (it is a setting of: smoothquant)"),
    (dict(method="minmax", scheme="w4a16", dynamic_activations=True), "dynamic_activations applies to w8a8 only"),
    (dict(method="minmax", scheme="w8a8", group_size=64), "group_size applies to w4a16 only"),
    (dict(method="minmax", scheme="w8a8", scale_dtype="bfloat16"), "scale_dtype applies to w4a16 only"),
])
def test_a_setting_that_does_not_apply_is_refused(spec, text, tiny_recipe):
    tiny_recipe["variants"] = [spec]
    with pytest.raises(CalqError, match=re.escape(text)):
        parse_recipe(tiny_recipe)


@pytest.mark.parametrize("strength", [0, 1, 1.5, -0.2])
def test_smoothing_strength_out_of_range(strength, tiny_recipe):
    tiny_recipe["variants"] = [{"method": "smoothquant", "scheme": "w8a8", "smoothing_strength": strength}]
    with pytest.raises(CalqError, match=r"variants\[0\]\.smoothing_strength.*strictly between 0 and 1"):
        parse_recipe(tiny_recipe)


def test_needs_calibration_data_knows_the_method():
    assert VariantSpec(method="minmax", scheme="w8a8").needs_data()
    assert not VariantSpec(method="minmax", scheme="w8a8", dynamic_activations=True).needs_data()
    assert not VariantSpec(method="minmax", scheme="w4a16").needs_data()
    assert VariantSpec(method="smoothquant", scheme="w8a8", dynamic_activations=True).needs_data()
    assert VariantSpec(method="awq", scheme="w4a16").needs_data()
    assert VariantSpec(method="autoawq", scheme="w4a16").needs_data()


def test_methods_get_only_the_samples_the_variant_asks_for(samples):
    seen = []

    class Spy(MethodConfig):
        method: Literal["spy"] = "spy"

        def quantize(self, model, samples):
            seen.append(samples)

    no_model = type("M", (), {"config": None})()
    for limits in (dict(), dict(max_samples=3), dict(max_seq_len=5), dict(max_samples=100, max_seq_len=1000)):
        Spy(scheme="w8a8", **limits).apply(no_model, samples)
    assert [tuple(s.shape) for s in seen] == [(8, 32), (3, 32), (8, 5), (8, 32)]
    assert torch.equal(seen[1], samples[:3])


def test_smoothquant_outlier_reduction(tiny_model, samples):
    import copy

    model = load(tiny_model)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 30.0  # one outlier channel into q/k/v_proj
    base = copy.deepcopy(model)
    variant = VariantSpec(method="smoothquant", scheme="w8a8")
    variant.apply(model, samples)
    # as the pipeline measures it: Linear inputs of the unquantized model vs the smoothed, quantized one
    before = ranges.by_layer(ranges.collect(base, samples))
    rows = {r["layer"]: r
            for r in smoothquant.outlier_reduction(before, ranges.by_layer(ranges.collect(model, samples)))}
    assert rows.keys() == before.keys()
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["spread_before"] > 10 and q["reduction"] > 3
    # not smoothed; moved only by quantization upstream
    assert rows["model.layers.0.self_attn.o_proj"]["reduction"] < q["reduction"] / 2


def test_outlier_reduction_is_a_pure_function():
    before = {"a": {"absmax": torch.tensor([1.0, 1.0, 1.0, 10.0])}, "b": {"absmax": torch.tensor([2.0, 2.0, 4.0])},
              "only_before": {"absmax": torch.tensor([1.0])}}
    after = {"a": {"absmax": torch.tensor([1.0, 1.0, 1.0, 2.0])}, "b": {"absmax": torch.tensor([2.0, 2.0, 4.0])}}
    assert smoothquant.outlier_reduction(before, after) == [
        {"layer": "a", "spread_before": 10.0, "spread_after": 2.0, "reduction": 5.0},
        {"layer": "b", "spread_before": 2.0, "spread_after": 2.0, "reduction": 1.0},
    ]


def test_keys_lists_the_methods():
    from typer.testing import CliRunner

    from calq.cli import app

    result = CliRunner().invoke(app, ["keys"], terminal_width=200)
    assert result.exit_code == 0
    assert "methods: autoawq, awq, gptq, minmax, smoothquant" in result.output


# ---- GPTQ ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("actorder", ["static", None])
def test_gptq_settings_reach_llm_compressor(actorder, tiny_model, samples, tmp_path):
    """actorder and dampening_frac are GPTQModifier's; the checkpoint records the order, keeps its groups contiguous
    (no weight_g_idx), and GPTQ's error feedback gives other integers than round-to-nearest on the same scheme."""
    from safetensors import safe_open

    variant = VariantSpec(method="gptq", scheme="w4a16", group_size=32, actorder=actorder, dampening_frac=0.1)
    modifier = variant.quantization_modifier()
    assert modifier.actorder == actorder and modifier.dampening_frac == 0.1
    model, rtn = load(tiny_model), load(tiny_model)
    variant.apply(model, samples)
    VariantSpec(method="minmax", scheme="w4a16", group_size=32).apply(rtn, None)
    assert not torch.allclose(logits(model), logits(rtn))

    model.save_pretrained(tmp_path, save_compressed=True)
    weights = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["actorder"] == actorder
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("g_idx")]


@pytest.mark.parametrize("method", ["minmax", "awq"])
def test_scale_dtype_rounds_the_scales_before_the_weights(method, tiny_model, samples, tmp_path):
    """`scale_dtype: bfloat16`: every group scale of the saved checkpoint is a bfloat16 value (what XNNPACK stores),
    and the int4 values were rounded with those scales: the reloaded model computes what the quantized one did."""
    from calq.export import variant as variants
    from calq.export.executorch import _bfloat16_change

    spec = VariantSpec(method=method, scheme="w4a16", group_size=32, scale_dtype="bfloat16", max_samples=4)
    assert spec.label == f"{method}-w4a16-g32-bf16scales"
    model = load(tiny_model)
    spec.apply(model, samples)
    quantized = logits(model)
    model.save_pretrained(tmp_path, save_compressed=True)
    variant = variants.read(tmp_path)
    assert len(variant.layers) == 14
    assert all(_bfloat16_change(layer.scale) == 0 for layer in variant.layers.values())
    torch.testing.assert_close(logits(variant.model), quantized, rtol=1e-4, atol=1e-4)

    plain = load(tiny_model)
    VariantSpec(method=method, scheme="w4a16", group_size=32, max_samples=4).apply(plain, samples)
    plain.save_pretrained(tmp_path / "plain", save_compressed=True)
    assert max(_bfloat16_change(layer.scale) for layer in variants.read(tmp_path / "plain").layers.values()) > 0


def test_gptq_w4a16_is_read_by_the_exporters(tiny_model, samples, tmp_path):
    """The checkpoint (actorder static) loads through calq's kernel loader, which both exporters read, and computes
    what transformers' compressed-tensors model computes; ONNX accepts it and llama.cpp runs it as Q4_1. (The ONNX
    graph itself is built from the same Variant as minmax's: tests/test_export.py.)"""
    pytest.importorskip("llama_cpp")
    from calq.export import get
    from calq.export import variant as variants

    model = load(tiny_model)
    VariantSpec(method="gptq", scheme="w4a16", group_size=32).apply(model, samples)
    model.save_pretrained(tmp_path / "ckpt", save_compressed=True)
    want = logits(load(tmp_path / "ckpt"))
    variant = variants.read(tmp_path / "ckpt")
    assert variant.scheme == "w4a16" and len(variant.layers) == 14
    torch.testing.assert_close(logits(variant.model), want, rtol=1e-4, atol=1e-4)

    ids = torch.arange(3, 43).reshape(2, 20)
    get("onnx").check(tmp_path / "ckpt")
    info = get("gguf").export(tmp_path / "ckpt", tmp_path / "gguf")
    assert "Q4_1" in " ".join(info["changes"])
    got = get("gguf").session(tmp_path / "gguf", n_ctx=64).score(ids)
    assert float((got - want).abs().max() / want.abs().max()) < 0.05  # llama.cpp's int8 activations (test_export)


@pytest.mark.parametrize("setting,text", [
    (dict(actorder="group"), "actorder 'group' stores a per-column group index (weight_g_idx)"),
    (dict(actorder="dynamic"), "actorder 'dynamic' stores a per-column group index"),
    (dict(actorder="random"), "actorder"),
    (dict(dampening_frac=0), "dampening_frac must lie strictly between 0 and 1"),
    (dict(dampening_frac=1.5), "dampening_frac must lie strictly between 0 and 1"),
])
def test_gptq_settings_calq_cannot_export_are_refused_when_the_recipe_is_read(setting, text, tiny_recipe):
    tiny_recipe["variants"] = [{"method": "gptq", "scheme": "w4a16", "group_size": 32, **setting}]
    with pytest.raises(CalqError, match=re.escape(text)) as err:
        parse_recipe(tiny_recipe)
    assert err.value.what.startswith(f"'variants[0].{next(iter(setting))}'")


def test_gptq_variant_in_a_run(tiny_recipe, tmp_path):
    """A recipe's GPTQ variant goes through the pipeline: quantized on the run's calibration samples, evaluated on the
    held-out tokens, and reported with its settings."""
    import math

    import calq

    tiny_recipe["variants"] = [{"method": "gptq", "scheme": "w4a16", "group_size": 32, "dampening_frac": 0.05}]
    tiny_recipe["evaluation"]["tokens"]["max_tokens"] = 512
    report = calq.run(tiny_recipe, out=tmp_path / "run")
    row, = [v for v in report.data["variants"] if v["variant"] == "gptq-w4a16-g32"]
    assert row["method"] == "gptq" and math.isfinite(row["ppl"])
    config = json.loads((tmp_path / "run" / "variants" / "gptq-w4a16-g32" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] == "static"
