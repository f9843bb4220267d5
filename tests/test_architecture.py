"""The import graph of calq, counting every import (inside functions too): no cycles, between modules or between
subpackages, no private names taken from another module, and the lower layers never import the layers that compose
them."""

import ast
from pathlib import Path

import calq

PACKAGE = Path(calq.__file__).parent
LOWER = ("calq.errors", "calq.data", "calq.models", "calq.metrics", "calq.quant", "calq.calib", "calq.evaluation",
         "calq.export", "calq.kernels")
UPPER = ("calq.recipe", "calq.pipeline", "calq.report", "calq.api", "calq.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, str | None]]:
    """(calq module imported, name taken from it or None) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("calq")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("calq"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, None) if sub in known else (node.module, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: {m for m, _ in imports(path, known) if m in known and m != name} for name, path in modules().items()}


def package_graph() -> dict[str, set[str]]:
    """The module graph with each subpackage (calq.calib, calq.evaluation, ...) as one node."""
    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for name, deps in graph().items():
        edges.setdefault(package(name), set()).update(package(m) for m in deps if package(m) != package(name))
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    assert cycles(graph()) == []


def test_the_subpackages_import_each_other_without_cycles():
    assert cycles(package_graph()) == []


def test_no_module_imports_a_private_name_of_another():
    known = set(modules())
    private = [f"{name} imports {m}.{n}" for name, path in modules().items() for m, n in imports(path, known)
               if n is not None and n.startswith("_") and m != name]
    assert private == []


def test_lower_layers_never_import_the_layers_above():
    up = [f"{name} -> {m}" for name, deps in graph().items() if name.startswith(LOWER)
          for m in deps if m.startswith(UPPER)]
    assert up == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
