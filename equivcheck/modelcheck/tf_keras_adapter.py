"""Keras 2 (``tf_keras``) models: in memory, ``.h5`` files and ``.keras`` files it wrote.

The Keras 3 adapter serves: tf_keras layers have the same classes and configs (``Dense``,
``Conv1-3D``, ``DepthwiseConv*``, ``Conv*Transpose``, the norm layers), ``get_weights`` and a
functional graph of ``KerasTensor`` s with ``_keras_history``. Capture and replay use tf_keras's
own ``Model`` and activations. A Dense input is traced back through TensorFlow ops recorded as
``TFOpLambda`` layers too (``tf.reshape``, ``tf.transpose``: what nobuco writes for a flatten).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError
from equivcheck.modelcheck.adapters import KerasAdapter, ModelError, first_line

__all__ = ["H5_SUFFIXES", "TfKerasAdapter", "is_tf_keras", "is_tf_keras_file", "load_tf_keras_model"]

H5_SUFFIXES = (".h5", ".hdf5")

# TensorFlow ops a tf_keras graph records as TFOpLambda layers that move values without arithmetic
_SHAPE_ONLY_OPS = {"reshape", "transpose", "compat.v1.transpose", "identity", "squeeze", "compat.v1.squeeze",
                   "expand_dims", "compat.v1.expand_dims", "nn.dropout", "compat.v1.nn.dropout"}


def is_tf_keras(model: Any) -> bool:
    """A tf_keras model (tf_keras already imported), or the path of an ``.h5`` model file."""
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        return True
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix in H5_SUFFIXES


def is_tf_keras_file(path: str | os.PathLike[str]) -> bool:
    """An ``.h5`` model, or a ``.keras`` archive written by Keras 2 (its metadata says so)."""
    p = Path(path)
    if p.suffix in H5_SUFFIXES:
        return True
    if p.suffix != ".keras" or not p.is_file():
        return False
    import json
    import zipfile

    try:
        with zipfile.ZipFile(p) as archive:
            version = str(json.loads(archive.read("metadata.json")).get("keras_version", ""))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return version.startswith("2.")


def load_tf_keras_model(path: str | os.PathLike[str]) -> Any:
    """A tf_keras model from an ``.h5`` file or a Keras 2 ``.keras`` archive, not compiled. A Lambda layer, whose
    Python code loading would run, is refused (``.h5``: from the file's config before tf_keras reads it; ``.keras``:
    tf_keras's ``safe_mode``)."""
    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"input={str(p)!r} does not exist")
    if p.name.endswith(".weights.h5"):
        raise FileFormatError(f"input={str(p)!r} holds weights without the architecture: save the whole model with "
                              "model.save('model.h5'), or load these into your model and pass the model")
    if "tensorflow" not in sys.modules:  # TensorFlow's own start-up lines are not equivcheck's output
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tf_keras
    except ImportError:
        raise FileFormatError(f"input={str(p)!r} is a Keras 2 model and tf_keras is not installed: "
                              "pip install 'equivcheck[tfkeras]' (tf-keras matching your TensorFlow)") from None
    import warnings

    if p.suffix in H5_SUFFIXES:
        _refuse_lambda(p)
    try:
        with warnings.catch_warnings():  # Keras' and TensorFlow's own warnings while reading the file
            warnings.simplefilter("ignore")
            return tf_keras.models.load_model(str(p), compile=False, safe_mode=True)
    except Exception as exc:
        raise FileFormatError(f"input={str(p)!r} is not a loadable tf_keras model ({first_line(exc)}): "
                              "save it with tf_keras model.save('model.h5') and no Lambda layers") from None


def _refuse_lambda(path: Path) -> None:
    """One line when the ``.h5`` model's config holds a Lambda layer (legacy HDF5 loading ignores ``safe_mode``)."""
    import json

    try:
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except ImportError:
        raise FileFormatError(f"input={str(path)!r} is an HDF5 model and h5py is not installed: "
                              "pip install 'equivcheck[files]'") from None
    except OSError as exc:
        raise FileFormatError(f"input={str(path)!r} is not a readable HDF5 file ({first_line(exc)}): "
                              "expected a model saved by tf_keras model.save('model.h5')") from None
    if raw is None:
        raise FileFormatError(f"input={str(path)!r} holds no model config (weights only?): save the whole model with "
                              "tf_keras model.save('model.h5')")
    stack = [json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                name = (node.get("config") or {}).get("name", "?")
                raise FileFormatError(f"input={str(path)!r} has Lambda layer {name!r}, whose Python code loading would "
                                      "run: build the model in code, load the file with model.load_weights, and pass "
                                      "the model")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


class TfKerasAdapter(KerasAdapter):
    """A tf_keras (Keras 2) model: the Keras adapter over tf_keras's classes."""

    framework = label = "tf_keras"
    backend = "tf"  # tf_keras layers run TensorFlow's own kernels
    module_name = "tf_keras"
    recast = "a tf_keras model built in {} (tf_keras.mixed_precision.set_global_policy)"

    def __init__(self, model: Any, role: str) -> None:
        if isinstance(model, (str, os.PathLike)):
            model = load_tf_keras_model(model)
        try:
            super().__init__(model, role)
        except ModelError:
            raise
        except (AttributeError, ValueError, TypeError) as exc:
            raise ModelError(f"{role} tf_keras model {getattr(model, 'name', '')!r} cannot be traced: {first_line(exc)}: "
                             "pass a functional or Sequential model built on an Input") from None

    def traced_input(self, op: Any, node: Any) -> Any | None:
        """Besides the shape-only layers, TensorFlow's shape-only ops (``tf.reshape``, ``tf.transpose``), whose
        first argument is the tensor they move."""
        if type(op).__name__ == "TFOpLambda":
            if str(getattr(op, "symbol", "")).removeprefix("tf.") not in _SHAPE_ONLY_OPS:
                return None
            args = getattr(node, "call_args", ())
            first = args[0] if args else None
            return first if hasattr(first, "_keras_history") else None
        return super().traced_input(op, node)
