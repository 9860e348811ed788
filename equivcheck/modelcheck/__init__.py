"""Whole models: check a converted model layer by layer, find the first wrong layer, name the mistake.

    >>> import equivcheck as ec
    >>> result = ec.check_models(torch_model, keras_model, input_shape=(2, 3, 32, 32))
    >>> result.verdict, result.first_divergence
    >>> print(result.render())

The source runs on designed inputs with every linear layer's input and output captured; each
converted layer is paired with a source layer (execution order, kind, weight count), replayed
alone on its partner's input brought to its own layout and judged with the comparator's bound;
a failing pair is diagnosed from the weights (planner and mutants), and the inputs at layer
boundaries are compared so that a mistake in the graph (a wrong transpose before a Flatten)
is caught too. Nothing here imports a framework until a model of that framework is handled.
"""

from __future__ import annotations

from equivcheck.modelcheck.check import check_models
from equivcheck.modelcheck.result import LayerRow, ModelCheck, Unpaired

__all__ = ["LayerRow", "ModelCheck", "Unpaired", "check_model_converter", "check_models"]


def __getattr__(name: str) -> object:
    if name == "check_model_converter":
        from equivcheck.modelcheck.converter import check_model_converter

        return check_model_converter
    raise AttributeError(f"module 'equivcheck.modelcheck' has no attribute {name!r}")
