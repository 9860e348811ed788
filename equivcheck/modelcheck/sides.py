"""Which adapter handles a model: torch, Keras 3, tf_keras, Flax, ONNX or TFLite (see :mod:`equivcheck.modelcheck.adapters`)."""

from __future__ import annotations

import sys
from typing import Any

from equivcheck.modelcheck.adapters import Adapter, KerasAdapter, ModelError, TorchAdapter

__all__ = ["adapter_for"]


def adapter_for(model: Any, role: str) -> Adapter:
    torch = sys.modules.get("torch")
    keras = sys.modules.get("keras")
    if torch is not None and isinstance(model, torch.nn.Module):
        return TorchAdapter(model, role)
    if keras is not None and isinstance(model, keras.Model):
        return KerasAdapter(model, role)
    from equivcheck.modelcheck.tf_keras_adapter import TfKerasAdapter, is_tf_keras

    if is_tf_keras(model):
        return TfKerasAdapter(model, role)
    from equivcheck.modelcheck.flax_adapter import FlaxAdapter, is_flax
    from equivcheck.modelcheck.onnx_adapter import OnnxAdapter, is_onnx

    if is_flax(model):
        return FlaxAdapter(model, role)
    if is_onnx(model):
        return OnnxAdapter(model, role)
    from equivcheck.modelcheck.tflite_adapter import TFLiteAdapter, is_tflite

    if is_tflite(model):
        return TFLiteAdapter(model, role)
    raise ModelError(f"{role}={type(model).__name__} is not a torch.nn.Module, a Keras 3 model, an ONNX model "
                     "(ModelProto, .onnx path, InferenceSession), a TFLite model (.tflite path or bytes), a tf_keras model "
                     "(or .h5 path) or a Flax (module, variables) tuple: "
                     "pass a model object (files load with equivcheck.modelcheck.commands.load_model)")

