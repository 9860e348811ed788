"""Sides made of exported models: one linear node of an ONNX graph, one linear op of a TFLite model.

* :class:`OnnxSide` — an ``onnx.ModelProto``, a ``.onnx`` path or an ``onnxruntime.InferenceSession``
  holding one linear node (``Gemm``, ``MatMul`` with a constant weight and its bias ``Add``,
  ``Conv``, ``ConvTranspose``), or a node picked from a larger graph: ``(model, "NODE")`` or
  ``"model.onnx:NODE"``, ``NODE`` being the node's name or its output's. The node, with its own
  attributes, becomes a model of its own whose weight and bias are graph inputs: one ONNX Runtime
  session (CPU EP) takes ``x``, the probe kernel and bias. Its map is the node's input; a dense
  node fed by a ``Flatten`` of a known map reads that map (channels first).
* :class:`TfliteSide` — a TFLite flatbuffer (``bytes`` or a ``.tflite`` path) with one
  ``FULLY_CONNECTED``, ``CONV_2D``, ``DEPTHWISE_CONV_2D`` or ``TRANSPOSE_CONV`` op. The whole
  model runs on the tflite backend's interpreter; each probe kernel is written into the weight's
  constant buffer in a copy of the flatbuffer, which a new interpreter then runs.

Geometry comes from the node's attributes and the shapes the model declares (ONNX: after shape
inference); the shape keywords fill in what is dynamic. Frameworks are imported only when such a
model is given.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from equivcheck.errors import SpecError
from equivcheck.exploration.sides import Side
from equivcheck.specs import Shape

__all__ = ["runtime_side", "split_model_path"]  # the sides: runtimes_onnx.OnnxSide, runtimes_tflite.TfliteSide

SUFFIXES = (".onnx", ".tflite")


def split_model_path(text: str) -> tuple[str, str | None] | None:
    """``"m.onnx"`` → (path, None), ``"m.onnx:NODE"`` → (path, NODE); None when ``text`` names no model file."""
    if text.lower().endswith(SUFFIXES):
        return text, None
    head, sep, node = text.rpartition(":")
    return (head, node) if sep and node and head.lower().endswith(SUFFIXES) else None


def runtime_side(obj: Any, shape: Shape) -> Side | None:
    """A side for an ONNX or TFLite model (path, bytes, object, or ``(model, NODE)``); None for anything else."""
    node = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], str) and _is_onnx(obj[0], paths=True):
        obj, node = obj
        if not node:
            raise SpecError("NODE='' is empty: expected the name of a node (or of its output) in the graph")
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    if isinstance(obj, str):
        split = split_model_path(obj)
        if split is None:
            return None
        path, named = split
        if node is not None and named is not None:
            raise SpecError(f"model={obj!r} names node {named!r} and NODE={node!r} is given too: give one")
        if path.lower().endswith(".tflite"):
            if (named or node) is not None:
                raise SpecError(f"model={obj!r}: a TFLite model is explored whole (one linear op), not by NODE")
            from equivcheck.exploration.runtimes_tflite import TfliteSide

            return TfliteSide(_read(path), shape, label=f"tflite {os.path.basename(path)}")
        from equivcheck.exploration.runtimes_onnx import OnnxSide
        from equivcheck.memory import require_memory
        from equivcheck.model_weights import onnx_declared_bytes

        if os.path.isfile(path):  # its graph and external data checked, and what loading it allocates, before onnx reads it
            require_memory(f"loading {path!r}", onnx_declared_bytes(path, repr(path)))
        return OnnxSide(path, shape, node=node or named)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        from equivcheck.exploration.runtimes_tflite import TfliteSide
        from equivcheck.model_weights import check_tflite

        data = bytes(obj)
        check_tflite(data, "the tflite model")
        return TfliteSide(data, shape)
    if not _is_onnx(obj):
        return None
    from equivcheck.exploration.runtimes_onnx import OnnxSide

    return OnnxSide(obj, shape, node=node)


def _is_onnx(obj: Any, paths: bool = False) -> bool:
    onnx, ort = sys.modules.get("onnx"), sys.modules.get("onnxruntime")
    return ((paths and isinstance(obj, (str, os.PathLike))) or (onnx is not None and isinstance(obj, onnx.ModelProto))
            or (ort is not None and isinstance(obj, ort.InferenceSession)))


def _read(path: str) -> bytes:
    """A .tflite file's bytes: a regular file within the memory guard (never a FIFO, which would hang the
    read), whose flatbuffer the index accepts (bounds, graph, what decoding it produces)."""
    from equivcheck.model_weights import check_tflite, read_regular

    data = read_regular(path, repr(path), factor=3)  # the bytes, a copy per probe kernel, the decoded tables
    check_tflite(data, repr(path))
    return data
