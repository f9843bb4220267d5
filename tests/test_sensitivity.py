"""Per-layer sensitivity (calq.quant.sensitivity, the sensitivity stage), mixed precision under a budget
(calq.quant.budget) and the report's size-quality picture, on the tiny trained model."""

import json

import pytest
import torch

import calq
from calq import models, pipeline
from calq.errors import CalqError
from calq.quant import budget, embedding, sensitivity
from calq.quant.base import MethodConfig
from calq.quant.minmax import MinMax
from calq.recipe import parse_recipe
from calq.report import plots
from calq.stage_kinds import sensitivity as sensitivity_stage

W4 = {"method": "minmax", "scheme": "w4a16", "group_size": 32}


def test_bytes_per_precision_follow_the_storage():
    # int4 two per byte + a float16 scale and zero point per group of 32; int8 + a scale per row; float16
    assert budget.linear_bytes(64, 128, "w4a16", 32) == 64 * 128 // 2 + 64 * 4 * 2 * 2
    assert budget.linear_bytes(64, 128, "w4a16", 32, symmetric=True) == 64 * 128 // 2 + 64 * 4 * 2
    assert budget.linear_bytes(64, 128, "w8a8") == 64 * 128 + 64 * 2
    assert budget.linear_bytes(64, 128, "w8a16") == 64 * 128 * 34 // 32  # GGUF's Q8_0 blocks
    assert budget.linear_bytes(64, 128, "float") == 64 * 128 * 2


def test_budget_promotes_the_layers_that_remove_most_kld_within_the_limit():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64), "d": (64, 64)}
    kld = {"a": 0.1, "b": 0.5, "c": 0.55, "d": 0.0}  # per extra byte: b 0.5, c 0.275 (twice the bytes), a 0.1
    extra = budget.linear_bytes(64, 64, "w8a16") - budget.linear_bytes(64, 64, "w4a16", 32)  # promoted to int8
    floor = budget.variant_bytes(MinMax(**W4), shapes)
    expected = [[], ["b"], ["b", "a"], ["b", "c"], ["b", "c", "a"], ["b", "c", "a"]]
    for room, promoted in enumerate(expected):  # room for that many extra bytes of a 64x64 layer
        variant = MinMax(**W4, budget={"size_mb": (floor + room * extra) / 2**20})
        chosen = budget.select(variant, shapes, 0, kld)
        assert chosen["promoted"] == promoted
        assert chosen["bytes"] <= chosen["limit_bytes"]
        assert "d" not in chosen["promoted"]  # promoting what moves nothing buys nothing


def test_budget_chooses_the_embedding_level_as_one_more_item():
    """`embedding: auto`: the embedding / head is an item at int4, int8 or float16 beside the Linears, bought where it
    removes the most KLD within the bytes."""
    shapes, kld = {"a": (64, 64), "b": (64, 64)}, {"a": 0.1, "b": 0.5}
    weights, embedding_kld = 64 * 32, {"int4": 0.9, "int8": 0.2}  # int8 removes 0.7 for 1,024 bytes, float 0.2 more
    promote = budget.linear_bytes(64, 64, "w8a16") - budget.linear_bytes(64, 64, "w4a16", 32)  # 1,792 bytes
    to_int8 = budget.embedding_bytes(weights, "int8") - budget.embedding_bytes(weights, "int4")
    to_float = budget.embedding_bytes(weights, "float") - budget.embedding_bytes(weights, "int4")
    assert (to_int8, to_float) == (1024, 2944)
    other = budget.embedding_bytes(weights, "int4")  # footprint counts the embedding at its cheapest level
    floor = budget.variant_bytes(MinMax(**W4), shapes) + other
    expected = {0: ("int4", []), to_int8: ("int8", []), promote: ("int8", []), to_int8 + promote: ("int8", ["b"]),
                to_float: ("int8", ["b"]), to_int8 + 2 * promote: ("int8", ["b", "a"]),
                to_float + 2 * promote: ("float", ["b", "a"])}
    for room, (level, promoted) in expected.items():
        variant = MinMax(**W4, embedding="auto", budget={"size_mb": (floor + room) / 2**20})
        chosen = budget.select(variant, shapes, other, kld, embedding_kld=embedding_kld, embedding_weights=weights)
        assert (chosen["embedding"], chosen["promoted"]) == (level, promoted), room
        assert chosen["bytes"] <= chosen["limit_bytes"]
        assert budget.apply_choice(variant, chosen).embedding == level


