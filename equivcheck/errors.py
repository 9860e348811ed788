"""One exception root, a few subclasses.

Every error equivcheck raises on purpose is an :class:`EquivcheckError`; its message is
one line naming what is wrong (``field=value``), what was expected and, where it helps,
how to fix it. The CLI prints that line and exits 2.
"""

from __future__ import annotations

import re
from typing import Any


class EquivcheckError(Exception):
    """Root of every error equivcheck raises on purpose."""


class SpecError(EquivcheckError, ValueError):
    """A layer spec, preset name or argument is invalid."""


class MappingError(EquivcheckError, ValueError):
    """A weight mapping was built or applied with the wrong shapes."""


class NoMapping(EquivcheckError):
    """No reshape/transpose/flip of the weights makes the two layers compute the same function."""


class BackendUnavailable(EquivcheckError, ImportError):
    """A framework backend was asked for but the framework is not installed."""


class FileFormatError(EquivcheckError, ValueError):
    """A weight file is missing, unreadable, unsafe or does not match the spec."""


class VerificationError(EquivcheckError, AssertionError):
    """Two layers that should agree do not."""


class HeadError(EquivcheckError, ValueError):
    """A layer of a classifier head cannot be represented, converted or bounded."""


class UsageError(EquivcheckError):
    """A command line that cannot be run as given (a missing or malformed flag)."""


class ProbeError(EquivcheckError):
    """A layer could not be run on a probe input (it raised, or returned the wrong shape)."""


class ProbeFailure(EquivcheckError):
    """A layer's responses are not those of a rearranged kernel (explore's own signal; carries the reason)."""


class NotAPermutation(EquivcheckError):
    """Observed positions are not a rearrangement of the stored kernel (explore's own signal; carries the reason)."""


class CheckSkipped(EquivcheckError):
    """Nothing could be checked (every case skipped); the pytest fixture turns it into a skip."""


class ConversionCheckFailed(EquivcheckError, AssertionError):
    """A converter gave weights on which the target layer disagrees with the source.

    ``record`` is the failing check's record (:class:`equivcheck.checker.CheckRecord`) and
    ``case`` its :class:`equivcheck.verification.Case`, for code that catches the failure.
    """

    def __init__(self, message: str, record: Any = None) -> None:
        super().__init__(message)
        self.record = record
        self.case = getattr(record, "case", None)


#: The release that removes the spellings :func:`renamed` still accepts.
RENAMED_UNTIL = "0.3"


def renamed(old: str, new: str, value: Any, *, stacklevel: int = 3) -> Any:
    """``value`` given under a keyword's old name: warn once per call site and hand it on."""
    import warnings

    warnings.warn(f"{old}= is deprecated: use {new}= ({old}= is removed in equivcheck {RENAMED_UNTIL})",
                  DeprecationWarning, stacklevel=stacklevel)
    return value


def framework_message(exc: BaseException) -> str:
    """The line of a framework's error that says what failed (Keras wraps TF's under a generic first line)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m|\{\{function_node [^}]*\}\}", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Exception encountered", "Arguments received", "•"))]
    return f"{type(exc).__name__}: {(lines[0] if lines else repr(exc))[:300]}"
