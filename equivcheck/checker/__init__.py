"""Check a user's weight converter on real layers: the logic behind the pytest fixture.

    from equivcheck.checker import Checker
    Checker().check_converter(my_convert, source="keras:dense", target="torch:conv",
                              channels=8, spatial=(5, 6), units=3)

``my_convert(kernel, bias)`` takes the source layer's weights as numpy arrays in the source
framework's own layout and returns the target's ``(kernel, bias)``. Each check draws weights
and inputs (:mod:`equivcheck.strategies`), runs the source layer on its own framework and
the target layer with the converted weights on its own, and judges both against the exact
result (:mod:`equivcheck.compare`). Shape arguments given as ranges (``channels=(1, 8)``) or
hypothesis strategies start a hypothesis search that shrinks a failure to the smallest case.
A failure raises :class:`ConversionCheckFailed` (an ``AssertionError``) whose message names
the case, the conventions the converter actually follows and code that reproduces it.
Usable without pytest; importing this module imports no deep-learning framework.
"""

from collections.abc import Callable
from typing import Any

from equivcheck.checker.core import Checker, CheckRecord, check_conversion
from equivcheck.checker.messages import Conventions, failure_message, identify_conventions, spec_code, summary_table
from equivcheck.checker.options import (
    Options,
    derive_seed,
    installed_backends,
    options_from,
    resolve_backend,
)
from equivcheck.errors import CheckSkipped, ConversionCheckFailed
from equivcheck.judge import Case
from equivcheck.presets import PRESET_BACKENDS
from equivcheck.specs import LayerSpec


def check_converter(convert: Callable, source: str | LayerSpec, target: str | LayerSpec, **options: Any) -> list[Case]:
    """:meth:`Checker.check_converter` outside pytest (the fixture's method of the same name): the cases,
    or :class:`ConversionCheckFailed` on a failure."""
    __tracebackhide__ = True
    return Checker().check_converter(convert, source, target, **options)

__all__ = [
    "PRESET_BACKENDS",
    "CheckRecord",
    "CheckSkipped",
    "Checker",
    "Conventions",
    "ConversionCheckFailed",
    "Options",
    "check_conversion",
    "check_converter",
    "derive_seed",
    "failure_message",
    "identify_conventions",
    "installed_backends",
    "options_from",
    "resolve_backend",
    "spec_code",
    "summary_table",
]
