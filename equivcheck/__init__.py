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
from equivcheck.version import __version__ as __version__

# Every other public name is imported on first use, from the module that defines it: `import equivcheck`
# costs little more than its error classes, and a framework only arrives with a model or a layer of it.
_LAZY = {
    **dict.fromkeys(("explore",), "equivcheck.exploration"),
    **dict.fromkeys(("Identification", "identify"), "equivcheck.identification"),
    **dict.fromkeys(("Flip", "Mapping", "Reshape", "Transpose"), "equivcheck.mapping"),
    **dict.fromkeys(("canonical", "convert", "plan"), "equivcheck.planning"),
    **dict.fromkeys(("PRESETS", "build", "spec"), "equivcheck.presets"),
    **dict.fromkeys(("ConvSpec", "DenseSpec", "Shape"), "equivcheck.specs"),
    **dict.fromkeys(("Case", "verify", "verify_pair"), "equivcheck.verification"),
    **dict.fromkeys(("convolutionalize", "verify_model"), "equivcheck.fcn"),
    **dict.fromkeys(("check_models", "ModelCheck", "check_model_converter"), "equivcheck.modelcheck"),
    **dict.fromkeys(("check_converter",), "equivcheck.checker"),
    **dict.fromkeys(("RecurrentSpec", "AttentionSpec", "NamedMapping", "verify_sequence_pair"), "equivcheck.sequence"),
}

__all__ = [
    "PRESETS",
    "AttentionSpec",
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
    "NamedMapping",
    "NoMapping",
    "RecurrentSpec",
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
    "verify_sequence_pair",
]


def __getattr__(name: str) -> object:
    """A public name, imported on first use (looked up each time: it follows the module if that is re-imported)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'equivcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
