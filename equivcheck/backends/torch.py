"""PyTorch: ``nn.Flatten`` + ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``.

Depthwise and grouped convolutions are ``groups=``. Torch wants maps NCHW and kernels
``(out, in/groups, *k)`` (``(in, out/groups, *k)`` transposed), in cross-correlation form: a
stored kernel in another layout, or a true-convolution one, goes through
:func:`~equivcheck.backends.base.kernel_layout_mapping`. A channels-last map is permuted to
NCHW and back. ``padding="same"`` is torch's own where torch allows it (stride 1, equal pads
on both sides), else the spec's pads are explicit (``F.pad`` when asymmetric, as TensorFlow's
"same" pads an even span: the extra one after).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.backends.base import (
    Backend,
    Layer,
    can_share,
    check_input,
    dense_kernel,
    flatten_permutation,
    native_weights,
    np_dtype,
    stored_kernel,
)
from equivcheck.specs import CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec

_TORCH_DTYPES = {"float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _to_torch(torch: Any, a: np.ndarray, dtype: Any) -> Any:
    # torch.from_numpy knows no ml_dtypes bfloat16: go through float32, which holds it exactly.
    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _to_numpy(t: Any, dtype: str) -> np.ndarray:
    t = t.detach().cpu()
    if dtype == "bfloat16":
        return t.float().numpy().astype(np_dtype(dtype))
    return t.numpy()


def _uninitialised(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, **kwargs)`` with empty parameters: weights are set right after, so no random init.

    Like ``torch.nn.utils.skip_init``, without its first-use import of torch's reference
    decompositions (half a second).
    """
    import torch

    module = cls(*args, device="meta", **kwargs)
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
    return module


class TorchLayer(Layer):
    """A torch module realising ``spec``, plus the permutes and pads around it."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        import torch
        from torch import nn

        self._torch = torch
        self._tdtype = getattr(torch, _TORCH_DTYPES[dtype])
        self._pre_pad: list[int] | None = None
        self._handed_over = False  # a parameter may read a caller's array (set_weights(copy=False))
        if isinstance(spec, DenseSpec):
            self._perm = flatten_permutation(spec)
            self._layout = "OI"  # nn.Linear weight (out, in)
            self.module = nn.Sequential(
                nn.Flatten(), _uninitialised(nn.Linear, spec.in_features, spec.units, bias=spec.bias, dtype=self._tdtype)
            )
            self._weighted = self.module[1]
            return
        self._perm = None
        r = spec.rank
        kwargs: dict[str, Any] = dict(
            stride=spec.stride, dilation=spec.dilation, groups=spec.groups, bias=spec.bias, dtype=self._tdtype
        )
        if spec.transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[r - 1]
            kwargs.update(padding=tuple(lo for lo, _ in spec.pads()), output_padding=spec.output_padding)
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[r - 1]
            pads = spec.pads()
            if all(lo == hi for lo, hi in pads):
                # torch's own "same" where it allows it (stride 1; an odd span needs no extra pad)
                same = spec.padding == "same" and all(s == 1 for s in spec.stride)
                kwargs["padding"] = "same" if same else tuple(lo for lo, _ in pads)
            else:
                # F.pad takes (lo, hi) pairs from the last axis backwards.
                self._pre_pad = [p for lo_hi in reversed(pads) for p in lo_hi]
                kwargs["padding"] = 0
        self.module = _uninitialised(cls, spec.in_channels, spec.out_channels, spec.kernel_size, **kwargs)
        self._weighted = self.module
        self._layout = ("IO" if spec.transposed else "OI") + spec.letters

    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        spec = self.spec
        native = native_weights(spec, kernel, bias, self._layout)
        torch = self._torch
        with torch.no_grad():
            for param, value in ((self._weighted.weight, native), (self._weighted.bias, bias)):
                if value is None:
                    continue
                value = np.asarray(value)
                if not copy and can_share(value, np_dtype(self.dtype)) and self.dtype != "bfloat16":
                    param.set_(torch.from_numpy(value))  # the parameter now reads ``value`` in place
                    continue
                if self._handed_over:  # storage of the caller's: copying into it would write their array
                    param.set_(torch.empty(param.shape, dtype=param.dtype))
                param.copy_(_to_torch(torch, value, self._tdtype))
        self._handed_over = not copy

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        native = _to_numpy(self._weighted.weight, self.dtype)
        spec = self.spec
        kernel = dense_kernel(spec, native, "OI") if isinstance(spec, DenseSpec) else stored_kernel(spec, native, self._layout)
        bias = None if self._weighted.bias is None else _to_numpy(self._weighted.bias, self.dtype)
        return kernel, bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch, spec = self._torch, self.spec
        x = np.asarray(x, dtype=np_dtype(self.dtype))
        check_input(spec, x)
        t = _to_torch(torch, x, self._tdtype)
        channels_last = spec.data_format == CHANNELS_LAST and isinstance(spec, ConvSpec)
        with torch.no_grad():
            if self._perm is not None:
                t = t.permute(*self._perm)
            if channels_last:
                t = t.movedim(-1, 1)
            if self._pre_pad is not None:
                t = torch.nn.functional.pad(t, self._pre_pad)
            y = self.module(t)
            if channels_last:
                y = y.movedim(1, -1)
        return _to_numpy(y.contiguous(), self.dtype)


class TorchBackend(Backend):
    name = "torch"
    module = "torch"

    def build(self, spec: LayerSpec, dtype: str = "float32") -> TorchLayer:
        self._check(spec, dtype)
        self.load()
        return TorchLayer(spec, dtype)

    def tensor(self, a: np.ndarray, dtype: str) -> Any:
        torch = self.load()
        return _to_torch(torch, np.asarray(a), getattr(torch, _TORCH_DTYPES[dtype]))
