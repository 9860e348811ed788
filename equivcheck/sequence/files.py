"""Weight files of recurrent and attention layers: named tensors in, named tensors out.

A file (``.npz``, ``.safetensors``, a torch ``.pt`` state dict …, read by :func:`equivcheck.files.load_arrays`)
holds the source layer's tensors under its framework's own parameter names (``weight_ih_l0``,
``kernel``, ``query/kernel`` …); the converted file holds the target's.
"""

from __future__ import annotations

import os
from typing import Any

from equivcheck.errors import FileFormatError
from equivcheck.files import load_arrays, save_arrays
from equivcheck.sequence.named import convert, tensor_shapes
from equivcheck.sequence.specs import SequenceSpec

__all__ = ["convert_named_file", "load_named"]


def load_named(spec: SequenceSpec, path: str | os.PathLike[str], *, prefix: str = "") -> dict[str, Any]:
    """``spec``'s tensors from a weight file, keyed by its parameter names (``prefix`` + name in the file)."""
    expected = tensor_shapes(spec)
    everything = load_arrays(path)
    missing = sorted(k for k in expected if prefix + k not in everything)
    if missing:
        raise FileFormatError(f"input={str(path)!r} lacks {', '.join(repr(prefix + k) for k in missing)}: "
                              f"{spec.describe()} stores {sorted(expected)} (found {sorted(everything)[:8]})")
    weights = {k: everything[prefix + k] for k in expected}
    for k, a in weights.items():
        if tuple(a.shape) != tuple(expected[k]):
            raise FileFormatError(f"{prefix + k} in {str(path)!r} has shape={tuple(a.shape)}: {spec.describe()} expects "
                                  f"{tuple(expected[k])}")
    return weights


def convert_named_file(source: SequenceSpec, target: SequenceSpec, input: str | os.PathLike[str],
                       output: str | os.PathLike[str], *, force: bool = False, prefix: str = "") -> dict[str, Any]:
    """Read ``source``'s tensors from ``input``, write ``target``'s to ``output`` (atomically); the written dict."""
    converted = convert(source, target, load_named(source, input, prefix=prefix))
    save_arrays(output, converted, force=force, protect=(input,))
    return converted
