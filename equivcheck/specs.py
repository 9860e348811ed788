"""Framework-neutral, immutable layer specs: :class:`DenseSpec` and :class:`ConvSpec`.

Axis letters name what each axis of a tensor holds: ``C`` channels of a feature map, ``D``,
``H``, ``W`` its spatial axes (``W`` for rank 1, ``HW`` for 2, ``DHW`` for 3), ``O`` and ``I``
a kernel's output and input channels, ``M`` a depthwise kernel's channel multiplier.
A spec is validated when it is built; a bad one raises :class:`SpecError` naming the
field, the value and what was expected.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from equivcheck.errors import SpecError

__all__ = ["ConvSpec", "DenseSpec", "LayerSpec", "spatial_letters"]

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
DATA_FORMATS = (CHANNELS_FIRST, CHANNELS_LAST)
OPS = ("correlate", "convolve")
# Refuse shapes whose kernel or map would not fit in memory before anything is allocated.
MAX_ELEMENTS = 1 << 34


def spatial_letters(rank: int) -> str:
    """``"W"``, ``"HW"`` or ``"DHW"``."""
    if rank not in (0, 1, 2, 3):
        raise SpecError(f"rank={rank} is not supported: expected 0 (a flat vector), 1, 2 or 3 spatial axes")
    return "DHW"[3 - rank :] if rank else ""


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # an int or numpy integer, never a float
    except TypeError:
        raise SpecError(f"{name}={value!r} is not an integer: expected a positive integer") from None
    if value < (0 if allow_zero else 1):
        raise SpecError(f"{name}={value!r} must be {'>= 0' if allow_zero else 'a positive integer'}")
    return value


def _tuple(name: str, value: Any, rank: int, *, allow_zero: bool = False, default: int | None = None) -> tuple[int, ...]:
    """An int or sequence of ints, broadcast to ``rank`` entries."""
    if value is None and default is not None:
        value = default
    if isinstance(value, str):
        raise SpecError(f"{name}={value!r} is not a sequence of integers: expected {rank} integers")
    if not isinstance(value, (tuple, list)):
        value = (value,) * rank
    if len(value) != rank:
        raise SpecError(f"{name}={tuple(value)!r} has {len(value)} entries: expected {rank}, one per spatial axis")
    return tuple(positive_int(f"{name}[{i}]", v, allow_zero=allow_zero) for i, v in enumerate(value))


def _padding(value: Any, rank: int) -> str | tuple:
    """``"valid"``, ``"same"``, one integer per axis, or one ``(before, after)`` pair per axis."""
    if isinstance(value, str):
        if value not in ("valid", "same"):
            raise SpecError(f"padding={value!r} is not valid: expected 'valid', 'same', integers or (before, after) pairs per spatial axis")
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(p, (tuple, list)) for p in value):
        if len(value) != rank or any(len(p) != 2 for p in value):
            raise SpecError(f"padding={value!r} is not valid: expected {rank} (before, after) pairs, one per spatial axis")
        pairs = tuple(_tuple("padding", tuple(p), 2, allow_zero=True) for p in value)
        return pairs if any(lo != hi for lo, hi in pairs) else tuple(lo for lo, _ in pairs)
    return _tuple("padding", value, rank, allow_zero=True)


def _data_format(value: Any) -> str:
    aliases = {"channels_first": CHANNELS_FIRST, "channels_last": CHANNELS_LAST, "NCHW": CHANNELS_FIRST, "NHWC": CHANNELS_LAST}
    if value not in aliases:
        raise SpecError(f"data_format={value!r} is not valid: expected 'channels_first' or 'channels_last'")
    return aliases[value]


def _layout(name: str, value: Any, letters: str) -> str:
    if not isinstance(value, str) or sorted(value) != sorted(letters):
        raise SpecError(
            f"{name}={value!r} is not a layout of these axes: expected an ordering of the letters "
            f"{'/'.join(letters)} (e.g. {letters!r})"
        )
    return value


def _check_size(what: str, shape: tuple[int, ...]) -> None:
    if math.prod(shape) > MAX_ELEMENTS:
        raise SpecError(f"{what} shape={shape} has {math.prod(shape)} elements: more than the limit of {MAX_ELEMENTS}")


def map_shape(channels: int, spatial: tuple[int, ...], data_format: str) -> tuple[int, ...]:
    """A feature map's per-sample shape in ``data_format``."""
    return (channels, *spatial) if data_format == CHANNELS_FIRST else (*spatial, channels)


