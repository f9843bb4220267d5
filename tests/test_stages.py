"""The stage kinds are declared once (calq/stages.py): the README's stage table and the architecture diagram list
every kind, and the keys of a finished run do not move when the code around them is reorganized."""

import json
import re
from pathlib import Path

import pytest
from conftest import data_dir
from safetensors.torch import load_file

import calq
from calq import pipeline, stages
from calq.recipe import load_recipe, parse_recipe
from calq.runs import write_json

ROOT = Path(__file__).parent.parent


def _shown(path: str) -> str:
    return re.sub(r"\{(\w+)\}", r"<\1>", path)


def test_every_kind_has_a_group_and_words():
    for kind, spec in stages.specs().items():
        assert spec.kind == kind and spec.pattern.split("/")[0] == kind
        assert spec.group in stages.GROUPS and spec.words and spec.outputs


def test_the_readme_stage_table_lists_every_kind_with_its_outputs():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*", (ROOT / "README.md").read_text(),
                                                         re.MULTILINE)}
    for spec in stages.specs().values():
        assert spec.pattern in rows, f"README.md's stage table has no row for {spec.pattern}"
        for path in spec.outputs.values():
            assert f"`{_shown(path)}" in rows[spec.pattern], f"{spec.pattern}: {_shown(path)} not in README.md"


def test_the_architecture_diagram_names_every_kind():
    text = (ROOT / "docs" / "architecture.md").read_text()
    diagram = text.split("## The stage table")[1].split("```")[1]
    named = set(re.findall(r"\b([a-z_]+)(?:/<|\b)", diagram))
    assert set(stages.specs()) <= named, set(stages.specs()) - named


@pytest.mark.skipif(data_dir() is None, reason="the quickstart's data folder (CALQ_DATA_DIR)")
def test_the_quickstart_keys_stay_the_same():
    """A finished quickstart run reuses every stage: a change that moves a key must be meant (then rewrite
    tests/quickstart_keys.json, and say in the change which stages rerun)."""
    plan = pipeline.plan(load_recipe(ROOT / "recipes" / "quickstart.yaml"), data_dir())
    assert plan.keys == json.loads((ROOT / "tests" / "quickstart_keys.json").read_text())


def test_a_variant_renamed_to_another_method_is_quantized_again(tiny_recipe, tmp_path):
    """The method is its config class's default value: the quantize key must name it all the same, or a variant
    whose `name` stays while its method changes would reuse the other method's checkpoint."""
    keys = []
    for method in ("awq", "gptq"):  # both calibrate on the samples: the same inputs
        recipe = {**tiny_recipe, "variants": [{"method": method, "scheme": "w4a16", "group_size": 32, "name": "v"}]}
        keys.append(pipeline.plan(parse_recipe(recipe), tmp_path).keys["quantize/v"])
    assert keys[0] != keys[1]


# ---- a stage kind added from this file alone ---------------------------------------------------------------

counted: list[str] = []


def stage_token_count(ctx: pipeline.Context):
    """Reads another kind's output by kind and name, writes its own declared output."""
    counted.append(ctx.run.root.name)
    tokens = load_file(str(ctx.output("eval_tokens", "tokens")))["input_ids"]
    out = write_json(ctx.output("token_count", "result"), {"tokens": tokens.numel()})
    return {"result": out}, {"tokens": tokens.numel()}


class TokenCount(stages.StageKind):
    kind, pattern, group, words, order = "token_count", "token_count", "evaluate", "token count", 95
    outputs = {"result": "token_count.json"}

    @classmethod
    def add_stages(cls, table) -> None:
        table.add("token_count", stage_token_count, needs=("eval_tokens",), settings=cls.version)


def test_a_stage_kind_is_one_file(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(stages.KINDS, "_classes", dict(stages.specs()._classes))  # the registration is undone after
    stages.KINDS.register(TokenCount)
    recipe = {**tiny_recipe, "variants": tiny_recipe["variants"][:1]}
    plan = pipeline.plan(parse_recipe(recipe), None)
    names = [s.name for s in plan.stages]
    assert names.index("eval_tokens") < names.index("token_count") < names.index("evaluate/baseline")

    out = tmp_path / "run"
    counted.clear()
    calq.run(recipe, out=out)
    tokens = load_file(str(out / "eval_tokens.safetensors"))["input_ids"]
    assert json.loads((out / "token_count.json").read_text()) == {"tokens": tokens.numel()}
    marker = out / ".calq" / "stages" / "token_count.json"
    written = marker.stat().st_mtime_ns
    calq.run(recipe, out=out)
    assert counted == ["run"] and marker.stat().st_mtime_ns == written  # the second run reused it

    monkeypatch.setattr(TokenCount, "version", 2)  # its version is its own: raising it reruns it alone
    again = pipeline.plan(parse_recipe(recipe), None).keys
    assert {name for name in again if again[name] != plan.keys[name]} == {"token_count"}
    with pytest.raises(ValueError, match="two stage kinds are named 'samples'"):
        stages.KINDS.register(type("Samples", (TokenCount,), {"kind": "samples"}))
