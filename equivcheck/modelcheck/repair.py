"""Repair a wrongly converted model: the identified fix applied, proven, and given as a patch.

    >>> result = ec.check_models(torch_model, keras_model)
    >>> fixed = result.repair()          # a copy of keras_model, failing layers' weights replaced
    >>> fixed.check.verdict              # the repaired model checked again from scratch
    >>> print(result.patch().code())     # the same fix as lines for the converter

Each failing pair's converted weights are replaced by the *source's* weights through the right
mapping (:func:`equivcheck.planning.plan` of the two layer specs the check captured, the mapping its
diagnosis prints), in a copy of the converted model; the source is never changed. A dense layer
behind a permutation in the converted graph (a ``Permute`` before ``Flatten``) gets that
permutation folded into its kernel: the fix changes the layer's weights, not the graph, and says
so. A failing pair no weight change fixes (the graph feeds the layer a different input, the
layer's weights are already right, its configuration differs) is refused in one line naming it.

Formats: torch modules, Keras 3 models, tf_keras (Keras 2) models in memory or ``.h5`` files (the
repaired model a tf_keras model of its own), ONNX models (``ModelProto``, ``.onnx`` path or
``InferenceSession``: the repaired model is a ``ModelProto`` with its initializers rewritten) and
Flax linen ``(module, variables)`` tuples (new variables; the module is shared).
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from equivcheck.errors import EquivcheckError, FileFormatError

if TYPE_CHECKING:  # the result imports this module: the types only
    from equivcheck.modelcheck.result import LayerRow, ModelCheck

__all__ = ["LayerFix", "Patch", "RepairError", "Repaired", "check_fix_output", "format_of", "patch", "repair", "save_model"]

#: Mistakes that no change of the layer's own weights fixes.
_NOT_WEIGHTS = {
    "graph": "the converted graph feeds it a different input and no change of its weights computes the same function; "
             "fix the graph",
    "weights right, output differs": "its weights already are the right mapping of the source's: the layer computes "
                                     "differently (padding, stride, dtype); fix the layer's configuration",
    "layer configuration differs": "the two layers are configured differently; fix the layer's configuration",
    "kernel shape": "its kernel has another shape than the layer needs; fix the layer's configuration",
    "input shape": "its input has another shape than its partner's; fix the graph",
    "replay": "it could not be run alone",
    "output shape": "its output has another shape than its partner's; fix the layer's configuration",
}


class RepairError(EquivcheckError, ValueError):
    """A failing layer has no identified fix, or a model cannot be repaired or written."""


@dataclass
class LayerFix:
    """The fix of one failing pair: which converted parameters, the mapping, and the converter's lines."""

    source: str  # source layer
    converted: str  # converted layer
    mistake: str
    framework: str  # the converted model's framework (where the fix is pasted)
    parameters: tuple[str, ...]  # the converted model's parameter names that change (kernel, bias)
    source_parameters: tuple[str, ...]  # where their values come from in the source model
    mapping: str  # the right mapping of the source kernel, numpy code on ``w``
    code: list[str] = field(default_factory=list)  # ready-to-paste lines, in the converted model's framework
    folded: str = ""  # a permutation of the converted graph folded into this layer's kernel

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "converted": self.converted, "mistake": self.mistake,
                "framework": self.framework, "parameters": list(self.parameters),
                "source_parameters": list(self.source_parameters), "mapping": self.mapping,
                "code": "\n".join(self.code), "folded": self.folded}


@dataclass
class Patch:
    """Per failing layer, the parameters to change and how: :meth:`code` is one script for the converter."""

    source_framework: str
    framework: str
    fixes: list[LayerFix] = field(default_factory=list)

    def code(self) -> str:
        """Python that fixes ``converted_model`` from ``source_model`` (both in memory, as the converter holds them)."""
        if not self.fixes:
            return "# nothing to fix"
        lines = [f"# fix of the {self.framework} model converted_model from the {self.source_framework} model "
                 "source_model (equivcheck repair)", "import numpy as np"]
        head = [line for line in _SIDES[self.source_framework].read_header + _SIDES[self.framework].write_header if line]
        imports = [line for line in head if line.startswith(("import ", "from "))]
        lines += list(dict.fromkeys(imports)) + [""] + [line for line in head if line not in imports]
        for fix in self.fixes:
            lines.append(f"# {fix.converted} <- {fix.source}: {fix.mistake}" + (f"; {fix.folded}" if fix.folded else ""))
            lines += fix.code
        lines += list(_SIDES[self.framework].write_footer)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "equivcheck.patch/1", "source_framework": self.source_framework, "framework": self.framework,
                "layers": [f.to_dict() for f in self.fixes], "code": self.code()}

    def __str__(self) -> str:
        return self.code()


