"""Importing TensorFlow (and Keras 3 on it) once, quietly, for the ``keras`` and ``tf`` backends."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from equivcheck.errors import BackendUnavailable


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# What TensorFlow's C++ side prints while it loads, whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21 logs
# the oneDNN note through absl before absl is initialised, once per shared library).
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|This TensorFlow binary is "
    r"optimized|rebuild TensorFlow with the appropriate compiler flags|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"TF-TRT Warning|computation placer already registered|Could not find cuda drivers|cuda_dnn|cuda_fft|cuda_blas")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hold back what C code writes to stderr; afterwards replay every line that is not start-up noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedded interpreter): nothing to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if line.strip() and not _STARTUP_NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))


def import_tensorflow() -> Any:
    """``tensorflow``, imported on first use with its start-up log quietened.

    Only equivcheck's own first import is quietened: a user who imported TensorFlow already keeps
    their settings, and ``TF_CPP_MIN_LOG_LEVEL`` is restored afterwards.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    before = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _quiet_stderr():
            import tensorflow
    finally:
        if before is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    # Ours to quieten: retracing warnings from the probes' many small layers are noise.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
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


# TensorFlow reads a buffer in place only when it is aligned for its kernels
# (Allocator::kAllocatorAlignment); a misaligned DLPack buffer aborts the process.
TF_ALIGNMENT = 64


def tf_tensor(a: Any, dtype: str) -> Any:
    """``a`` as a TensorFlow tensor in ``dtype`` (bfloat16 through float32, which holds it exactly)."""
    import numpy as np

    tf = import_tensorflow()
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return tf.cast(tf.convert_to_tensor(a), getattr(tf, dtype))


def tensor_in_place(a: Any) -> Any:
    """A TensorFlow tensor reading numpy array ``a`` in place (DLPack), or None when it cannot.

    Assigning it to a variable hands the buffer over: the variable then aliases ``a``.
    """
    from equivcheck.backends.base import can_share

    if "tensorflow" not in sys.modules or not can_share(a, a.dtype, TF_ALIGNMENT) or a.dtype.kind != "f":
        return None
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has no DLPack code
        return None
    return sys.modules["tensorflow"].experimental.dlpack.from_dlpack(a.__dlpack__())
