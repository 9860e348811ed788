"""Importing TensorFlow (and Keras 3 on it) once, quietly, for the ``keras`` and ``tf`` backends."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from equivcheck.errors import BackendUnavailable


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def import_tensorflow() -> Any:
    """``tensorflow``, imported on first use with its C++ start-up log quietened."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def keras_backend_name() -> str | None:
    """Which backend Keras runs (or will run) on, without importing it when it is not loaded."""
    if "keras" in sys.modules:
        try:
            return sys.modules["keras"].backend.backend()
        except AttributeError:  # keras half-imported
            return None
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def import_keras() -> Any:
    """``keras`` on TensorFlow, or :class:`BackendUnavailable` when Keras runs another backend."""
    if keras_backend_name() != "tensorflow":
        raise BackendUnavailable(
            f"Keras runs on backend={keras_backend_name()!r}: the keras backend needs Keras 3 on TensorFlow; "
            "set KERAS_BACKEND=tensorflow before Keras is imported"
        )
    import_tensorflow()
    import keras

    return keras