@dataclass(frozen=True)
class DenseSpec:
    """A Flatten + Dense stack reading a ``channels × spatial`` feature map.

    ``data_format`` is how the map arrives; ``flatten`` is the order in which the Flatten
    linearises it, as letters (``"CHW"``, ``"HWC"``, any permutation) or ``"channels_first"``
    / ``"channels_last"``. The two differ for Keras with ``data_format="channels_first"``,
    whose Flatten moves channels last first. ``kernel_layout`` is ``"IO"`` for a kernel
    stored (in, out) as in Keras, ``"OI"`` for (out, in) as in torch.
    """

    channels: int
    spatial: tuple[int, ...] = ()
    units: int = 1
    data_format: str = CHANNELS_FIRST
    flatten: str | None = None
    kernel_layout: str = "IO"
    bias: bool = True
    name: str = field(default="", compare=False)

    kind = "dense"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "channels", positive_int("channels", self.channels))
        if isinstance(self.spatial, int):
            set_(self, "spatial", (self.spatial,))
        if not isinstance(self.spatial, (tuple, list)):
            raise SpecError(f"spatial={self.spatial!r} is not a sequence of sizes: expected e.g. (7, 7)")
        rank = len(self.spatial)
        set_(self, "spatial", _tuple("spatial", self.spatial, rank))
        spatial_letters(rank)
        set_(self, "units", positive_int("units", self.units))
        set_(self, "data_format", _data_format(self.data_format))
        flatten = self.flatten
        letters = self.map_letters
        if flatten is None:
            flatten = self.data_format
        if flatten in DATA_FORMATS or flatten in ("NCHW", "NHWC"):
            flatten = letters if _data_format(flatten) == CHANNELS_FIRST else letters[1:] + "C"
        set_(self, "flatten", _layout("flatten", flatten, letters))
        set_(self, "kernel_layout", _layout("kernel_layout", self.kernel_layout, "IO"))
        if not isinstance(self.bias, bool):
            raise SpecError(f"bias={self.bias!r} is not a bool")
        _check_size("dense kernel", self.kernel_shape)

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def map_letters(self) -> str:
        """Letters of the map's axes in canonical (channels-first) order: ``"CHW"``."""
        return "C" + spatial_letters(len(self.spatial))

    @property
    def in_features(self) -> int:
        return self.channels * math.prod(self.spatial)

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.units

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.in_features, self.units) if self.kernel_layout == "IO" else (self.units, self.in_features)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.units,)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (the feature map in ``data_format``)."""
        return map_shape(self.channels, self.spatial, self.data_format)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.units,)

    def replace(self, **changes: Any) -> DenseSpec:
        return _replace(self, changes)

    def describe(self) -> str:
        return (
            f"{self.name or 'dense'}(channels={self.channels}, spatial={self.spatial}, units={self.units}, "
            f"data_format={self.data_format}, flatten={self.flatten}, kernel={self.kernel_layout})"
        )


@dataclass(frozen=True)
class ConvSpec:
    """A convolution (or transposed convolution) of rank 1–3.

    ``kernel_layout`` orders the letters ``O``, ``I`` and the spatial letters as the kernel is
    stored: ``"OIHW"`` (torch), ``"HWIO"`` (Keras, tf.nn), ``"OHWI"`` (TFLite), ``"IOHW"``
    (torch's transposed conv), and ``"HWIM"`` for a depthwise kernel stored (h, w, in,
    multiplier). ``O`` and ``I`` count channels per kernel slice: for a convolution ``O`` is
    ``out_channels`` and ``I`` is ``in_channels / groups``; for a transposed one ``I`` is
    ``in_channels`` and ``O`` is ``out_channels / groups``. ``op="convolve"`` is true
    convolution (the kernel flipped in space), as in Theano and ``scipy.signal.convolve``.
    ``spatial`` is the input map; it defaults to the kernel size (a kernel covering the map).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    spatial: tuple[int, ...] | None = None
    stride: tuple[int, ...] | int = 1
    dilation: tuple[int, ...] | int = 1
    padding: str | tuple[int, ...] | tuple[tuple[int, int], ...] | int = "valid"
    groups: int = 1
    data_format: str = CHANNELS_FIRST
    kernel_layout: str | None = None
    op: str = "correlate"
    transposed: bool = False
    output_padding: tuple[int, ...] | int = 0
    bias: bool = True
    name: str = field(default="", compare=False)

    kind = "conv"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "in_channels", positive_int("in_channels", self.in_channels))
        set_(self, "out_channels", positive_int("out_channels", self.out_channels))
        ks = self.kernel_size
        if isinstance(ks, int) and not isinstance(ks, bool):
            raise SpecError(f"kernel_size={ks!r} is a single integer: pass a tuple, one size per spatial axis")
        if not isinstance(ks, (tuple, list)) or not 1 <= len(ks) <= 3:
            raise SpecError(f"kernel_size={ks!r} is not valid: expected 1 to 3 sizes, one per spatial axis")
        rank = len(ks)
        set_(self, "kernel_size", _tuple("kernel_size", ks, rank))
        set_(self, "spatial", _tuple("spatial", self.spatial, rank) if self.spatial is not None else self.kernel_size)
        set_(self, "stride", _tuple("stride", self.stride, rank))
        set_(self, "dilation", _tuple("dilation", self.dilation, rank))
        set_(self, "output_padding", _tuple("output_padding", self.output_padding, rank, allow_zero=True))
        set_(self, "padding", _padding(self.padding, rank))
        set_(self, "groups", positive_int("groups", self.groups))
        set_(self, "data_format", _data_format(self.data_format))
        if self.op not in OPS:
            raise SpecError(f"op={self.op!r} is not valid: expected 'correlate' or 'convolve'")
        for flag in ("transposed", "bias"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag}={getattr(self, flag)!r} is not a bool")
        g = self.groups
        for what in ("in_channels", "out_channels"):
            if getattr(self, what) % g:
                raise SpecError(f"groups={g} does not divide {what}={getattr(self, what)}: groups must divide both channel counts")
        letters = spatial_letters(rank)
        layout = self.kernel_layout
        if layout is None:
            layout = ("IO" if self.transposed else "OI") + letters
        if isinstance(layout, str) and "M" in layout:
            _layout("kernel_layout", layout, "IM" + letters)
            if self.transposed or g != self.in_channels:
                raise SpecError(
                    f"kernel_layout={layout!r} is a depthwise layout: it needs groups == in_channels "
                    f"(got groups={g}, in_channels={self.in_channels}) and transposed=False"
                )
        else:
            _layout("kernel_layout", layout, "OI" + letters)
        set_(self, "kernel_layout", layout)
        if any(self.output_padding) and not self.transposed:
            raise SpecError(f"output_padding={self.output_padding} only applies to transposed convolutions")
        if any(o >= max(s, d) for o, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise SpecError(
                f"output_padding={self.output_padding} must be smaller than stride={self.stride} or dilation={self.dilation}"
            )
        pad = self.padding
        if self.transposed and not isinstance(pad, str) and any(isinstance(p, tuple) for p in pad):
            raise SpecError(f"padding={pad} gives (before, after) pairs: a transposed convolution takes one integer per axis")
        if self.transposed and pad == "same":  # output = input × stride: crop (effective kernel - stride) / 2 a side
            total = [d * (k - 1) + 1 - st for k, d, st in zip(self.kernel_size, self.dilation, self.stride)]
            if any(t < 0 or t % 2 for t in total):
                raise SpecError(f"padding='same' on a transposed convolution with kernel_size={self.kernel_size}, "
                                f"stride={self.stride} crops {total}: frameworks crop an odd or negative total "
                                "differently, give integers per axis (and output_padding)")
            object.__setattr__(self, "padding", tuple(t // 2 for t in total))
        _check_size("conv kernel", self.kernel_shape)
        out = self.output_spatial
        if any(o < 1 for o in out):
            raise SpecError(
                f"kernel_size={self.kernel_size} with dilation={self.dilation} and padding={self.padding} "
                f"does not fit spatial={self.spatial}: the output would be {out}"
            )

    # -- derived shapes ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def units(self) -> int:
        return self.out_channels

    @property
    def letters(self) -> str:
        return spatial_letters(self.rank)

    @property
    def is_depthwise_layout(self) -> bool:
        return "M" in self.kernel_layout

    def axis_sizes(self) -> dict[str, int]:
        """Size of each kernel-layout letter."""
        sizes = dict(zip(self.letters, self.kernel_size))
        if self.is_depthwise_layout:
            sizes.update(I=self.in_channels, M=self.out_channels // self.in_channels)
        elif self.transposed:
            sizes.update(I=self.in_channels, O=self.out_channels // self.groups)
        else:
            sizes.update(O=self.out_channels, I=self.in_channels // self.groups)
        return sizes

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        sizes = self.axis_sizes()
        return tuple(sizes[a] for a in self.kernel_layout)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_channels,)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return map_shape(self.in_channels, self.spatial, self.data_format)

    def pads(self) -> tuple[tuple[int, int], ...]:
        """(before, after) padding per spatial axis; ``"same"`` as TensorFlow computes it."""
        if self.padding == "valid":
            return tuple((0, 0) for _ in self.kernel_size)
        if self.padding == "same":
            out = []
            for n, k, s, d in zip(self.spatial, self.kernel_size, self.stride, self.dilation):
                total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return tuple(p if isinstance(p, tuple) else (p, p) for p in self.padding)

    @property
    def output_spatial(self) -> tuple[int, ...]:
        out = []
        for n, k, s, d, (lo, hi), op in zip(
            self.spatial, self.kernel_size, self.stride, self.dilation, self.pads(), self.output_padding
        ):
            if self.transposed:
                out.append((n - 1) * s - lo - hi + d * (k - 1) + op + 1)
            else:
                out.append((n + lo + hi - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return map_shape(self.out_channels, self.output_spatial, self.data_format)

    @property
    def covers_map(self) -> bool:
        """Whether one kernel position sees the whole (unpadded) input map."""
        return (
            not self.transposed
            and all(p == (0, 0) for p in self.pads())
            and self.kernel_size == self.spatial
            and all(d == 1 or k == 1 for d, k in zip(self.dilation, self.kernel_size))
        )

    def replace(self, **changes: Any) -> ConvSpec:
        return _replace(self, changes)

    def describe(self) -> str:
        extra = "".join(
            f", {f}={getattr(self, f)}"
            for f, default in (("stride", (1,) * self.rank), ("dilation", (1,) * self.rank), ("groups", 1))
            if getattr(self, f) != default
        )
        kind = "conv_transpose" if self.transposed else "conv"
        return (
            f"{self.name or kind}(in={self.in_channels}, out={self.out_channels}, kernel={self.kernel_size}, "
            f"spatial={self.spatial}, padding={self.padding}{extra}, data_format={self.data_format}, "
            f"layout={self.kernel_layout}, op={self.op})"
        )


LayerSpec = DenseSpec | ConvSpec


@dataclass(frozen=True)
class Shape:
    """Shape keywords for a preset layer (:func:`equivcheck.presets.build`); None: not given.

    One set of keywords describes both layers of a conversion: each layer takes those that
    apply to it (a dense layer no ``kernel_size``, a depthwise one ``multiplier``, not ``groups``).
    """

    channels: int | None = None
    spatial: Any = None
    units: int | None = None
    kernel_size: Any = None
    stride: Any = None
    dilation: Any = None
    padding: Any = None
    groups: int | None = None
    multiplier: int | None = None
    output_padding: Any = None
    bias: bool | None = None

    def need_channels(self, what: str) -> int:
        if self.channels is None:
            raise SpecError(f"channels is missing for {what}: pass channels=C, the channels of the map the layers read")
        return self.channels

    def spatial_or(self, default: tuple[int, ...]) -> tuple[int, ...]:
        """The map's spatial size, or ``default`` when none was given."""
        if self.spatial is None:
            return tuple(default)
        return (self.spatial,) if isinstance(self.spatial, int) else tuple(self.spatial)

    def given(self) -> dict[str, Any]:
        """The keywords that were given, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes: Any) -> Shape:
        return _replace(self, changes)


def _taps_per_output(n: int, k: int, s: int, d: int, lo: int, out: int) -> int:
    """Most kernel taps of a transposed conv axis that land on one output position."""
    return max(sum(1 for t in range(k) if (o + lo - t * d) % s == 0 and 0 <= (o + lo - t * d) // s < n)
               for o in range(out))


def fan_in(spec: LayerSpec) -> int:
    """The most non-zero products summed into one output element.

    ``in_features`` for a dense layer; ``in_channels / groups`` × kernel volume for a
    convolution (a depthwise one: the kernel volume); for a transposed convolution the
    channels per group times the most kernel taps that reach one output position, which a
    stride > 1 makes fewer than the kernel volume.
    """
    if isinstance(spec, DenseSpec):
        return spec.in_features
    per_group = spec.in_channels // spec.groups
    if not spec.transposed:
        return per_group * math.prod(spec.kernel_size)
    taps = math.prod(
        _taps_per_output(n, k, s, d, lo, out)
        for n, k, s, d, (lo, _), out in zip(spec.spatial, spec.kernel_size, spec.stride, spec.dilation,
                                             spec.pads(), spec.output_spatial)
    )
    return max(1, per_group * taps)


def _replace(spec: Any, changes: dict[str, Any]) -> Any:
    known = {f.name for f in fields(spec)}
    unknown = set(changes) - known
    if unknown:
        raise SpecError(f"{type(spec).__name__} has no field {sorted(unknown)[0]!r}: expected one of {', '.join(sorted(known))}")
    return replace(spec, **changes)