@dataclass
class Repaired:
    """A repaired copy of the converted model and its check from scratch."""

    model: Any  # same kind as the converted model (an ONNX model comes back as a ModelProto)
    check: ModelCheck  # the repaired model against the source
    patch: Patch  # what was changed

    @property
    def passed(self) -> bool:
        return self.check.passed

    @property
    def notes(self) -> list[str]:
        return [f"{f.converted}: {f.folded}" for f in self.patch.fixes if f.folded]

    def render(self) -> str:
        fixes = self.patch.fixes
        head = (f"repaired {len(fixes)} layer(s): " + "; ".join(f"{f.converted} ({f.mistake})" for f in fixes)) \
            if fixes else "nothing to repair"
        return "\n".join([head, *(f"note: {n}" for n in self.notes), f"re-checked: {self.check.verdict}: "
                          f"{self.check.reason}"])

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "patch": self.patch.to_dict(), "check": self.check.to_dict(), "notes": self.notes}


# -- per framework: where a layer's weights are, and the converter's lines ----------------------
def _framework(model: Any) -> str:
    import sys

    from equivcheck.modelcheck.onnx_adapter import is_onnx

    torch, keras = sys.modules.get("torch"), sys.modules.get("keras")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    if keras is not None and isinstance(model, keras.Model):
        return "keras"
    if is_onnx(model):
        return "onnx"
    from equivcheck.modelcheck.tf_keras_adapter import is_tf_keras

    if is_tf_keras(model):
        return "tf_keras"
    from equivcheck.modelcheck.flax_adapter import is_flax

    if is_flax(model) and isinstance(model, tuple):
        return "flax"
    raise RepairError(f"model={type(model).__name__} cannot be repaired: expected a torch module, a Keras 3 or tf_keras "
                      "(Keras 2: in memory or .h5) model, an ONNX model (ModelProto, .onnx path, InferenceSession) or a Flax (module, variables) tuple")


