"""Weights inside runtime model files: ONNX initializers and TFLite buffers, read without running anything.

``.onnx`` is parsed with ``onnx.load(..., load_external_data=False)``; external data is read
here, only from regular files inside the model's own folder, after its declared size passed
the memory guard. ``.tflite`` is read by a minimal, bounds-checked flatbuffer walk (no
interpreter). Both graphs are checked first: a cycle or an operator the format does not
define is refused with one line. Each index also names the graph's linear nodes (Gemm,
MatMul, Conv, ConvTranspose; FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV,
CONV_3D, CONV_3D_TRANSPOSE), so a kernel and bias can be picked without naming them.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck import file_index
from equivcheck.errors import EquivcheckError, FileFormatError
from equivcheck.file_index import Entry, Index, corrupt, dtype_problem, read_exactly
from equivcheck.memory import require_memory

_ONNX_LINEAR = {"Gemm": 2, "MatMul": None, "Conv": 2, "ConvTranspose": 2}  # op -> input index of its bias
_ONNX_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _onnx_dtypes() -> dict[int, np.dtype]:
    import ml_dtypes

    plain = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
             12: "<u4", 13: "<u8"}
    return {**{k: np.dtype(v) for k, v in plain.items()}, 16: np.dtype(ml_dtypes.bfloat16)}


def _check_dag(nodes: list[tuple[str, list[str], list[str]]], where: str) -> None:
    """Refuse a graph whose nodes (name, inputs, outputs) feed each other in a cycle."""
    producer = {out: i for i, (_, _, outs) in enumerate(nodes) for out in outs if out}
    waiting = [len({producer[x] for x in ins if x in producer}) for _, ins, _ in nodes]
    users: dict[int, list[int]] = {}
    for i, (_, ins, _) in enumerate(nodes):
        for j in {producer[x] for x in ins if x in producer}:
            users.setdefault(j, []).append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in users.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if done < len(nodes):
        stuck = next(nodes[i][0] for i, n in enumerate(waiting) if n)
        raise FileFormatError(f"input={where} has a cycle in its graph (node {stuck[:60]!r} depends on its own output): "
                              "expected an acyclic model")


def _linear_summary(found: list[tuple[str, str, str | None]], names: Iterable[str]) -> str:
    if found:
        listed = ", ".join(f"{op} {node[:40]!r} (weight {w[:40]!r})" for op, node, w in found[:8])
        return f"{len(found)} linear nodes: {listed}"
    return f"no linear node with a stored weight; it holds {', '.join(list(names)[:12])[:200] or 'no arrays'}"


@contextlib.contextmanager
def open_index(p: Path) -> Iterator[Index]:
    """The arrays ``p`` declares (see :func:`equivcheck.file_index.open_index`), ``.onnx`` and ``.tflite`` models included."""
    with file_index.open_index(p, {".onnx": onnx_index, ".tflite": tflite_index}) as index:
        yield index


# -- ONNX ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def onnx_index(p: Path, where: str) -> Iterator[Index]:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise FileFormatError("reading .onnx files needs the 'onnx' package: pip install 'equivcheck[onnx]'") from None
    require_memory(f"reading {where}", 2 * os.stat(p).st_size)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except DecodeError as exc:
        raise FileFormatError(f"input={where} is not an ONNX model: truncated or corrupt (protobuf {type(exc).__name__})") from None
    graph = model.graph
    _check_onnx_ops(model, where)
    _check_dag([(n.name or n.op_type, list(n.input), list(n.output)) for n in graph.node], where)
    folder = p.resolve().parent
    dtypes = _onnx_dtypes()
    index = Index(graph=True)
    for t in graph.initializer:
        index[t.name] = _onnx_entry(t, where, folder, dtypes)
    for s in graph.sparse_initializer:
        name = s.values.name
        index[name] = Entry(name, tuple(int(d) for d in s.dims), "sparse", lambda: np.empty(0),
                            "a sparse initializer is not a plain array: store it dense")
    adds: dict[str, list[Any]] = {}  # value name -> the Add nodes reading it
    for n in graph.node:
        if n.op_type == "Add" and len(n.input) == 2:
            for x in set(n.input):
                adds.setdefault(x, []).append(n)
    found = []
    for n in graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        bias_at = _ONNX_LINEAR.get(n.op_type)
        if n.op_type in _ONNX_LINEAR and len(n.input) > 1 and n.input[1] in index:
            bias = n.input[bias_at] if bias_at is not None and len(n.input) > bias_at and n.input[bias_at] else None
            if n.op_type == "MatMul" and n.output:
                bias = _matmul_bias(adds.get(n.output[0], []), n.output[0], index)
            index.linear[n.input[1]] = bias if bias in index else None
            found.append((n.op_type, n.name, n.input[1]))
    index.why = _linear_summary(found, index)
    yield index


def _matmul_bias(adds: list[Any], output: str, index: Index) -> str | None:
    """A MatMul's bias: the stored operand of the one Add that reads its output."""
    if len(adds) == 1:
        other = [x for x in adds[0].input if x != output]
        return other[0] if other and other[0] in index else None
    return None


