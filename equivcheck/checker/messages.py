"""What a check says: code that rebuilds a spec, the converter's conventions, the failure message, the summary table."""

from __future__ import annotations

import ast
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from equivcheck._arrays import to_numpy
from equivcheck.errors import EquivcheckError
from equivcheck.identification import IDENTIFY_MAX_ELEMENTS, Identification, identify, preset_kwargs, probe_weights
from equivcheck.presets import PRESETS, spec
from equivcheck.specs import LayerSpec

if TYPE_CHECKING:
    from equivcheck.checker.core import CheckRecord


# -- conventions -------------------------------------------------------------------------
#: What a converter's kernel is (kept under its old name): see :class:`equivcheck.identification.Identification`.
Conventions = Identification


def _label(layer: LayerSpec) -> str:
    return layer.name or layer.kind


def spec_code(layer: LayerSpec) -> str:
    """Python that rebuilds ``layer`` (with ``import equivcheck as ec``)."""
    name = layer.name or ""
    if name.count(":") == 1 and name.split(":")[0] in PRESETS:
        kw = preset_kwargs(layer)
        try:
            if spec(name, **kw) == layer:
                args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
                return f"ec.spec({name!r}, {args})"
        except EquivcheckError:
            pass
    return f"ec.{layer!r}"


def identify_conventions(convert: Callable, source: LayerSpec, target: LayerSpec) -> Identification:
    """Name the conventions ``convert`` follows, by converting all-distinct probe weights (:func:`equivcheck.identify`)."""
    label = _label(target)
    if math.prod(source.kernel_shape) > IDENTIFY_MAX_ELEMENTS:
        return Identification(label, problem=f"not identified: the kernel has more than {IDENTIFY_MAX_ELEMENTS} weights")
    kernel, bias = probe_weights(source)
    try:
        result = convert(kernel.copy(), None if bias is None else bias.copy())
        got = np.asarray(to_numpy(result[0]), dtype=np.float64)
        got_bias = None if result[1] is None else np.asarray(to_numpy(result[1]), dtype=np.float64)
    except Exception as exc:  # the user's converter may not accept probe values; say so, do not hide the check
        return Identification(label, problem=f"not identified: the converter raised {type(exc).__name__} on probe weights")
    return identify(source, target, got, got_bias, source_kernel=kernel, source_bias=bias)


