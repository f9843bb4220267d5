"""Property test over recipes: the quickstart recipe with one key mutated (dropped, another type, out of range, a path
that does not exist) must give, under `calq run --dry-run`, exit 0, or exit 2 with one `error:` line and no
traceback. Mutations come from a fixed seeded generator, so a failure names a mutation that reproduces."""

import copy
import functools
import random
import re
from pathlib import Path

import pytest
import yaml
from conftest import data_dir as shared_data_dir
from typer.testing import CliRunner

from calq import models
from calq.cli import app

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SEED, COUNT = 0, 60  # of the 334 mutations of the quickstart (all 334 were run once by hand: none crashed)
MISSING = object()


def leaves(node, path=()):
    """Every (path, value) in the recipe, containers included (a whole section can be dropped or retyped)."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from leaves(value, (*path, key))


def other_types(value):
    if isinstance(value, bool):
        return ["maybe", 3]
    if isinstance(value, (int, float)):
        return ["abc", [value], True]
    if isinstance(value, str):
        return [12345, ["x"], {"a": 1}]
    if isinstance(value, list):
        return ["not-a-list", 7]
    return ["not-a-section", 7, [1]]


def out_of_range(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    return [-1, 0, 10**9, 0.5, float("nan")]


def bad_paths(path, value):
    if not isinstance(value, str):
        return []
    return ["/nonexistent/calq/file.txt", "@data/nonexistent/file.txt", "", "../../escape"]


def all_mutations(recipe: dict) -> list[tuple[str, tuple, object]]:
    out = []
    for path, value in leaves(recipe):
        if not path:
            continue
        out.append(("drop", path, MISSING))
        out += [("type", path, v) for v in other_types(value)]
        out += [("range", path, v) for v in out_of_range(value)]
        out += [("path", path, v) for v in bad_paths(path, value)]
    return out


def apply(recipe: dict, path: tuple, value) -> dict:
    mutated = copy.deepcopy(recipe)
    node = mutated
    for key in path[:-1]:
        node = node[key]
    if value is MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return mutated


def describe(kind: str, path: tuple, value) -> str:
    where = ".".join(str(p) for p in path)
    return f"{kind} {where}" if value is MISSING else f"{kind} {where} = {value!r}"


@pytest.fixture
def cached_model_config(monkeypatch):
    """Read the bundled model's config once: parsing its GGUF metadata takes seconds, and every mutation reads it."""
    real = models.load_config
    cache = functools.lru_cache(maxsize=8)(lambda location, gguf: real(models.ModelSource(location, gguf_file=gguf)))

    def load_config(source):
        if source.gguf_file is None:
            return real(source)
        return copy.deepcopy(cache(source.location, source.gguf_file))

    monkeypatch.setattr(models, "load_config", load_config)


def dry_run(recipe_file: Path, out: Path, data_dir: str):
    return CliRunner().invoke(app, ["run", str(recipe_file), "--dry-run", "--data-dir", data_dir, "--out", str(out)])


def verdict(result) -> str | None:
    """None when the result is acceptable, else what is wrong with it."""
    text = result.output
    if result.exit_code == 0:
        return None
    if result.exit_code != 2:
        exc = result.exception
        return f"exit {result.exit_code}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if "Traceback" in text or len(errors) != 1:
        return f"exit 2 but {len(errors)} error lines / a traceback: {text[-300:]!r}"
    return None


def test_mutated_quickstart_recipes_fail_cleanly(tmp_path, cached_model_config):
    data_dir = str(shared_data_dir() or tmp_path)
    base = yaml.safe_load(QUICKSTART.read_text())
    unmutated = dry_run(QUICKSTART, tmp_path / "run", data_dir)  # also fills the config cache before timing
    assert unmutated.exit_code == 0, unmutated.output
    mutations = all_mutations(base)
    chosen = random.Random(SEED).sample(mutations, min(COUNT, len(mutations)))
    crashes = {}
    for i, (kind, path, value) in enumerate(chosen):
        name = describe(kind, path, value)
        recipe_file = tmp_path / f"m{i}.yaml"
        recipe_file.write_text(yaml.safe_dump(apply(base, path, value), sort_keys=False))
        problem = verdict(dry_run(recipe_file, tmp_path / f"run{i}", data_dir))
        if problem:
            crashes[name] = problem
    report = "\n".join(f"{name}: {problem}" for name, problem in crashes.items())
    assert not crashes, f"{len(crashes)} of {len(chosen)} mutations crashed:\n{report}"


def test_a_recipe_that_is_not_text_fails_cleanly(tmp_path, cached_model_config):
    recipe_file = tmp_path / "binary.yaml"
    recipe_file.write_bytes(bytes(range(256)) * 4)
    result = dry_run(recipe_file, tmp_path / "run", str(tmp_path))
    assert result.exit_code == 2 and verdict(result) is None, verdict(result)


def test_the_generator_is_fixed():
    mutations = all_mutations(yaml.safe_load(QUICKSTART.read_text()))
    first = random.Random(SEED).sample(mutations, min(COUNT, len(mutations)))
    again = random.Random(SEED).sample(mutations, min(COUNT, len(mutations)))
    assert [describe(*m) for m in first] == [describe(*m) for m in again]
    assert any(re.match(r"drop variants\.\d", describe(*m)) for m in mutations)
