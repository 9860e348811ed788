"""The layers under Mapping: ops is a leaf, no import cycle, one array interface, copy kernels apart."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest

from equivcheck import _arrays, _codegen, _copy, ops
from equivcheck.errors import MappingError
from equivcheck.mapping import Mapping

PACKAGE = Path(ops.__file__).parent
# Each module of the mapping engine and the equivcheck modules it may import at its top level.
LAYERS = {
    "ops": {"errors"},
    "_copy": {"errors", "ops", "_fastcopy"},
    "_codegen": {"errors", "ops"},
    "_arrays": {"errors", "ops", "_copy"},
    "mapping": {"errors", "ops", "_copy", "_arrays", "_codegen"},
}


def equivcheck_imports(module: str) -> tuple[set[str], list[str]]:
    """The equivcheck modules ``module`` imports at its top level, and any it imports inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    top: set[str] = set()
    nested: list[str] = []

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.ImportFrom) and node.module == "equivcheck":
            return {a.name for a in node.names}
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("equivcheck."):
            return {node.module.split(".")[1]}
        if isinstance(node, ast.Import):
            return {a.name.split(".")[1] for a in node.names if a.name.startswith("equivcheck.")}
        return set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            found = names(child)
            if at_top:
                top.update(found)
            else:
                nested.extend(sorted(found))
            visit(child, at_top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return top, nested


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_each_module_imports_only_the_layers_below_it_and_never_lazily(module):
    top, nested = equivcheck_imports(module)
    assert top <= LAYERS[module], f"equivcheck.{module} imports {sorted(top - LAYERS[module])}"
    assert not nested, f"equivcheck.{module} imports {nested} inside a function"


def test_the_layers_have_no_cycle():
    order: list[str] = []

    def place(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        for dep in sorted(LAYERS.get(module, ())):
            place(dep, (*path, module))
        if module not in order:
            order.append(module)

    for module in LAYERS:
        place(module, ())
    assert order.index("ops") < order.index("mapping")


ABSTRACT = sorted(_arrays.ArrayOps.__abstractmethods__)


@pytest.mark.parametrize("kind", _arrays._REGISTRY, ids=lambda k: k.framework)
def test_every_array_kind_implements_the_whole_interface_with_its_signatures(kind):
    assert {"is_array", "check", "reshape", "transpose", "flip", "finish", "zeros"} <= set(ABSTRACT)
    for name in (*ABSTRACT, "apply", "check_out"):
        base = inspect.signature(getattr(_arrays.ArrayOps, name))
        own = inspect.signature(getattr(type(kind), name))
        assert list(own.parameters) == list(base.parameters), f"{type(kind).__name__}.{name}{own} differs from {base}"
        assert [p.default for p in own.parameters.values()] == [p.default for p in base.parameters.values()]


def test_out_is_refused_by_every_kind_but_numpy():
    x = np.arange(6.0).reshape(2, 3)
    with pytest.raises(MappingError, match="out= takes a numpy array for a numpy input, got list for ndarray"):
        _arrays.ops_for(x).check_out(x, [0.0] * 6, (3, 2))
    for kind in _arrays._REGISTRY[1:]:
        with pytest.raises(MappingError, match="out= takes a numpy array"):
            kind.apply(x, (), None, np.empty((2, 3)))


def test_ops_inverse_and_simplify_work_without_a_mapping():
    chain = (ops.Transpose((1, 0)), ops.Reshape((4096, 512, 7, 7)), ops.Flip((2, 3)))
    shape = (25088, 4096)
    assert ops.shape_after(shape, chain) == (4096, 512, 7, 7)
    simple = ops.simplify(shape, chain)
    assert simple == chain  # already the normal form: a transpose of whole axes, a split, a flip
    nf = ops.normal_form(shape, chain)
    assert nf is not None and nf.out_shape == (4096, 512, 7, 7) and len(nf.flipped) == 2
    back = ops.inverse(shape, chain)
    assert ops.shape_after((4096, 512, 7, 7), back) == shape
    x = np.arange(math.prod((6, 4))).reshape(6, 4)
    m = Mapping((6, 4), (ops.Transpose((1, 0)), ops.Reshape((2, 2, 3, 2)), ops.Flip((1, 3))))
    np.testing.assert_array_equal(Mapping(m.out_shape, ops.inverse(m.in_shape, m.ops)).apply(m.apply(x)), x)
    assert ops.normal_form((4, 6), (ops.Transpose((1, 0)), ops.Reshape((4, 6)))) is None  # irregular


def test_codegen_renders_from_ops_and_normal_form_alone():
    m = Mapping.identity((25088, 4096)).transpose(1, 0).reshape(4096, 512, 7, 7).flip(2, 3)
    simple = ops.simplify(m.in_shape, m.ops)
    nf = ops.normal_form(m.in_shape, m.ops)
    assert _codegen.render(simple, nf, "numpy", "w") == m.code() == "w.T.reshape(4096, 512, 7, 7)[:, :, ::-1, ::-1]"
    assert _codegen.render(simple, nf, "einops", "k", tuple("io"), tuple("oihw")) == m.named("io", "oihw").code("einops", "k")
    with pytest.raises(MappingError, match=r"mapping w\.T\.reshape\(4, 6\) has an irregular reshape"):
        Mapping.identity((4, 6)).transpose(1, 0).reshape(4, 6).code("einops", "v")


def test_the_copy_module_holds_the_kernels_and_their_guard():
    assert callable(_copy.blocked_copy) and callable(_copy.transpose_copy)
    assert _arrays.check_dtype is _copy.check_dtype  # one guard, re-exported where files and readers find it
    with pytest.raises(MappingError, match="array dtype=object is not a real numeric type"):
        _copy.raw_view(np.empty(3, object))
    out = np.empty((40, 30))
    src = np.arange(1200.0).reshape(30, 40).T
    _copy.blocked_copy(out, src)
    np.testing.assert_array_equal(out, src)