def test_auto_embedding_needs_a_size_budget():
    for budget_spec in (None, {"bits_per_weight": 6}):
        with pytest.raises(ValueError, match="embedding: auto is chosen by a size budget"):
            MinMax(**W4, embedding="auto", budget=budget_spec)
    variant = MinMax(**W4, embedding="auto", budget={"size_mb": 1})
    with pytest.raises(CalqError, match="embedding: auto is chosen by the budget"):
        variant.apply(torch.nn.Linear(2, 2), None)


def test_budget_takes_exactly_one_limit():
    with pytest.raises(ValueError, match="exactly one"):
        MinMax(**W4, budget={"bits_per_weight": 5, "size_mb": 10})
    with pytest.raises(ValueError, match="objective"):
        MinMax(**W4, budget={"bits_per_weight": 5, "objective": "nll"})


def test_fake_quantization_is_compressed_tensors_minmax():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    for variant in (MinMax(**W4), MinMax(method="minmax", scheme="w8a8")):
        q = sensitivity.fake_quantize(weight, sensitivity.weight_args(variant))
        levels = 16 if variant.scheme == "w4a16" else 256
        rows = q.reshape(16, -1, 32) if variant.scheme == "w4a16" else q[:, None]
        assert all(len(torch.unique(g)) <= levels for g in rows.reshape(-1, rows.shape[-1]))
        assert 0 < (q - weight).abs().max() < weight.abs().max() / (levels / 4)


def test_infeasible_budget_is_refused_at_plan_time(tiny_recipe):
    recipe = {**tiny_recipe, "variants": [{**W4, "budget": {"bits_per_weight": 3.0}}]}
    with pytest.raises(CalqError, match="budget.*below the size with every layer quantized") as err:
        pipeline.plan(parse_recipe(recipe), None)
    assert err.value.where == "variants[0]: budget" and "bits_per_weight" in err.value.fix