def _check_onnx_ops(model: Any, where: str) -> None:
    import onnx.defs

    declared = {o.domain for o in model.opset_import} | {"", "ai.onnx"}
    local = {(f.domain, f.name) for f in model.functions}
    for n in model.graph.node:
        domain = "" if n.domain == "ai.onnx" else n.domain
        if (n.domain, n.op_type) in local:
            continue
        if domain in _ONNX_STANDARD_DOMAINS and not onnx.defs.has(n.op_type, domain):
            raise FileFormatError(f"input={where} node {n.name[:60]!r} has op_type={n.op_type[:60]!r}, which is not an ONNX "
                                  "operator: refused")
        if domain not in declared:
            raise FileFormatError(f"input={where} node {n.name[:60]!r} uses domain={n.domain[:60]!r}, which the model does "
                                  "not import: refused")


def _onnx_entry(t: Any, where: str, folder: Path, dtypes: dict[int, np.dtype]) -> Entry:
    shape = tuple(int(d) for d in t.dims)
    name = t.name
    if any(d < 0 for d in shape):
        raise FileFormatError(f"initializer {name[:60]!r} in {where} declares shape={shape[:8]}: expected sizes >= 0")
    dtype = dtypes.get(t.data_type)
    if dtype is None:
        from onnx import TensorProto

        kind = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
        return Entry(name, shape, str(kind).lower(), lambda: np.empty(0), f"dtype={str(kind).lower()} is not read by equivcheck")
    if t.HasField("segment"):
        raise FileFormatError(f"initializer {name[:60]!r} in {where} is a segment of a larger tensor: refused")
    declared = math.prod(shape) * dtype.itemsize
    if t.data_location == 1:  # TensorProto.EXTERNAL
        return _onnx_external(t, name, shape, dtype, where, folder, declared)
    if t.raw_data:
        if len(t.raw_data) != declared:
            raise FileFormatError(f"initializer {name[:60]!r} in {where} declares shape={shape} dtype={dtype} "
                                  f"({declared} bytes) but holds {len(t.raw_data)}: truncated or re-declared")
        return Entry(name, shape, dtype.newbyteorder("="),
                     lambda: np.frombuffer(t.raw_data, dtype).astype(dtype.newbyteorder("=")).reshape(shape))
    field = _typed_field(t, dtype)
    if len(field) != math.prod(shape):
        raise FileFormatError(f"initializer {name[:60]!r} in {where} declares shape={shape} ({math.prod(shape)} values) "
                              f"but holds {len(field)}: truncated or re-declared")
    return Entry(name, shape, dtype.newbyteorder("="), lambda: _from_typed(field, dtype).reshape(shape))


def _typed_field(t: Any, dtype: np.dtype) -> Any:
    if dtype.kind == "f" and dtype.itemsize == 4:
        return t.float_data
    if dtype.kind == "f" and dtype.itemsize == 8:
        return t.double_data
    if dtype.kind == "i" and dtype.itemsize == 8:
        return t.int64_data
    if dtype.kind == "u" and dtype.itemsize >= 4:
        return t.uint64_data
    return t.int32_data  # the 8- and 16-bit types, bool, float16 and bfloat16 (as their bit patterns)


def _from_typed(field: Any, dtype: np.dtype) -> np.ndarray:
    if dtype.itemsize == 2 and dtype.kind not in "iu":  # float16 / bfloat16 bit patterns
        return np.asarray(field, np.int64).astype(np.uint16).view(dtype.newbyteorder("="))
    return np.asarray(field).astype(dtype.newbyteorder("="))


