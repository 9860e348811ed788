"""Whole models: convolutionalize a classifier's Flatten → Dense head and verify the result.

    >>> import equivcheck as ec
    >>> fcn = ec.convolutionalize(model)            # Keras or torch; model is left untouched
    >>> result = ec.verify_model(model, fcn)        # training size, sliding window, crops
    >>> result.passed, result.to_dict()

Nothing here imports a framework until a model of that framework is handled.
"""

from __future__ import annotations

from typing import Any

from equivcheck.fcn.head import HeadError
from equivcheck.fcn.sliding import Check, ModelVerification

__all__ = ["Check", "HeadError", "ModelVerification", "convolutionalize", "split", "verify_model"]


def _framework(model: Any) -> Any:
    from equivcheck.fcn import keras as keras_models
    from equivcheck.fcn import torch as torch_models

    if keras_models.is_keras_model(model):
        return keras_models
    if torch_models.is_torch_model(model):
        return torch_models
    raise HeadError(f"model={type(model).__name__} is neither a Keras model nor a torch.nn.Module: "
                    "pass a keras.Model (Sequential or Functional) or an nn.Module")


def convolutionalize(model: Any, input_shape: tuple[int, ...] | None = None) -> Any:
    """A new model whose Flatten → Dense head is convolutions, so it slides over larger inputs.

    The first Dense becomes a conv whose kernel covers the feature map, each later Dense a
    1×1 conv, with kernels mapped by :func:`equivcheck.plan`; every other layer keeps its
    weights. ``input_shape`` (one sample, e.g. ``(3, 224, 224)``) is needed for torch modules
    that do not carry an ``input_shape`` attribute; Keras models know theirs.
    Raises :class:`HeadError` naming a layer that cannot be converted.
    """
    framework = _framework(model)
    if framework.__name__.endswith("keras"):
        if input_shape is not None:
            raise HeadError("input_shape applies to torch modules only: a Keras model knows its input shape")
        return framework.convolutionalize(model)
    return framework.convolutionalize(model, input_shape)


def split(model: Any, input_shape: tuple[int, ...] | None = None) -> Any:
    """The original model split into body features and a numpy head (used by :func:`verify_model`)."""
    return _framework(model).split(model, input_shape)


def verify_model(source: Any = None, converted: Any = None, *, input_shape: tuple[int, ...] | None = None,
                 larger: tuple[int, ...] | None = None, crops: int | None = 4, seed: int = 0,
                 batch: int = 1, original: Any = None) -> ModelVerification:
    """Check ``converted`` against ``source``: at the training size, and position by position above it.

    ``larger`` is the spatial size of the larger input (default: training size + the total
    stride, giving a 2×2 output map); ``crops`` caps how many positions are also checked
    against the source model on the input crop (``None``: all). ``original=`` is the
    deprecated name of ``source``.
    """
    from equivcheck.errors import renamed
    from equivcheck.fcn.sliding import verify_split

    if original is not None:
        source = renamed("original", "source", original)
    for name, model in (("source", source), ("converted", converted)):
        if model is None:
            raise HeadError(f"{name} is missing: expected verify_model(source, converted), two models")
    return verify_split(split(source, input_shape), converted, larger=larger, crops=crops, seed=seed, batch=batch)