def test_sensitivity_budget_and_report(tiny_recipe, tmp_path):
    mixed = {**W4, "method": "gptq", "name": "mixed", "budget": {"bits_per_weight": 6}}
    # three levels, unnamed (the choice keeps the label): 4 bits, 5 bits and int8 within 5.5 bits per weight
    three = {**W4, "bits": 5, "symmetric": True, "budget": {"bits_per_weight": 5.5, "demote": True}}
    # the embedding / head's level chosen with the Linears' (the tiny model's head is untied: two matrices)
    # ... by the divergence left after the best temperature (objective: ece)
    auto = {**W4, "name": "auto", "embedding": "auto", "budget": {"size_mb": 0.1, "objective": "ece"}}
    variants = [{"method": "minmax", "scheme": "w8a8"}, W4, mixed, three, auto]
    recipe = {**tiny_recipe, "variants": variants, "evaluation": {
        **tiny_recipe["evaluation"], "sensitivity": {"samples": 2, "seq_len": 32}}}
    plan = pipeline.plan(parse_recipe(recipe), None)
    names = [s.name for s in plan.stages]
    # one measurement per scheme, shared by the two w4a16 variants; the budgeted variant's quantize stage reads it
    assert [n for n in names if n.startswith("sensitivity/")] == [
        "sensitivity/w8a8-sym", "sensitivity/w4a16-g32-asym", "sensitivity/w5a16-g32-sym", "sensitivity/w4a16-g32-sym",
        "sensitivity/embedding"]
    assert "sensitivity/embedding" in next(s for s in plan.stages if s.name == "quantize/auto").needs
    assert "sensitivity/w4a16-g32-asym" in next(s for s in plan.stages if s.name == "quantize/mixed").needs
    assert {"sensitivity/w5a16-g32-sym", "sensitivity/w4a16-g32-sym"} <= set(
        next(s for s in plan.stages if s.name == "quantize/minmax-w5a16-g32").needs)

    out = tmp_path / "run"
    calq.run(recipe, out=out)
    config = models.load_config(models.resolve(str(tiny_recipe["model"]["id"])))
    layers = MethodConfig.quantized_layers(MinMax(**W4), models.linear_layers(config))
    table = json.loads((out / "sensitivity" / "w4a16-g32-asym.json").read_text())
    assert list(table["layers"]) == list(layers)  # one value per quantized Linear, in model order
    assert all(m["mean_kld"] >= 0 for m in table["layers"].values())
    # what a temperature cannot repair: never more than the divergence itself, at a T within the search's range
    assert all(0 <= m["tempered_kld"] <= m["mean_kld"] and 0.04 < m["temperature"] < 21
               for m in table["layers"].values())
    assert sensitivity.costs(table, "ece") == {n: m["tempered_kld"] for n, m in table["layers"].items()}

    info = json.loads((out / ".calq" / "stages" / "quantize" / "mixed.json").read_text())["info"]
    kld = {n: m["mean_kld"] for n, m in table["layers"].items()}
    promoted = info["budget"]["promoted"]
    assert promoted and info["budget"]["bytes"] <= info["budget"]["limit_bytes"]
    extra = {n: (budget.linear_bytes(*m["shape"], "w8a16") - budget.linear_bytes(*m["shape"], "w4a16", 32)) for n, m
             in table["layers"].items()}
    ratio = {n: kld[n] / extra[n] for n in kld}
    assert ratio[promoted[0]] == max(ratio.values())  # the most KLD per byte goes first
    saved = json.loads((out / "variants" / "mixed" / "config.json").read_text())["quantization_config"]
    int8_group = [g for g in saved["config_groups"].values() if g["weights"]["num_bits"] == 8]
    assert len(int8_group) == 1 and set(promoted) <= set(int8_group[0]["targets"])  # held at int8 in the checkpoint

    info = json.loads((out / ".calq" / "stages" / "quantize" / "minmax-w5a16-g32.json").read_text())["info"]
    chosen = info["budget"]
    assert chosen["bytes"] <= chosen["limit_bytes"] and chosen["promoted_to"] == "w8a16"
    groups = json.loads((out / "variants" / "minmax-w5a16-g32" / "config.json").read_text())[
        "quantization_config"]["config_groups"].values()
    targets = {g["weights"]["num_bits"]: set(g["targets"]) for g in groups}
    assert targets.get(8, set()) == set(chosen["promoted"]) and targets.get(4, set()) == set(chosen["demoted"])

    table = json.loads((out / "sensitivity" / "embedding.json").read_text())
    assert set(table["layers"]) == {"int4", "int8"} and all(m["mean_kld"] >= 0 for m in table["layers"].values())
    chosen = json.loads((out / ".calq" / "stages" / "quantize" / "auto.json").read_text())["info"]["budget"]
    assert chosen["embedding"] in ("int4", "int8", "float") and chosen["bytes"] <= chosen["limit_bytes"]
    assert chosen["objective"] == "ece" and all(0 <= m["tempered_kld"] <= m["mean_kld"]
                                                for m in table["layers"].values())
    # the choice is the knapsack's on the tempered costs (the same sizes as the variant's footprint)
    auto_variant = parse_recipe(recipe).variants[-1]
    meta = sensitivity_stage.meta_model(config)
    shapes, other = budget.footprint(meta, auto_variant)
    tables = {key: json.loads((out / "sensitivity" / f"{key}.json").read_text()) for key in ("w4a16-g32-asym",)}
    expected = budget.select(auto_variant, shapes, other, sensitivity.costs(tables["w4a16-g32-asym"], "ece"),
                             embedding_kld=sensitivity.costs(table, "ece"),
                             embedding_weights=budget.embedding_numel(meta))
    assert (expected["promoted"], expected["embedding"]) == (chosen["promoted"], chosen["embedding"])
    model = models.load(models.ModelSource(str(out / "variants" / "auto"), kind="folder"))[0]
    grids = [embedding.on_grid(w) for w in embedding.matrices(model).values()]
    assert len(grids) == 2 and all((g[2] if g else None) == embedding.BITS.get(chosen["embedding"]) for g in grids)

    marker = out / ".calq" / "stages" / "sensitivity" / "w4a16-g32-asym.json"
    written = marker.stat().st_mtime_ns
    calq.run(recipe, out=out)
    assert marker.stat().st_mtime_ns == written  # reused

    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Per-layer sensitivity" in md and "## Size and quality" in md and promoted[0] in md
    assert "the token embedding and output head alone" in md and f"the embedding / head {chosen['embedding']}" in md
    assert "by the KLD left after the best temperature: `objective: ece`" in md and "KLD after best T" in md
    assert 'alt="sensitivity per layer, w4a16-g32-asym"' in html
    assert 'alt="size against mean KLD and calibrated token ECE, Pareto front marked"' in html


def test_pareto_front():
    assert plots.pareto_front([(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0), (2, 2.0)]) == {0, 1, 3, 4}
