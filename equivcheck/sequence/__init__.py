"""Recurrent (LSTM, GRU, SimpleRNN) and multi-head attention layers, their weights as named tensors.

    >>> import equivcheck as ec
    >>> src = ec.spec("torch:lstm", input_size=32, units=64)
    >>> dst = ec.spec("keras:lstm", input_size=32, units=64)
    >>> print(ec.plan(src, dst).code())
    out['kernel'] = w['weight_ih_l0'].T
    out['recurrent_kernel'] = w['weight_hh_l0'].T
    out['bias'] = np.stack([w['bias_ih_l0'], w['bias_hh_l0']]).sum(0)

Modules: :mod:`~equivcheck.sequence.specs` (the specs), :mod:`~equivcheck.sequence.presets`
(``torch:lstm`` …), :mod:`~equivcheck.sequence.named` (plans over named tensors),
:mod:`~equivcheck.sequence.reference` (numpy, from the equations),
:mod:`~equivcheck.sequence.backends` (torch, Keras, ONNX Runtime),
:mod:`~equivcheck.sequence.verify` (verdict, mutants, identify; a :class:`~equivcheck.judge.Case`, so
``ec.verify_pair``, ``ec.check_converter`` and reports take these layers),
:mod:`~equivcheck.sequence.explore` and :mod:`~equivcheck.sequence.head_layout` (the gate order and
the head layout of a black box, for ``ec.explore``) and
:mod:`~equivcheck.sequence.files` (weight files as named tensors). No framework is imported here.
"""

from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec, SequenceSpec

# Imported on first use, so that ``equivcheck.spec`` reaches the presets without loading the checks.
_LAZY = {
    "NamedMapping": "named", "TensorPlan": "named", "canonical": "named", "convert": "named", "plan": "named",
    "tensor_shapes": "named", "is_sequence_name": "presets", "spec": "presets", "SequenceResult": "verify",
    "identify": "verify", "mutants": "verify", "verify_sequence_pair": "verify",
    "RecurrentBlackBox": "explore", "explore_recurrent": "explore", "find_gate_order": "explore",
    "AttentionBlackBox": "head_layout", "explore_attention": "head_layout", "find_attention_layout": "head_layout",
}

__all__ = ["AttentionSpec", "RecurrentSpec", "SequenceSpec", *sorted(_LAZY)]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"equivcheck.sequence.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'equivcheck.sequence' has no attribute {name!r}")
