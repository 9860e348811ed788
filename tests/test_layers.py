"""Imports point down the layers of docs/architecture.md: every import, function-level ones included.

Walks the source of every module of the package (nothing is imported), resolves each import to
the module it loads, and fails on an import that points up a layer, on a cycle (within a layer
too), on a module no layer claims and on a private name imported from another module.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "equivcheck"

#: Bottom to top; a module belongs to the layer of its longest matching prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("equivcheck.errors", "equivcheck.version", "equivcheck.dtypes", "equivcheck.memory", "equivcheck.specs",
              "equivcheck.presets", "equivcheck.serialize", "equivcheck.sequence.specs", "equivcheck.sequence.presets")),
    ("mapping", ("equivcheck.ops", "equivcheck.mapping", "equivcheck.planning", "equivcheck._codegen", "equivcheck._arrays",
                 "equivcheck._copy", "equivcheck._fastcopy", "equivcheck.sequence.named")),
    ("data and files", ("equivcheck.data", "equivcheck.files", "equivcheck.file_index",
                        "equivcheck.model_weights", "equivcheck.sequence.reference")),
    # strategies draw backends too: they sit on the registry
    ("backends", ("equivcheck.backends", "equivcheck.sequence.backends", "equivcheck.sequence.tflite", "equivcheck.strategies")),
    ("judging", ("equivcheck.compare", "equivcheck.backends.probe", "equivcheck.mutations", "equivcheck.identification",
                 "equivcheck.diagnosis", "equivcheck.judge", "equivcheck._fastjudge")),
    ("checks", ("equivcheck.verification", "equivcheck.checker", "equivcheck.exploration", "equivcheck.modelcheck",
                "equivcheck.modelcheck.torch_trace", "equivcheck.fcn", "equivcheck.sequence")),
    ("report", ("equivcheck.report", "equivcheck.report.terminal")),
    ("faces", ("equivcheck", "equivcheck.cli", "equivcheck.plugin", "equivcheck.demo", "equivcheck.__main__",
               "equivcheck.modelcheck.commands", "equivcheck.fcn.commands", "equivcheck.report.example")),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    for path in PACKAGE.glob("*.c"):  # a compiled extension: a leaf
        found[f"equivcheck.{path.stem}"] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """``(imported module, name)`` pairs; name is "" for a plain import or a submodule."""
    if path.suffix != ".py":
        return []
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(_resolve(a.name), "") for a in node.names if a.name.split(".")[0] == "equivcheck"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            if base.split(".")[0] != "equivcheck":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, "") if full in MODULES else (_resolve(base), alias.name))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _layer(m) is None], "add these modules to LAYERS (and docs/architecture.md)"


def test_imports_point_down():
    up = [f"{m} -> {t} ({LAYERS[_layer(m)][0]} -> {LAYERS[_layer(t)][0]})"
          for m, edges in GRAPH.items() for t, _ in edges
          if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert not up, "imports that point up:\n" + "\n".join(sorted(set(up)))


def test_no_import_cycle():
    edges = {m: {t for t, _ in e if t != m} for m, e in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module():
    private = sorted({f"{m} imports {name} from {t}" for m, edges in GRAPH.items() for t, name in edges
                      if name.startswith("_") and not name.startswith("__") and t != m})
    assert not private, "\n".join(private)


@pytest.mark.parametrize("module", ["equivcheck.specs", "equivcheck.planning", "equivcheck.judge"])
def test_the_walk_sees_imports(module):
    """The walk itself: modules known to import others are seen doing so."""
    assert GRAPH[module], f"{module} imports nothing according to the walk"
