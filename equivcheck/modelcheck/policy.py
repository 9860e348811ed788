"""What a test accepts of a model check: ``fail`` never; ``inconclusive`` only for layers it allows unchecked.

``allow_unchecked`` holds layer names or glob patterns (``"lstm"``, ``"encoder.*"``,
``"converted:attn*"``), matched against each unchecked layer's name, or ``model:name`` to
name one side only. A check that is inconclusive for another reason (data that cannot tell a
wrong conversion apart) is not accepted by it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from equivcheck.errors import SpecError

__all__ = ["not_accepted", "require_checked"]


def _patterns(allow_unchecked: Any) -> tuple[str, ...]:
    if isinstance(allow_unchecked, str):
        allow_unchecked = (allow_unchecked,)
    if not isinstance(allow_unchecked, Iterable) or not all(isinstance(p, str) and p for p in allow_unchecked):
        raise SpecError(f"allow_unchecked={allow_unchecked!r} is not valid: expected layer names or glob patterns, "
                        "e.g. allow_unchecked=('lstm', 'encoder.*')")
    return tuple(allow_unchecked)


def not_accepted(result: Any, allow_unchecked: Any = ()) -> list[str]:
    """Why ``result`` does not pass under ``allow_unchecked``: one line per cause (empty: accepted)."""
    patterns = _patterns(allow_unchecked)
    if result.verdict == "pass":
        return []
    if result.verdict == "fail":
        return [result.reason]
    out = []
    for u in result.unchecked:
        if not any(fnmatch.fnmatchcase(u.name, p) or fnmatch.fnmatchcase(f"{u.model}:{u.name}", p) for p in patterns):
            out.append(f"unchecked: {u}")
    out += [f"{row.label}: {row.notes[-1] if row.notes else 'inconclusive'}"
            for row in result.layers if row.verdict == "inconclusive"]
    return out


def require_checked(result: Any, allow_unchecked: Any = ()) -> None:
    """Raise :class:`~equivcheck.errors.ConversionCheckFailed` unless ``result`` passes or is inconclusive only
    for layers ``allow_unchecked`` names."""
    from equivcheck.errors import ConversionCheckFailed

    why = not_accepted(result, allow_unchecked)
    if why:
        hint = "" if result.verdict == "fail" or not result.unchecked else \
            " (pass allow_unchecked=('NAME', 'PATTERN*') for layers you check otherwise)"
        raise ConversionCheckFailed(f"model check {result.verdict}: " + "; ".join(why) + hint + "\n\n" + result.render(),
                                    result)