def _onnx_external(t: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, where: str, folder: Path,
                   declared: int) -> Entry:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    label = f"initializer {name[:60]!r} in {where} keeps its data in location={location[:120]!r}"
    if not location or os.path.isabs(location) or ".." in Path(location).parts or "\\" in location or "\0" in location:
        raise FileFormatError(f"{label}: expected a relative file name inside the model's folder")
    target = (folder / location).resolve()
    if folder not in target.parents:
        raise FileFormatError(f"{label}, which resolves outside the model's folder: refused")
    try:
        size = os.stat(target).st_size if stat.S_ISREG(os.stat(target).st_mode) else -1
    except OSError:
        size = -1
    if size < 0:
        raise FileFormatError(f"{label}, which does not exist or is not a file")
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", size - int(info.get("offset", 0))))
    except ValueError:
        raise FileFormatError(f"{label} with a malformed offset or length") from None
    if offset < 0 or length != declared or offset + length > size:
        raise FileFormatError(f"{label}: declared shape={shape} dtype={dtype} needs {declared} bytes, the entry says "
                              f"{length} at offset {offset} of a {size}-byte file")

    def read() -> np.ndarray:
        with open(target, "rb") as fh:
            fh.seek(offset)
            return read_exactly(fh, shape, dtype).astype(dtype.newbyteorder("="))

    return Entry(name, shape, dtype.newbyteorder("="), read)


# -- TFLite --------------------------------------------------------------------------------------
_TFLITE_LINEAR = {9: "FULLY_CONNECTED", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 67: "TRANSPOSE_CONV", 132: "CONV_3D",
                  141: "CONV_3D_TRANSPOSE"}
_TFLITE_WEIGHT_BIAS = {67: (1, 3), 141: (1, 3)}  # (weight, bias) input slots; the others take (1, 2)
_TFLITE_MAX_BUILTIN = 209  # the last BuiltinOperator of the TFLite schema this reader knows
_TFLITE_DEQUANTIZE = 6
_TFLITE_DTYPES = {0: "<f4", 1: "<f2", 2: "<i4", 3: "u1", 4: "<i8", 6: "?", 7: "<i2", 9: "i1", 10: "<f8", 12: "<u8",
                  15: "<u4", 16: "<u2", 18: "bfloat16"}


class _DecodeBudget(FileFormatError):
    """A TFLite file whose names and tables decode to far more than its own size."""


#: What the index may decode from a TFLite file (names, shapes, operator lists), beyond the file's own size.
TFLITE_DECODE_SLACK = 1 << 20


class _Flat:
    """Bounds-checked reads of a flatbuffer: every offset is checked to lie inside the buffer, and what is
    decoded (strings, integer lists, table lists) is counted as decoded, a shared reference each time it is read:
    past twice the file's size plus :data:`TFLITE_DECODE_SLACK` the file is refused (a model whose tensors all
    name one long string would otherwise decode gigabytes from a megabyte)."""

    def __init__(self, data: bytes, where: str = "the model") -> None:
        self.data = data
        self.where = where
        self.decoded = 0
        self.budget = 2 * len(data) + TFLITE_DECODE_SLACK

    def _decode(self, nbytes: int) -> None:
        self.decoded += nbytes
        if self.decoded > self.budget:
            raise _DecodeBudget(f"input={self.where} decodes more than {self.budget} bytes of names and tables from a "
                                  f"{len(self.data)}-byte file (shared references read many times): refused")

    def _at(self, fmt: str, pos: int) -> int:
        if not 0 <= pos <= len(self.data) - struct.calcsize(fmt):
            raise IndexError(f"flatbuffer offset {pos} outside the file's {len(self.data)} bytes")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def ref(self, pos: int) -> int:
        return pos + self._at("<I", pos)

    def field(self, table: int, i: int) -> int | None:
        vtable = table - self._at("<i", table)
        if 4 + 2 * i >= self._at("<H", vtable):
            return None
        off = self._at("<H", vtable + 4 + 2 * i)
        return table + off if off else None

    def scalar(self, table: int, i: int, fmt: str, default: int = 0) -> int:
        pos = self.field(table, i)
        return default if pos is None else self._at(fmt, pos)

    def vector(self, table: int, i: int, size: int) -> tuple[int, int]:
        """(start, length) of vector field ``i`` with ``size``-byte items; (0, 0) when absent."""
        pos = self.field(table, i)
        if pos is None:
            return 0, 0
        start = self.ref(pos)
        n = self._at("<I", start)
        if start + 4 + n * size > len(self.data):
            raise IndexError(f"flatbuffer vector of {n} items at {start} runs past the file's {len(self.data)} bytes")
        return start + 4, n

    def tables(self, table: int, i: int) -> list[int]:
        start, n = self.vector(table, i, 4)
        self._decode(32 * n)  # a Python int per table, and the list
        return [self.ref(start + 4 * k) for k in range(n)]

    def ints(self, table: int, i: int) -> list[int]:
        start, n = self.vector(table, i, 4)
        self._decode(32 * n)
        return list(struct.unpack_from(f"<{n}i", self.data, start)) if n else []

    def string(self, table: int, i: int) -> str:
        start, n = self.vector(table, i, 1)
        self._decode(n + 64)
        return self.data[start:start + n].decode(errors="replace")


