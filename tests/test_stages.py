"""The stage kinds are declared once (calq/stages.py): the README's stage table and the architecture diagram list
every kind, and the keys of a finished run do not move when the code around them is reorganized."""

import json
import re
from pathlib import Path

import pytest
from conftest import data_dir

from calq import pipeline, stages
from calq.recipe import load_recipe

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
