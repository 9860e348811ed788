"""``check_model_converter``: the whole-model check as one call in a test (raises on a wrong conversion).

    def test_my_converter():
        check_model_converter(my_torch_to_keras, source=make_torch_model, input_shape=(2, 3, 32, 32))

``convert`` receives the source model (or, with ``state_dict=True``, its torch state dict) and
returns the converted model, a state dict/weights to load into ``target()``, or a
``(weights, factory)`` pair. A failed check raises
:class:`equivcheck.checker.ConversionCheckFailed` whose message is the per-layer table with
the first divergence named; a pass or an inconclusive check returns the :class:`ModelCheck`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck.adapters import ModelError
from equivcheck.modelcheck.check import check_models
from equivcheck.modelcheck.result import ModelCheck

__all__ = ["check_model_converter", "is_model", "load_weights"]


def is_model(obj: Any) -> bool:
    """A model ``check_models`` takes: a torch ``nn.Module``, a Keras model, a Flax ``(module, variables)`` tuple,
    an ONNX model (``ModelProto``, ``InferenceSession``, ``.onnx`` path) or a TFLite model (frameworks already
    imported only)."""
    torch, keras = sys.modules.get("torch"), sys.modules.get("keras")
    if (torch is not None and isinstance(obj, torch.nn.Module)) or (keras is not None and isinstance(obj, keras.Model)):
        return True
    from equivcheck.modelcheck.flax_adapter import is_flax
    from equivcheck.modelcheck.onnx_adapter import is_onnx
    from equivcheck.modelcheck.tf_keras_adapter import is_tf_keras
    from equivcheck.modelcheck.tflite_adapter import is_tflite

    return is_tf_keras(obj) or is_flax(obj) or is_onnx(obj) or is_tflite(obj)


def load_weights(model: Any, weights: Any, role: str = "converted") -> Any:
    """``model`` with ``weights`` loaded: a torch state dict (strict), or for Keras a list of arrays
    (``model.set_weights``) or a dict of layer name → list of arrays."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        if not isinstance(weights, dict):
            raise ModelError(f"{role} weights are a {type(weights).__name__}: a torch model loads a state dict")
        state = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in weights.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{role} state dict does not fit {type(model).__name__}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        return model
    try:
        if isinstance(weights, dict):
            for name, values in weights.items():
                model.get_layer(name).set_weights(list(values))
        else:
            model.set_weights(list(weights))
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{role} weights do not fit Keras model {model.name!r}: {str(exc).splitlines()[0]}") from None
    return model


def _build(factory: Any, role: str) -> Any:
    if is_model(factory):
        return factory
    if not callable(factory):
        raise ModelError(f"{role}={type(factory).__name__} is neither a model nor a factory that builds one")
    try:
        model = factory()
    except EquivcheckError:
        raise
    except Exception as exc:
        raise ModelError(f"{role} factory {getattr(factory, '__name__', factory)!r} raised "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not is_model(model):
        raise ModelError(f"{role} factory returned {type(model).__name__}: expected a torch, Keras, Flax, ONNX or "
                         "TFLite model")
    return model


def check_model_converter(convert: Callable[[Any], Any], source: Any, *, target: Callable[[], Any] | None = None,
                          state_dict: bool = False, input_shape: Sequence[int] | None = None,
                          dtypes: Sequence[str] = ("float32",), seed: int = 0, mutants: bool = True) -> ModelCheck:
    """Convert ``source`` (a model or a factory of one) with ``convert`` and check the result layer by layer.

    Raises :class:`~equivcheck.checker.ConversionCheckFailed` with the per-layer table when the
    converted model is wrong, :class:`~equivcheck.errors.EquivcheckError` when it cannot be checked.
    """
    from equivcheck.errors import ConversionCheckFailed

    model = _build(source, "source")
    given = model.state_dict() if state_dict else model
    try:
        out = convert(given)
    except (EquivcheckError, AssertionError):
        raise
    except Exception as exc:
        raise ModelError(f"convert raised {type(exc).__name__} on the source model: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if isinstance(out, tuple) and len(out) == 2 and not is_model(out[0]):
        out, target = out
    if not is_model(out):
        if target is None:
            raise ModelError(f"convert returned {type(out).__name__}, not a model: pass target=FACTORY to build the "
                             "model its weights load into (or return (weights, factory))")
        out = load_weights(_build(target, "target"), out)
    result = check_models(model, out, input_shape=input_shape, dtypes=dtypes, seed=seed, mutants=mutants)
    if result.verdict == "fail":
        raise ConversionCheckFailed(f"{result.reason}\n\n{result.render()}")
    return result


convert_and_check = check_model_converter  # the conversion and the check, failing on a ``fail`` verdict only


def check_model_converter(convert: Callable[[Any], Any], source: Any, *, target: Callable[[], Any] | None = None,
                          state_dict: bool = False, input_shape: Sequence[int] | None = None,
                          dtypes: Sequence[str] = ("float32",), seed: int = 0, mutants: bool = True,
                          allow_unchecked: Sequence[str] = ()) -> ModelCheck:
    """Convert ``source`` (a model or a factory of one) with ``convert`` and check the result layer by layer.

    The test fails — :class:`~equivcheck.checker.ConversionCheckFailed` with the per-layer table —
    on a ``fail``, and on an ``inconclusive`` check unless every layer left unchecked is named by
    ``allow_unchecked`` (names or glob patterns, ``model:name`` for one side:
    :mod:`equivcheck.modelcheck.policy`). :class:`~equivcheck.errors.EquivcheckError` when the
    models cannot be checked. Returns the :class:`ModelCheck`.
    """
    from equivcheck.modelcheck.policy import require_checked

    result = convert_and_check(convert, source, target=target, state_dict=state_dict, input_shape=input_shape,
                               dtypes=dtypes, seed=seed, mutants=mutants)
    require_checked(result, allow_unchecked)
    return result


def build_model(factory: Any, role: str) -> Any:
    """``factory`` if it is a model, else the model it builds (one line naming ``role`` where it is neither)."""
    return _build(factory, role)