@contextlib.contextmanager
def tflite_index(p: Path, where: str) -> Iterator[Index]:
    data = read_regular(p, where, factor=3)  # the bytes, the names and tables decoded from them (at most twice)
    if data[4:8] != b"TFL3":
        raise FileFormatError(f"input={where} is not a TFLite model (no TFL3 identifier at byte 4)")
    yield _tflite(_Flat(data, where), where)


def read_regular(p: str | os.PathLike[str], where: str, *, factor: int = 1) -> bytes:
    """The bytes of ``p``, a regular file (a FIFO or a device is refused without waiting on it), after the
    memory guard passed ``factor`` × its size."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise FileFormatError(f"input={where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileFormatError(f"input={where} is not a regular file (a FIFO, device or folder): expected a model file")
    with os.fdopen(fd, "rb") as fh:
        require_memory(f"reading {where}", factor * st.st_size)
        data = fh.read(st.st_size + 1)
    if len(data) != st.st_size:
        raise FileFormatError(f"input={where} changed size while being read: expected {st.st_size} bytes")
    return data


def onnx_declared_bytes(p: str | os.PathLike[str], where: str) -> int:
    """What loading ``p`` with its external data allocates, from the declared shapes × dtypes, before anything is read.

    The graph and every external location are checked as :func:`onnx_index` does (inside the model's
    folder, each entry's length equal to its shape × dtype); the sum is the file's size plus every
    initializer's declared bytes.
    """
    path = Path(p)
    read_regular_check(path, where)
    try:
        with onnx_index(path, where) as index:
            return os.stat(path).st_size + sum(e.nbytes for e in index.values())
    except EquivcheckError:
        raise
    except Exception as exc:  # whatever the protobuf parser raises on a hostile file
        raise corrupt(where, exc) from None


def check_tflite(data: bytes, where: str) -> None:
    """Refuse, before an interpreter sees it, a TFLite flatbuffer the index refuses (bounds, graph, what it decodes).

    Only what decoding would allocate is refused here (one line); a damaged or odd flatbuffer is left to
    the interpreter that loads it next, which names the problem in its own words."""
    if data[4:8] != b"TFL3":
        return  # not a flatbuffer at all: the caller says so in its own words
    try:
        _tflite(_Flat(data, where), where)
    except _DecodeBudget:
        raise
    except Exception:  # a damaged model: the interpreter that loads it next says so in its own words
        pass


def read_regular_check(p: Path, where: str) -> None:
    """Refuse ``p`` unless it is a regular file (checked without opening a FIFO for reading)."""
    try:
        regular = stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        regular = False
    if not regular:
        raise FileFormatError(f"input={where} does not exist or is not a regular file: expected a model file")


def _tflite(fb: _Flat, where: str) -> Index:
    model = fb.ref(0)
    codes = [max(fb.scalar(c, 0, "<b"), fb.scalar(c, 3, "<i")) for c in fb.tables(model, 1)]
    for code in codes:
        if not 0 <= code <= _TFLITE_MAX_BUILTIN:
            raise FileFormatError(f"input={where} uses builtin operator code={code}, which is not a TFLite operator: refused")
    subgraphs = fb.tables(model, 2)
    if not subgraphs:
        raise FileFormatError(f"input={where} holds no subgraph")
    buffers = fb.tables(model, 4)
    graph = subgraphs[0]
    tensors = fb.tables(graph, 0)
    names = [fb.string(t, 3) or f"tensor_{i}" for i, t in enumerate(tensors)]
    seen: set[str] = set()
    for i, name in enumerate(names):
        names[i] = name if name not in seen else f"{name}#{i}"
        seen.add(names[i])
    ops = []
    for op in fb.tables(graph, 3):
        k = fb.scalar(op, 0, "<I")
        if k >= len(codes):
            raise FileFormatError(f"input={where} has an operator with opcode_index={k}: the model lists {len(codes)}")
        ins, outs = fb.ints(op, 1), fb.ints(op, 2)
        if any(not -1 <= x < len(tensors) for x in ins + outs):
            raise FileFormatError(f"input={where} has an operator naming a tensor outside its {len(tensors)}")
        ops.append((codes[k], ins, outs))
    _check_dag([(f"operator {i} (code {c})", [names[x] for x in ins if x >= 0], [names[x] for x in outs if x >= 0])
                for i, (c, ins, outs) in enumerate(ops)], where)
    index = Index(graph=True)
    for i, t in enumerate(tensors):
        entry = _tflite_entry(fb, t, names[i], buffers, where)
        if entry is not None:
            index[names[i]] = entry
    # a float16 model's weights: a DEQUANTIZE op makes the float32 tensor from the stored one
    stored = {outs[0]: ins[0] for code, ins, outs in ops if code == _TFLITE_DEQUANTIZE and len(outs) == 1 and ins and ins[0] >= 0}
    found = []
    for code, ins, outs in ops:
        if code not in _TFLITE_LINEAR:
            continue
        w_at, b_at = _TFLITE_WEIGHT_BIAS.get(code, (1, 2))
        w = stored.get(ins[w_at], ins[w_at]) if len(ins) > w_at and ins[w_at] >= 0 else -1
        if w >= 0 and names[w] in index:
            b = stored.get(ins[b_at], ins[b_at]) if len(ins) > b_at and ins[b_at] >= 0 else -1
            index.linear[names[w]] = names[b] if b >= 0 and names[b] in index else None
            found.append((_TFLITE_LINEAR[code], names[outs[0]] if outs and outs[0] >= 0 else "?", names[w]))
    index.why = _linear_summary(found, index)
    return index


def _tflite_entry(fb: _Flat, t: int, name: str, buffers: list[int], where: str) -> Entry | None:
    """The constant tensor ``t`` as an entry, or None for an activation (no data)."""
    if fb.scalar(t, 10, "<I"):
        raise FileFormatError(f"tensor {name[:60]!r} in {where} keeps its data in an external buffer: refused")
    b = fb.scalar(t, 2, "<I")
    if b == 0:
        return None
    if b >= len(buffers):
        raise FileFormatError(f"tensor {name[:60]!r} in {where} names buffer {b}: the model holds {len(buffers)}")
    buf = buffers[b]
    start, n = fb.vector(buf, 0, 1)
    offset, size = fb.scalar(buf, 1, "<Q"), fb.scalar(buf, 2, "<Q")
    if offset > 1:
        if offset + size > len(fb.data):
            raise FileFormatError(f"buffer {b} of tensor {name[:60]!r} in {where} lies at bytes {offset}..{offset + size}: "
                                  f"past the file's {len(fb.data)}")
        start, n = offset, size
    if n == 0:
        return None
    shape = tuple(fb.ints(t, 0))
    if any(d < 0 for d in shape):
        raise FileFormatError(f"tensor {name[:60]!r} in {where} declares shape={shape[:8]}: expected sizes >= 0")
    code = fb.scalar(t, 1, "<b")
    if code not in _TFLITE_DTYPES:
        return Entry(name, shape, f"tflite type {code}", lambda: np.empty(0), f"tflite type={code} is not read by equivcheck")
    spec = _TFLITE_DTYPES[code]
    if spec == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(spec)
    if math.prod(shape) * dtype.itemsize != n:
        raise FileFormatError(f"tensor {name[:60]!r} in {where} declares shape={shape} dtype={dtype} "
                              f"({math.prod(shape) * dtype.itemsize} bytes) but its buffer holds {n}: truncated or re-declared")
    problem = dtype_problem(dtype)
    quant = fb.field(t, 4)
    if quant is not None and fb.vector(fb.ref(quant), 2, 4)[1]:
        problem = f"a quantized tensor (dtype={dtype}, with scales) is not a plain array: convert the model without quantization"
    if fb.field(t, 6) is not None:
        problem = "a sparse tensor is not a plain array: convert the model without sparsity"
    native = dtype.newbyteorder("=")
    return Entry(name, shape, native, lambda: np.frombuffer(fb.data, dtype, math.prod(shape), start).astype(native).reshape(shape),
                 problem)