def _expression(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


def _where(convert: Any) -> str:
    code = getattr(convert, "__code__", None)
    return f" ({Path(code.co_filename).name}:{code.co_firstlineno})" if code is not None else ""


def converter_code(convert: Callable) -> tuple[str, list[str], str]:
    """(display name, setup lines, call expression) of a converter: how the summary names it and the reproducer gets it.

    The name is the qualified name (``Conv.convert``; a function defined in a test by its own name, a lambda
    by where it is); a ``functools.partial`` shows its function and arguments (``scale(factor=2)``). The
    setup lines and the expression are valid Python: an import where the converter can be imported, else
    a comment saying what to define.
    """
    if isinstance(convert, functools.partial):
        name, setup, call = converter_code(convert.func)
        args = [repr(a) for a in convert.args] + [f"{k}={v!r}" for k, v in convert.keywords.items()]
        expression = f"functools.partial({', '.join([call, *args])})"
        shown = f"{name}({', '.join(args)})"
        if call != "converter" and _expression(expression):
            return shown, ["import functools", *setup], expression
        return shown, [f"# define converter as in your test: a functools.partial of {name}{_where(convert.func)}"], "converter"
    qualname = getattr(convert, "__qualname__", None)
    if not isinstance(qualname, str):  # an object with __call__
        kind = type(convert).__qualname__
        return kind, [f"# define converter as in your test: a {kind} instance"], "converter"
    module = getattr(convert, "__module__", None)
    if inspect.ismethod(convert) and not inspect.isclass(convert.__self__):
        return qualname, [f"# define converter as in your test: the bound method {qualname}"], "converter"
    if "<lambda>" in qualname:
        name = f"<lambda>{_where(convert)}"
        return name, [f"# define converter as in your test: the lambda{_where(convert)}"], "converter"
    if "<locals>" in qualname:  # a function defined inside a test: its plain name
        name = getattr(convert, "__name__", qualname)
        return name, [f"# define {name} as in your test{_where(convert)}"], name
    name = qualname
    if not module or not all(part.isidentifier() for part in name.split(".")):
        return name, [f"# define converter as in your test: {name}{_where(convert)}"], "converter"
    if module == "__main__":
        return name, [f"# define {name.split('.')[0]} as in your script"], name
    return name, [f"from {module} import {name.split('.')[0]}"], name


def failure_message(record: CheckRecord, convert: Callable, *, call: str | None = None) -> str:
    """The assertion message: the case, what went wrong, the conventions found and a reproducer.

    ``call`` is the converter expression of the reproducer, given the expression of ``convert``
    (default: that expression itself).
    """
    c = record.case
    name, setup, expression = converter_code(convert)
    lines = [
        f"{name} does not convert {c.title()} correctly ({c.verdict})",
        f"  source     {c.source.describe()}",
        f"  target     {c.target.describe()}",
        f"  run on     {c.source_backend} → {c.target_backend}, {c.dtype}, seed={c.seed}",
        f"  result     {c.reason or (c.comparison.summary() if c.comparison else '')}",
        f"  converter  {record.conventions}",
    ]
    if c.mapping is not None:
        lines.append(f"  right      {c.mapping.code('numpy')}")
        if c.verdict == "fail":
            fix = converter_patch(c.source, c.target, c.mapping)
            lines += [f"  fix        {fix[0]}", *(f"             {line}" for line in fix[1:])]
    lines += [f"  note       {n}" for n in record.notes]
    lines += [
        "  reproduce:",
        "    import equivcheck as ec",
        "    from equivcheck.checker import check_conversion",
        *(f"    {line}" for line in setup),
        f"    source = {spec_code(c.source)}",
        f"    target = {spec_code(c.target)}",
        f"    case = check_conversion({call.format(expression) if call else expression}, source, target, "
        f"source_backend={c.source_backend!r}, target_backend={c.target_backend!r}, dtype={c.dtype!r}, seed={c.seed})",
        "    print(case.verdict, case.reason)",
    ]
    return "\n".join(lines)


def converter_patch(source: LayerSpec, target: LayerSpec, right: Any, *, framework: str | None = None) -> list[str]:
    """The fix of a wrong converter as lines to paste: the right mapping of the source kernel ``w`` (and bias ``b``),
    written the target framework's way (a torch ``state_dict`` entry, Keras ``set_weights``, an ONNX initializer).

    ``right`` is the :class:`~equivcheck.mapping.Mapping` from ``source``'s kernel to ``target``'s (``plan``);
    ``framework`` defaults to the backend of ``target``'s preset (``torch``, ``keras``, ``tf``, ``onnxruntime``...).
    """
    if framework is None:
        preset = PRESETS.get((target.name or "").split(":")[0])
        framework = preset.backend if preset is not None else "numpy"
    kernel = right.simplify().code("numpy")
    bias = None
    if target.bias:
        bias = "b" if source.bias else f"np.zeros({tuple(target.bias_shape)!r}, w.dtype)"
    lines = ["# w, b: the source layer's kernel and bias as numpy arrays, as the source stores them"]
    if framework == "torch":
        lines[0] += "; name: the converted module's name in state_dict"
        lines.append(f'state_dict[f"{{name}}.weight"] = torch.tensor(np.ascontiguousarray({kernel}))')
        if bias:
            lines.append(f'state_dict[f"{{name}}.bias"] = torch.tensor(np.ascontiguousarray({bias}))')
    elif framework in ("keras", "tf"):
        lines[0] += "; layer: the converted Keras layer"
        lines.append(f"layer.set_weights([{kernel}{', ' + bias if bias else ''}])")
    elif framework == "onnxruntime":
        lines[0] += ("; W, B: the node's weight and bias initializer names; "
                     "initializers = {t.name: t for t in model.graph.initializer}")
        lines.append(f"initializers[W].CopyFrom(numpy_helper.from_array(np.ascontiguousarray({kernel}, dtype=np.float32), W))")
        if bias:
            lines.append(f"initializers[B].CopyFrom(numpy_helper.from_array(np.ascontiguousarray({bias}, dtype=np.float32), B))")
    else:
        lines.append(f"kernel = {kernel}")
        if bias:
            lines.append(f"bias = {bias}")
    return lines


_COLUMNS = ("conversion", "converter", "backends", "dtype", "checked", "verdicts", "conventions")


def summary_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Text lines of a table of the checks: one line per conversion, converter, backend pair and dtype."""
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["conversion"], row["converter"], row["backends"], row["dtype"])
        g = groups.setdefault(key, {"checked": 0, "verdicts": {}, "conventions": []})
        g["checked"] += 1
        g["verdicts"][row["verdict"]] = g["verdicts"].get(row["verdict"], 0) + 1
        if row["conventions"] and row["conventions"] not in g["conventions"]:
            g["conventions"].append(row["conventions"])
    table = [list(_COLUMNS)]
    for key, g in groups.items():
        verdicts = " ".join(f"{n} {v}" for v, n in sorted(g["verdicts"].items()))
        table.append([*key[:4], str(g["checked"]), verdicts, "; ".join(g["conventions"]) or "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in table]
    notes = dict.fromkeys(n for row in rows for n in row.get("notes", ()))
    return lines + [f"note: {n}" for n in notes]