class _Side(ABC):
    """One model's weights by layer name (the names ``check_models`` reports)."""

    read_header: tuple[str, ...] = ()
    write_header: tuple[str, ...] = ()
    write_footer: tuple[str, ...] = ()

    def __init__(self, model: Any) -> None:
        self.model = model

    @abstractmethod
    def weights(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's kernel and bias, as stored."""

    @abstractmethod
    def set(self, layer: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        """Write the layer's kernel and bias into the model."""

    @abstractmethod
    def names(self, layer: str) -> tuple[str, ...]:
        """The framework's own names of the layer's parameters."""

    @abstractmethod
    def read(self, layer: str) -> tuple[str, str | None]:
        """Expressions for the layer's kernel and bias (numpy, in the stored layout)."""

    @abstractmethod
    def write(self, layer: str, kernel: str, bias: str | None) -> list[str]:
        """Lines of the converter's framework that set the layer's parameters to these expressions."""


def _base(layer: str) -> str:
    return layer.split("#")[0]  # "fc#2": the second call of layer fc


class _Torch(_Side):
    read_header = ("import torch", "", "source_state = {k: v.detach().cpu().to(torch.float32 if v.dtype == torch.bfloat16 else "
                   "v.dtype).numpy() for k, v in source_model.state_dict().items()}")
    write_header = ("import torch", "", "state_dict = converted_model.state_dict()")
    write_footer = ("converted_model.load_state_dict(state_dict)",)

    def _module(self, layer: str) -> tuple[str, Any]:
        name = _base(layer)
        module = dict(self.model.named_modules()).get(name)
        if module is None or not hasattr(module, "weight"):
            raise RepairError(f"layer={layer!r} is not a module with a weight in torch model {type(self.model).__name__}")
        return name, module

    def weights(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        from equivcheck._arrays import to_numpy

        _, m = self._module(layer)
        return to_numpy(m.weight.detach().cpu()), None if m.bias is None else to_numpy(m.bias.detach().cpu())

    def set(self, layer: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        import torch

        _, m = self._module(layer)
        with torch.no_grad():
            for param, value in ((m.weight, kernel), (m.bias, bias)):
                if param is not None and value is not None:
                    param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)).to(param.dtype))

    def names(self, layer: str) -> tuple[str, ...]:
        name, m = self._module(layer)
        prefix = f"{name}." if name else ""
        return (f"{prefix}weight",) + ((f"{prefix}bias",) if m.bias is not None else ())

    def read(self, layer: str) -> tuple[str, str | None]:
        names = self.names(layer)
        return f"source_state[{names[0]!r}]", (f"source_state[{names[1]!r}]" if len(names) > 1 else None)

    def write(self, layer: str, kernel: str, bias: str | None) -> list[str]:
        names = self.names(layer)
        return [f"state_dict[{name!r}] = torch.tensor(np.ascontiguousarray({expr}), dtype=state_dict[{name!r}].dtype)"
                for name, expr in zip(names, (kernel, bias)) if expr is not None]


class _Keras(_Side):
    def _layer(self, layer: str) -> Any:
        name, todo = _base(layer), [self.model]
        while todo:  # a model nesting models (checked as one chain of its layers): search them all
            for real in todo.pop(0).layers:
                if real.name == name and getattr(real, "kernel", None) is not None:
                    return real
                if hasattr(real, "layers"):
                    todo.append(real)
        raise RepairError(f"layer={layer!r} is not a layer with a kernel in Keras model {self.model.name!r}")

    def weights(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        real = self._layer(layer)
        bias = getattr(real, "bias", None)
        return np.asarray(real.kernel), None if bias is None else np.asarray(bias)

    def set(self, layer: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        real = self._layer(layer)
        real.kernel.assign(np.asarray(kernel, dtype=real.kernel.dtype))
        if bias is not None and getattr(real, "bias", None) is not None:
            real.bias.assign(np.asarray(bias, dtype=real.bias.dtype))

    def names(self, layer: str) -> tuple[str, ...]:
        real = self._layer(layer)
        bias = getattr(real, "bias", None)
        return (real.kernel.path,) + ((bias.path,) if bias is not None else ())

    def read(self, layer: str) -> tuple[str, str | None]:
        name = _base(layer)
        bias = getattr(self._layer(layer), "bias", None) is not None
        return (f"np.asarray(source_model.get_layer({name!r}).kernel)",
                f"np.asarray(source_model.get_layer({name!r}).bias)" if bias else None)

    def write(self, layer: str, kernel: str, bias: str | None) -> list[str]:
        name = _base(layer)
        values = [kernel] + ([bias] if bias is not None and len(self.names(layer)) > 1 else [])
        return [f"converted_model.get_layer({name!r}).set_weights([{', '.join(values)}])"]


class _TfKeras(_Keras):
    """A tf_keras (Keras 2) model, in memory or an ``.h5`` file (read as :mod:`~equivcheck.modelcheck.tf_keras_adapter`
    does): the Keras side, its variables named by ``name`` (tf_keras variables have no ``path``)."""

    def __init__(self, model: Any) -> None:
        if isinstance(model, (str, os.PathLike)):
            from equivcheck.modelcheck.tf_keras_adapter import load_tf_keras_model

            model = load_tf_keras_model(model)
        super().__init__(model)

    def names(self, layer: str) -> tuple[str, ...]:
        real = self._layer(layer)
        bias = getattr(real, "bias", None)
        return tuple(v.name.removesuffix(":0") for v in (real.kernel, bias) if v is not None)

    def set(self, layer: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        real = self._layer(layer)
        for var, value in ((real.kernel, kernel), (getattr(real, "bias", None), bias)):
            if var is not None and value is not None:
                var.assign(np.asarray(value, dtype=var.dtype.as_numpy_dtype))


class _Onnx(_Side):
    read_header = ("from onnx import numpy_helper", "",
                   "source_init = {t.name: numpy_helper.to_array(t) for t in source_model.graph.initializer}")
    write_header = ("from onnx import numpy_helper", "",
                    "converted_init = {t.name: t for t in converted_model.graph.initializer}")

    def __init__(self, model: Any) -> None:
        from equivcheck.backends.onnxruntime import read_onnx_model

        proto, _ = read_onnx_model(model, "model", error=RepairError)
        super().__init__(proto)
        graph = proto.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in set(n.input):
                self.readers.setdefault(i, []).append(n)
        self.labels: dict[str, list[Any]] = {}
        for n in graph.node:
            if n.op_type in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
                self.labels.setdefault(n.name or f"{n.op_type}:{n.output[0]}", []).append(n)

    def _stored(self, name: str) -> str:
        """The initializer (or Constant output) a node input comes from, through Identity nodes."""
        current = name
        while current not in self.inits:
            p = self.producer.get(current)
            if p is not None and p.op_type == "Constant":
                return current
            if p is None or p.op_type != "Identity":
                raise RepairError(f"ONNX tensor {name!r} is not stored in the model (computed in the graph): "
                                  "fold constants first")
            current = p.input[0]
        return current

    def _find(self, layer: str) -> dict[str, Any]:
        from equivcheck.backends.onnxruntime import node_attribute

        base, _, nth = layer.partition("#")
        nodes = self.labels.get(base, [])
        k = int(nth) - 1 if nth.isdigit() else 0
        if len(nodes) <= k:
            raise RepairError(f"layer={layer!r} is not a Gemm, MatMul, Conv or ConvTranspose node of the ONNX model")
        n = nodes[k]
        found: dict[str, Any] = {"node": n, "kernel": self._stored(n.input[1]), "bias": None, "scale": 1.0,
                                 "bias_scale": 1.0}
        if n.op_type == "Gemm":
            found["scale"] = float(node_attribute(n, "alpha", 1.0))
            found["bias_scale"] = float(node_attribute(n, "beta", 1.0))
            found["units"] = self._array(found["kernel"]).shape[0 if node_attribute(n, "transB", 0) else 1]
            if len(n.input) > 2 and n.input[2]:
                found["bias"] = self._stored(n.input[2])
        elif n.op_type == "MatMul":
            after = self.readers.get(n.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add":
                other = [i for i in after[0].input if i != n.output[0]]
                units = self._array(found["kernel"]).shape[-1]
                if len(other) == 1:
                    try:
                        name = self._stored(other[0])
                    except RepairError:
                        name = None
                    if name is not None and self._array(name).size == units:
                        found["bias"] = name
        elif len(n.input) > 2 and n.input[2]:
            found["bias"] = self._stored(n.input[2])
        return found

    def _array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        from equivcheck.backends.onnxruntime import node_attribute

        return numpy_helper.to_array(node_attribute(self.producer[name], "value", None))

    def _store(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        old = self._array(name)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value, dtype=old.dtype), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            for a in self.producer[name].attribute:
                if a.name == "value":
                    a.t.CopyFrom(tensor)

    def weights(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        f = self._find(layer)
        kernel = self._array(f["kernel"])
        if f["scale"] != 1:
            kernel = kernel * kernel.dtype.type(f["scale"])
        bias = None
        if f["bias"] is not None:
            b = self._array(f["bias"]).reshape(-1)
            units = f.get("units", b.size)
            bias = np.broadcast_to(b * b.dtype.type(f["bias_scale"]), (units,)).copy()
        return kernel, bias

    def set(self, layer: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        f = self._find(layer)
        old = self._array(f["kernel"])
        self._store(f["kernel"], np.asarray(kernel, np.float64).reshape(old.shape) / f["scale"])
        if bias is not None and f["bias"] is not None:
            old_b = self._array(f["bias"])
            b = np.asarray(bias, np.float64) / f["bias_scale"]
            self._store(f["bias"], b.reshape(old_b.shape) if old_b.size == b.size else b)

    def names(self, layer: str) -> tuple[str, ...]:
        f = self._find(layer)
        return (f["kernel"],) + ((f["bias"],) if f["bias"] is not None else ())

    def read(self, layer: str) -> tuple[str, str | None]:
        f = self._find(layer)
        kernel = f"source_init[{f['kernel']!r}]" + (f" * {f['scale']!r}" if f["scale"] != 1 else "")
        if f["bias"] is None:
            return kernel, None
        bias = f"source_init[{f['bias']!r}].reshape(-1)" + (f" * {f['bias_scale']!r}" if f["bias_scale"] != 1 else "")
        return kernel, bias

    def write(self, layer: str, kernel: str, bias: str | None) -> list[str]:
        f = self._find(layer)
        out = []
        for name, expr, scale in ((f["kernel"], kernel, f["scale"]), (f["bias"], bias, f["bias_scale"])):
            if name is None or expr is None:
                continue
            if name not in self.inits:
                out.append(f"# {name!r} is the value of a Constant node: set its 'value' attribute to the array below")
            dtype = self._array(name).dtype.name
            value = f"({expr}) / {scale!r}" if scale != 1 else expr
            out.append(f"converted_init[{name!r}].CopyFrom(numpy_helper.from_array("
                       f"np.ascontiguousarray({value}, dtype=np.{dtype}), {name!r}))")
        return out


class _Flax(_Side):
    """A Flax linen model ``(module, variables)``: layer ``a/b`` holds ``variables["params"]["a"]["b"]``."""

    write_header = ("import jax.numpy as jnp", "",
                    'converted_params = converted_model[1]["params"]  # converted_model = (module, variables)')

    def _params(self, layer: str) -> tuple[list[str], dict[str, Any]]:
        from collections.abc import Mapping

        root = self.model[1]["params"]
        path = _base(layer).split("/")
        tree: Any = root
        for part in path:
            if not isinstance(tree, Mapping) or part not in tree:
                if isinstance(root, Mapping) and "kernel" in root and path == [_base(layer)]:
                    return [], root  # the root module is the layer itself
                raise RepairError(f"layer={layer!r} is not in the Flax model's params: expected a module path such as "
                                  "'block/Dense_0'")
            tree = tree[part]
        return path, tree

    def weights(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        _, p = self._params(layer)
        return np.asarray(p["kernel"]), None if p.get("bias") is None else np.asarray(p["bias"])

    def set(self, layer: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        import jax.numpy as jnp

        _, p = self._params(layer)
        for key, value in (("kernel", kernel), ("bias", bias)):
            if value is not None and p.get(key) is not None:
                p[key] = jnp.asarray(np.asarray(value, dtype=np.asarray(p[key]).dtype))

    def names(self, layer: str) -> tuple[str, ...]:
        path, p = self._params(layer)
        return tuple("/".join(["params", *path, key]) for key in ("kernel", "bias") if p.get(key) is not None)

    def _index(self, layer: str) -> str:
        return "".join(f"[{part!r}]" for part in self._params(layer)[0])

    def read(self, layer: str) -> tuple[str, str | None]:
        at = f'source_model[1]["params"]{self._index(layer)}'
        return f'np.asarray({at}["kernel"])', (f'np.asarray({at}["bias"])' if len(self.names(layer)) > 1 else None)

    def write(self, layer: str, kernel: str, bias: str | None) -> list[str]:
        at = f"converted_params{self._index(layer)}"
        out = [f'{at}["kernel"] = jnp.asarray(np.ascontiguousarray({kernel}))']
        if bias is not None and len(self.names(layer)) > 1:
            out.append(f'{at}["bias"] = jnp.asarray(np.ascontiguousarray({bias}))')
        return out


def _tree_copy(tree: Any) -> Any:
    """Nested mappings as new plain dicts (the arrays shared: they are replaced, never written into)."""
    from collections.abc import Mapping

    return {k: _tree_copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


_SIDES: dict[str, type[_Side]] = {"torch": _Torch, "keras": _Keras, "tf_keras": _TfKeras, "onnx": _Onnx,
                                   "flax": _Flax}
#: Files a torch state dict is written to (as ``equivcheck check-models`` reads them).
STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


def _copy(model: Any, framework: str) -> Any:
    """A copy of the converted model whose weights can change without touching the original."""
    if framework == "torch":
        return copy.deepcopy(model)
    if framework in ("keras", "tf_keras"):
        import importlib

        keras = importlib.import_module("keras" if framework == "keras" else "tf_keras")
        if isinstance(model, (str, os.PathLike)):  # an .h5 file: read afresh, a model of its own
            return _TfKeras(model).model
        try:
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())
        except Exception as exc:
            from equivcheck.errors import framework_message

            raise RepairError(f"Keras model {model.name!r} cannot be copied to repair it ({framework_message(exc)}): "
                              "rebuild it as a functional or Sequential model of built-in layers") from None
        return clone
    if framework == "flax":
        return (model[0], _tree_copy(model[1]))
    import onnx

    from equivcheck.backends.onnxruntime import read_onnx_model

    proto, _ = read_onnx_model(model, "converted", error=RepairError)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


# -- the fixes -----------------------------------------------------------------------------------
def _specs(row: LayerRow) -> tuple[Any, Any]:
    from equivcheck.serialize import spec_from_dict

    if row.source_spec is None or row.converted_spec is None:
        raise RepairError(f"cannot repair {row.label}: {row.diagnosis or 'the layers could not be described'}")
    return spec_from_dict(row.source_spec), spec_from_dict(row.converted_spec)


def _refusal(row: LayerRow) -> str:
    why = _NOT_WEIGHTS.get(row.mistake)
    if why is None and row.source_spec is None:
        why = "the layers could not be described"
    return "" if why is None else f"cannot repair {row.label} ({row.mistake or row.diagnosis}): {why}"


def _folded(row: LayerRow, target: Any, framework: str) -> str:
    """The note for a dense layer whose graph permutes the map before flattening (the fix folds it into the kernel)."""
    flatten = getattr(target, "flatten", None) or ""
    if len(flatten) < 2:
        return ""
    from equivcheck.specs import spatial_letters

    canonical = "C" + spatial_letters(len(flatten) - 1)
    native = {canonical} if framework in ("torch", "onnx") else {canonical, canonical[1:] + canonical[0]}
    if flatten in native and "the graph permutes the map" not in row.boundary:
        return ""
    return (f"the graph permutes the map to {target.flatten} before flattening: the fix folds that permutation into "
            f"the kernel of {row.converted}, the next linear layer (its weights changed, the graph is unchanged)")


def _failing(check: ModelCheck) -> list[LayerRow]:
    rows, seen = [], set()
    for row in check.layers:
        if row.verdict == "fail" and (row.source, row.converted) not in seen:
            seen.add((row.source, row.converted))
            rows.append(row)
    return rows


def _plan_fixes(check: ModelCheck, source: Any, converted: Any) -> tuple[Patch, list[tuple[LayerRow, Any, Any]]]:
    """The patch, and per fix (row, kernel, bias) in the converted model's stored layout; refusals raise."""
    from equivcheck.planning import convert, plan

    if source is None or converted is None:
        raise RepairError("this ModelCheck keeps no models to repair (it was not made by check_models in this process): "
                          "run equivcheck.check_models(source, converted) and repair its result")
    failing = _failing(check)
    if check.verdict == "fail" and not failing:
        raise RepairError(f"cannot repair: {check.reason} (no failing layer to change: no weight fix identified)")
    for row in failing:
        refused = _refusal(row)
        if refused:
            cause = getattr(check, "likely_cause", "")
            raise RepairError(f"{refused} (likely cause: {cause})" if cause else refused)
    s_fw, c_fw = _framework(source), _framework(converted)
    src, dst = _SIDES[s_fw](source), _SIDES[c_fw](converted)
    out = Patch(s_fw, c_fw)
    values = []
    for row in failing:
        s_spec, c_spec = _specs(row)
        kernel, bias = src.weights(row.source)
        old_kernel, old_bias = dst.weights(row.converted)
        try:
            right = plan(s_spec, c_spec)
            new_kernel, new_bias = convert(s_spec, c_spec, np.asarray(kernel).reshape(s_spec.kernel_shape), bias)
        except EquivcheckError as exc:
            raise RepairError(f"cannot repair {row.label} ({row.mistake}): no weight mapping: {exc}") from None
        new_kernel = np.asarray(new_kernel).reshape(old_kernel.shape).astype(old_kernel.dtype)
        if new_bias is not None and old_bias is not None:
            new_bias = np.asarray(new_bias).astype(old_bias.dtype)
        mapping = right.simplify().code("numpy")
        k_expr, b_expr = src.read(row.source)
        lines = [f"w = {k_expr}"]
        if tuple(kernel.shape) != tuple(s_spec.kernel_shape):
            lines.append(f"w = w.reshape{tuple(s_spec.kernel_shape)}")
        if c_spec.bias:
            lines.append(f"b = {b_expr}" if b_expr is not None else
                         f"b = np.zeros({tuple(c_spec.bias_shape)!r}, w.dtype)  # the source layer has no bias")
        folded = _folded(row, c_spec, c_fw)
        lines += dst.write(row.converted, mapping, "b" if c_spec.bias else None)
        out.fixes.append(LayerFix(row.source, row.converted, row.mistake, c_fw, dst.names(row.converted),
                                  src.names(row.source), mapping, lines, folded))
        values.append((row, new_kernel, new_bias))
    return out, values


def patch(check: ModelCheck, source: Any, converted: Any) -> Patch:
    """Per failing layer of ``check``: the converted parameters, the right mapping, the converter's lines."""
    return _plan_fixes(check, source, converted)[0]


def repair(check: ModelCheck, source: Any = None, converted: Any = None, *, mutants: bool = True,
           recheck: Any = None) -> Repaired:
    """A copy of ``converted`` with every failing layer's weights the source's through the right mapping,
    checked again from scratch against ``source`` by ``recheck`` (``check_models``, which the result keeps).
    Raises :class:`RepairError` (one line) naming a failing layer that no weight change fixes."""
    check_models = recheck or check._models.get("recheck")
    if check_models is None:
        raise RepairError("this ModelCheck keeps no models to repair (it was not made by check_models in this process): "
                          "run equivcheck.check_models(source, converted) and repair its result")
    found, values = _plan_fixes(check, source, converted)
    fixed = _copy(converted, found.framework)
    side = _SIDES[found.framework](fixed)
    for row, kernel, bias in values:
        side.set(row.converted, kernel, bias)
    again = check_models(source, side.model, input_shape=check.input_shape or None, dtypes=check.dtypes,
                         seed=check.seed, mutants=mutants)
    return Repaired(side.model, again, found)


# -- files -----------------------------------------------------------------------------------
def format_of(path: str | os.PathLike[str]) -> str:
    """``keras``, ``torch`` (a state dict) or ``onnx``, from a model file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix == ".onnx":
        return "onnx"
    if suffix in STATE_DICT_SUFFIXES:
        return "torch"
    raise FileFormatError(f"output={str(path)!r} has suffix {suffix!r}: expected .keras, .onnx or a torch state dict "
                          f"({', '.join(STATE_DICT_SUFFIXES)})")


def check_fix_output(out: str | os.PathLike[str], like: str | os.PathLike[str], *, force: bool = False) -> None:
    """Refuse ``--fix OUT`` before any work: another format than ``like`` (the converted file), or an existing file."""
    from equivcheck.files import check_output

    want, got = format_of(like), format_of(out)
    if want != got:
        raise FileFormatError(f"--fix={str(out)!r} is a {got} file but the converted model {str(like)!r} is {want}: "
                              "write the repaired model in the converted model's format")
    check_output(out, force=force)


def save_model(model: Any, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write a repaired model atomically: ``.keras``, a torch state dict (suffix decides) or ``.onnx``."""
    kind = format_of(path)
    if kind == "onnx":
        from equivcheck.files import atomic_path

        data = model.SerializeToString()
        with atomic_path(path, force=force) as tmp:
            tmp.write_bytes(data)
        return
    from equivcheck import files

    if kind == "keras":
        files.save_keras_model(model, path, force=force)
        return
    from equivcheck._arrays import to_numpy

    files.save_arrays(path, {k: to_numpy(v.detach().cpu()) for k, v in model.state_dict().items()}, force=force)
