"""One exception root, a few subclasses.

Every error equivcheck raises on purpose is an :class:`EquivcheckError`; its message is
one line naming what is wrong (``field=value``), what was expected and, where it helps,
how to fix it. The CLI prints that line and exits 2.
"""

from __future__ import annotations


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
