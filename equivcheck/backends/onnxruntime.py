"""ONNX Runtime (CPU execution provider): a single-node ONNX model per layer.

A dense spec is ``[Transpose →] Flatten(axis=1) → Gemm``, its kernel Gemm's ``B`` as stored
(``transB=1`` for an (out, in) kernel, 0 for (in, out)), or ``MatMul`` + ``Add`` for the presets
that export dense layers that way (tf2onnx); a conv spec is ``Conv`` or
``ConvTranspose`` (weights ``(M, C/group, *k)`` and ``(C, M/group, *k)``, cross-correlation,
explicit ``pads``, or ``auto_pad="SAME_UPPER"`` for TensorFlow's "same" when undilated), with
``Transpose`` nodes around it for a channels-last map. The graph is built with
:mod:`onnx.helper` and checked by :func:`onnx.checker.check_model` (shape inference included)
once per spec; the weights are initializers, serialised into the model by ``set_weights``, and
the next call builds a fresh ``InferenceSession`` on it. ONNX Runtime thus sees constant
weights and optimises them (pre-packing, casts) as it does in an exported model; feeding them
as graph inputs to one session would cost 0.04 ms instead of about 1 ms per new weights
(``benchmarks/runtimes.py``) but runs other kernels. ``SessionOptions.add_initializer``, which
skips the serialisation, gave wrong float16 results on ONNX Runtime 1.32 (the model's
placeholder values were used).
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache, lru_cache
from typing import Any

import numpy as np

from equivcheck.backends.base import (
    Backend,
    Layer,
    check_bias,
    check_input,
    check_kernel,
    flatten_permutation,
    np_dtype,
    stored_kernel,
    to_native_kernel,
)
from equivcheck.errors import EquivcheckError, SpecError, framework_message
from equivcheck.specs import CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec

OPSET = 17
IR_VERSION = 8
PROVIDER = "CPUExecutionProvider"
# ONNX TensorProto element types by dtype name.
ELEM_TYPES = {"float64": 11, "float32": 1, "float16": 10, "bfloat16": 16}


#: Presets whose dense layer is ``MatMul`` + ``Add`` (an (in, out) weight) rather than ``Gemm``.
MATMUL_PRESETS = ("tf2onnx",)


def node_attribute(node: Any, name: str, default: Any) -> Any:
    """Attribute ``name`` of an ONNX ``NodeProto`` as a Python value (strings decoded), or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def read_onnx_model(obj: Any, role: str, *, error: type[EquivcheckError] = SpecError,
                    hint: str = "") -> tuple[Any, str]:
    """``(ModelProto, how to name it in a message)`` for a ``ModelProto``, an ``.onnx`` path or an
    ``InferenceSession`` (the file or bytes it was made from); a bad one raises ``error`` in one line."""
    import os

    where = f"the {role}"
    if isinstance(obj, (str, os.PathLike)):  # a bad path is refused before onnx's import (most of a second)
        obj, where = _model_file(obj, role, error, hint)
    import onnx

    if isinstance(obj, onnx.ModelProto):
        return obj, where
    if not isinstance(obj, str):  # an InferenceSession
        obj = getattr(obj, "_model_path", None) or getattr(obj, "_model_bytes", None)
        if obj is None:
            raise error(f"{role}=InferenceSession keeps no model to read: pass the ModelProto or the .onnx path")
        obj, where = (obj, f"the {role} session's model") if isinstance(obj, bytes) else \
            _model_file(obj, role, error, hint)
    try:
        return (onnx.load_model_from_string(obj) if isinstance(obj, bytes) else onnx.load(obj)), where
    except Exception as exc:
        raise error(f"{where} is not an ONNX model: {framework_message(exc)}") from None


def _model_file(path: Any, role: str, error: type[EquivcheckError], hint: str) -> tuple[str, str]:
    """``(path, how to name it)`` for an existing regular file; else ``error`` saying what the path is."""
    import os

    path = os.fspath(path)
    where = f"{role} file={path!r}"
    if not os.path.isfile(path):
        what = "is not a regular file (a folder, FIFO or device)" if os.path.exists(path) else "not found"
        raise error(f"{where} {what}: expected an .onnx file{hint}")
    return path, where


def op_type(spec: LayerSpec) -> str:
    """The ONNX operator that realises ``spec``: Gemm (or MatMul + Add), Conv or ConvTranspose."""
    if isinstance(spec, DenseSpec):
        matmul = spec.kernel_layout == "IO" and (spec.name or "").split(":")[0] in MATMUL_PRESETS
        return "MatMul" if matmul else "Gemm"
    return "ConvTranspose" if spec.transposed else "Conv"


def _native_layout(spec: ConvSpec) -> str:
    return ("IO" if spec.transposed else "OI") + spec.letters


