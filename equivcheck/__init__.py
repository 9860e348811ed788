"""equivcheck: verify and explore dense ↔ conv weight conversions across frameworks.

    >>> import equivcheck as ec
    >>> src = ec.spec("keras:dense", channels=512, spatial=(7, 7), units=4096)
    >>> dst = ec.spec("torch:conv", channels=512, spatial=(7, 7), units=4096)
    >>> print(ec.plan(src, dst).code("numpy"))
    w.reshape(7, 7, 512, 4096).transpose(3, 2, 0, 1)

Importing this package imports no deep-learning framework.
"""

from equivcheck.errors import (
    BackendUnavailable,
    CheckSkipped,
    ConversionCheckFailed,
    EquivcheckError,
    FileFormatError,
    HeadError,
    MappingError,
    NoMapping,
    SpecError,
    VerificationError,
)
from equivcheck.explore import explore
from equivcheck.identify import Identification, identify
from equivcheck.mapping import Flip, Mapping, Reshape, Transpose
from equivcheck.plan import canonical, convert, plan
from equivcheck.presets import PRESETS, build, spec
from equivcheck.specs import ConvSpec, DenseSpec, Shape
from equivcheck.verify import Case, verify, verify_pair

__version__ = "0.1.0"

# Imported on first use: they pull in more of the package (and a framework only when given a model).
_LAZY = {"convolutionalize": "equivcheck.models", "verify_model": "equivcheck.models",
         "check_models": "equivcheck.modelcheck", "ModelCheck": "equivcheck.modelcheck",
         "check_converter": "equivcheck.checker", "check_model_converter": "equivcheck.modelcheck"}

__all__ = [
    "PRESETS",
    "BackendUnavailable",
    "Case",
    "CheckSkipped",
    "ConvSpec",
    "ConversionCheckFailed",
    "DenseSpec",
    "EquivcheckError",
    "FileFormatError",
    "Flip",
    "HeadError",
    "Identification",
    "Mapping",
    "MappingError",
    "ModelCheck",
    "NoMapping",
    "Reshape",
    "Shape",
    "SpecError",
    "Transpose",
    "VerificationError",
    "build",
    "canonical",
    "check_converter",
    "check_model_converter",
    "check_models",
    "convert",
    "convolutionalize",
    "explore",
    "identify",
    "plan",
    "spec",
    "verify",
    "verify_model",
    "verify_pair",
]


def __getattr__(name: str) -> object:
    """Whole-model functions, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'equivcheck' has no attribute {name!r}")
