"""The one memory guard: work (an array, a batch, a file's declared contents) is refused before it is allocated
when it needs more than half of this machine's memory. Every command goes through :func:`require_memory`."""

from __future__ import annotations

import os

from equivcheck.errors import SpecError

__all__ = ["physical_memory", "require_memory"]


def physical_memory() -> int:
    """Bytes of RAM on this machine (a large default where the OS will not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def require_memory(what: str, nbytes: int) -> None:
    """Refuse, before allocating, work that needs more than half of this machine's memory."""
    limit = physical_memory() // 2
    if nbytes > limit:
        raise SpecError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB, more than half of this machine's "
            f"{2 * limit / 2**30:.1f} GiB: use smaller shapes or a smaller batch, or a smaller file"
        )