def native_shape(spec: LayerSpec) -> tuple[int, ...]:
    """ONNX's weight shape: Gemm's B as stored, Conv ``(M, C/group, *k)``, ConvTranspose ``(C, M/group, *k)``."""
    if isinstance(spec, DenseSpec):
        return spec.kernel_shape
    g = spec.groups
    if spec.transposed:
        return (spec.in_channels, spec.out_channels // g, *spec.kernel_size)
    return (spec.out_channels, spec.in_channels // g, *spec.kernel_size)


def _conv_attributes(spec: ConvSpec) -> dict[str, Any]:
    attrs: dict[str, Any] = dict(kernel_shape=list(spec.kernel_size), strides=list(spec.stride),
                                 dilations=list(spec.dilation), group=spec.groups)
    if spec.padding == "same" and all(d == 1 for d in spec.dilation):
        # TensorFlow's "same": the odd pad after. ONNX Runtime refuses auto_pad with dilation > 1.
        attrs["auto_pad"] = "SAME_UPPER"
    else:
        pads = spec.pads()
        attrs["pads"] = [lo for lo, _ in pads] + [hi for _, hi in pads]
    if spec.transposed and any(spec.output_padding):
        attrs["output_padding"] = list(spec.output_padding)
    return attrs


def build_model(spec: LayerSpec, dtype: str, kernel: np.ndarray | None = None, bias: np.ndarray | None = None) -> Any:
    """The checked single-layer ``ModelProto`` of ``spec``: weights ``W`` (ONNX's layout) and ``B`` as initializers.

    Input ``x`` is ``(N, *spec.input_shape)``, output ``y`` is ``(N, *spec.output_shape)``. The graph is
    checked (shape inference included) with the weights declared as inputs, so a 411 MB kernel is never
    copied by the checker; they then become initializers holding ``kernel`` and ``bias``, or no data yet
    where None (:func:`fill` sets them).
    """
    import onnx
    from onnx import helper

    elem = ELEM_TYPES[dtype]
    nodes, x = [], "x"
    weights = ["W"] + (["B"] if spec.bias else [])
    to_first = from_first = None
    if isinstance(spec, DenseSpec):
        perm = flatten_permutation(spec)
        if perm is not None:
            nodes.append(helper.make_node("Transpose", [x], ["x_t"], perm=list(perm)))
            x = "x_t"
        nodes.append(helper.make_node("Flatten", [x], ["x_flat"], axis=1))
        if op_type(spec) == "MatMul":  # as tf2onnx exports a Keras Dense
            nodes.append(helper.make_node("MatMul", ["x_flat", "W"], ["y_mm" if spec.bias else "y"]))
            if spec.bias:
                nodes.append(helper.make_node("Add", ["y_mm", "B"], ["y"]))
        else:
            nodes.append(helper.make_node("Gemm", ["x_flat", *weights], ["y"], transB=int(spec.kernel_layout == "OI")))
    else:
        n = spec.rank + 2
        if spec.data_format == CHANNELS_LAST:
            to_first, from_first = [0, n - 1, *range(1, n - 1)], [0, *range(2, n), 1]
            nodes.append(helper.make_node("Transpose", [x], ["x_t"], perm=to_first))
            x = "x_t"
        out = "y_t" if from_first else "y"
        nodes.append(helper.make_node(op_type(spec), [x, *weights], [out], **_conv_attributes(spec)))
        if from_first:
            nodes.append(helper.make_node("Transpose", [out], ["y"], perm=from_first))
    shapes = {"W": native_shape(spec), "B": spec.bias_shape}
    graph = helper.make_graph(
        nodes, f"equivcheck_{op_type(spec)}",
        [helper.make_tensor_value_info("x", elem, ["N", *spec.input_shape]),
         *(helper.make_tensor_value_info(w, elem, list(shapes[w])) for w in weights)],
        [helper.make_tensor_value_info("y", elem, ["N", *spec.output_shape])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="equivcheck")
    model.ir_version = IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)  # full_check: shape inference must agree with the spec
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"onnx model of {spec.describe()} is invalid: {first}") from None
    del model.graph.input[1:]
    for w in weights:  # declared, data to come
        model.graph.initializer.add(name=w, data_type=elem, dims=shapes[w])
    fill(model, dtype, kernel, bias)
    return model


def fill(model: Any, dtype: str, kernel: np.ndarray | None, bias: np.ndarray | None) -> None:
    """Write ``kernel`` (ONNX's layout) and ``bias`` into the model's initializers ``W`` and ``B`` (None: keep)."""
    dt = np_dtype(dtype)
    for init in model.graph.initializer:
        value = {"W": kernel, "B": bias}.get(init.name)
        if value is not None:
            init.raw_data = np.ascontiguousarray(value, dtype=dt).astype(dt.newbyteorder("<"), copy=False).tobytes()


def session_options(ort: Any) -> Any:
    """One thread, errors only: a single small layer gains nothing from a thread pool."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


# What one serialised protobuf can hold, less room for the graph.
_PROTOBUF_MAX = (1 << 31) - (1 << 20)


@lru_cache(maxsize=256)
def _checked_model(spec: LayerSpec, dtype: str) -> bytes:
    """The serialised, checked model of ``spec`` without weight data (building and checking is half a case)."""
    return build_model(spec, dtype).SerializeToString()


class OnnxLayer(Layer):
    """A single-node ONNX model of ``spec`` and the ``InferenceSession`` running it.

    The weights live in the model's initializers (``W`` in ONNX's layout, ``B``; zeros until set);
    a new session is built on the first call after ``set_weights``.
    """

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        import onnx
        import onnxruntime

        self._ort = onnxruntime
        self.model = onnx.ModelProto.FromString(_checked_model(spec, dtype))
        self._inits = {t.name: t for t in self.model.graph.initializer}
        self._session: Any = None

    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        # One copy either way: the values are serialised into the model (``copy`` needs no other care).
        spec = self.spec
        check_kernel(spec, kernel)
        check_bias(spec, bias)
        native = np.asarray(kernel) if isinstance(spec, DenseSpec) else to_native_kernel(spec, kernel, _native_layout(spec))
        fill(self.model, self.dtype, native, bias)
        self._session = None

    def _fill_unset(self) -> None:
        """Zeros (all-zero bytes) in an initializer never set."""
        size = np_dtype(self.dtype).itemsize
        for init in self._inits.values():
            if not init.raw_data:
                init.raw_data = bytes(math.prod(init.dims) * size)

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        from onnx import numpy_helper

        self._fill_unset()
        spec = self.spec
        native = numpy_helper.to_array(self._inits["W"])
        kernel = native if isinstance(spec, DenseSpec) else stored_kernel(spec, native, _native_layout(spec))
        return kernel, numpy_helper.to_array(self._inits["B"]) if "B" in self._inits else None

    def session(self) -> Any:
        """The ``InferenceSession`` on the current weights (built on first use after ``set_weights``)."""
        if self._session is None:
            ort = self._ort
            self._fill_unset()
            self._session = ort.InferenceSession(self.model.SerializeToString(), session_options(ort), providers=[PROVIDER])
        return self._session

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np_dtype(self.dtype))
        check_input(self.spec, x)
        return self.session().run(None, {"x": x})[0]


@cache
def kernel_missing(op: str, rank: int, dtype: str) -> str | None:
    """Why ONNX Runtime's CPU provider cannot run ``op`` of ``rank`` in ``dtype`` (a probe), or None."""
    import onnxruntime as ort

    if op in ("Gemm", "MatMul"):
        spec: LayerSpec = DenseSpec(channels=2, units=2, kernel_layout="OI" if op == "Gemm" else "IO",
                                    name="tf2onnx:dense" if op == "MatMul" else "")
    else:
        spec = ConvSpec(2, 2, (1,) * rank, transposed=op == "ConvTranspose")
    dt = np_dtype(dtype)
    try:
        model = build_model(spec, dtype, np.zeros(spec.kernel_shape, dt), np.zeros(2, dt))
    except SpecError:  # the operator's schema refuses the type
        return f"ONNX {op} (opset {OPSET}) does not take {dtype} tensors"
    try:
        ort.InferenceSession(model.SerializeToString(), session_options(ort), providers=[PROVIDER])
    except Exception as exc:  # NOT_IMPLEMENTED / INVALID_GRAPH: no kernel registered for this type
        text = str(exc).split(":", 2)[-1].strip().splitlines()[0]
        return f"onnxruntime {ort.__version__} {PROVIDER} has no {op} kernel for {dtype}: {text}"
    return None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    module = "onnxruntime"

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

    def version(self) -> str:
        ort = self.load()
        import onnx

        return f"{ort.__version__} ({PROVIDER}, onnx {onnx.__version__}, opset {OPSET})"

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        why = super().unsupported(spec, dtype)
        if why or not self.available() or not isinstance(spec, (DenseSpec, ConvSpec)):
            return why
        self.load()
        nbytes = math.prod(spec.kernel_shape) * np_dtype(dtype).itemsize
        if nbytes > _PROTOBUF_MAX:
            return f"the kernel's {nbytes} bytes exceed the 2 GiB an in-memory ONNX model (protobuf) can hold"
        return kernel_missing(op_type(spec), spec.rank if isinstance(spec, ConvSpec) else 0, dtype)

    def build(self, spec: LayerSpec, dtype: str = "float32") -> OnnxLayer:
        self._check(spec, dtype)
        self.load()
        return OnnxLayer(spec, dtype)
