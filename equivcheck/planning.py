"""The planner: the weight :class:`~equivcheck.mapping.Mapping` between two layer specs.

Every spec's stored kernel maps to a *canonical* tensor: ``(out, in, *kernel)`` in
cross-correlation form (``(in, out, *kernel)`` for a transposed conv), where a dense layer is
a kernel covering its whole input map. Two layers compute the same function when their
canonical tensors describe the same operation; the mapping is then
``canonical(src)`` followed by the inverse of ``canonical(dst)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from equivcheck import _arrays
from equivcheck.errors import NoMapping, SpecError
from equivcheck.mapping import Mapping
from equivcheck.sequence import named as sequence_named
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec

__all__ = ["canonical", "convert", "plan"]

SEQUENCE_SPECS = (RecurrentSpec, AttentionSpec)


@lru_cache(maxsize=1024)
def canonical(spec: LayerSpec) -> Mapping:
    """Mapping from ``spec``'s stored kernel to its canonical tensor."""
    if isinstance(spec, DenseSpec):
        m = Mapping.identity(spec.kernel_shape)
        if spec.kernel_layout == "IO":
            m = m.transpose(1, 0)
        sizes = dict(zip(spec.map_letters, (spec.channels, *spec.spatial)))
        m = m.reshape(spec.units, *(sizes[a] for a in spec.flatten))
        return m.transpose(0, *(1 + spec.flatten.index(a) for a in spec.map_letters))
    if not isinstance(spec, ConvSpec):
        raise SpecError(f"spec={spec!r} is not a DenseSpec or ConvSpec")
    layout, letters = spec.kernel_layout, spec.letters
    m = Mapping.identity(spec.kernel_shape)
    if spec.is_depthwise_layout:
        m = m.transpose(*(layout.index(a) for a in "IM" + letters))
        m = m.reshape(spec.out_channels, 1, *spec.kernel_size)
    else:
        target = ("IO" if spec.transposed else "OI") + letters
        m = m.transpose(*(layout.index(a) for a in target))
    if spec.op == "convolve":
        m = m.flip(*range(2, 2 + spec.rank))
    return m


def _pointwise(conv: ConvSpec) -> bool:
    return all(k == 1 for k in conv.kernel_size)


def _dense_to_conv(src: DenseSpec, dst: ConvSpec) -> Mapping:
    def no(reason: str) -> NoMapping:
        return NoMapping(f"{src.describe()} and {dst.describe()} are not equivalent: {reason}")

    if dst.transposed:
        raise no("a transposed convolution spreads each input over many outputs; a dense layer does not")
    if dst.groups != 1:
        raise no(f"groups={dst.groups}: a dense layer mixes every input channel, so the conv needs groups=1")
    if (dst.in_channels, dst.out_channels) != (src.channels, src.units):
        raise no(
            f"channels differ: dense reads {src.channels} and outputs {src.units}, "
            f"conv reads {dst.in_channels} and outputs {dst.out_channels}"
        )
    m = canonical(src)
    if src.rank == 0 or all(s == 1 for s in src.spatial):
        # A dense layer on one position's channels: a 1×1 (pointwise) conv applied everywhere.
        if not _pointwise(dst):
            raise no(f"kernel_size={dst.kernel_size} but a dense layer on {src.channels} features is a pointwise (all-ones kernel) conv")
        if src.rank not in (0, dst.rank):
            raise no(f"dense map rank {src.rank} differs from conv rank {dst.rank}")
        slides = any(n > 1 for n in dst.spatial)
        if slides and (any(s != 1 for s in dst.stride) or any(p != (0, 0) for p in dst.pads())):
            raise no(f"stride={dst.stride}, padding={dst.padding}: a pointwise conv equal to a dense layer at every position needs stride 1 and no padding")
        return m.reshape(src.units, src.channels, *(1,) * dst.rank)
    if src.rank != dst.rank:
        raise no(f"the dense layer reads a rank-{src.rank} map, the conv is rank {dst.rank}")
    if dst.kernel_size != src.spatial:
        smaller = all(k <= s for k, s in zip(dst.kernel_size, src.spatial))
        why = "smaller than" if smaller else "different from"
        raise no(
            f"kernel_size={dst.kernel_size} is {why} the map spatial={src.spatial}: a dense layer sees the whole map at once, "
            f"so the conv needs kernel_size={src.spatial} with padding='valid'"
        )
    if any(p != (0, 0) for p in dst.pads()):
        raise no(f"padding={dst.padding!r}: a kernel covering the map needs padding='valid'")
    if any(d != 1 for d, k in zip(dst.dilation, dst.kernel_size) if k > 1):
        raise no(f"dilation={dst.dilation} skips inputs the dense layer reads")
    if dst.spatial != src.spatial:
        raise no(f"the conv reads spatial={dst.spatial}, the dense layer spatial={src.spatial}")
    return m


def _conv_to_conv(src: ConvSpec, dst: ConvSpec) -> Mapping:
    checks = (
        ("transposed", src.transposed, dst.transposed),
        ("kernel_size", src.kernel_size, dst.kernel_size),
        ("in_channels", src.in_channels, dst.in_channels),
        ("out_channels", src.out_channels, dst.out_channels),
        ("groups", src.groups, dst.groups),
        ("stride", src.stride, dst.stride),
        ("dilation", src.dilation, dst.dilation),
        ("padding", src.pads(), dst.pads()),
        ("output_padding", src.output_padding, dst.output_padding),
    )
    for name, a, b in checks:
        if a != b:
            raise NoMapping(
                f"no mapping from {src.describe()} to {dst.describe()}: {name} differs ({a} vs {b}); "
                "only kernel layout, data format and correlation/convolution may differ"
            )
    return canonical(src).then(canonical(dst).inverse())


@lru_cache(maxsize=1024)
def _plan(src: LayerSpec, dst: LayerSpec) -> Mapping:
    if isinstance(src, DenseSpec) and isinstance(dst, DenseSpec):
        if (src.channels, src.spatial, src.units) != (dst.channels, dst.spatial, dst.units):
            raise NoMapping(
                f"no mapping from {src.describe()} to {dst.describe()}: the dense layers read or write different shapes"
            )
        m = canonical(src).then(canonical(dst).inverse())
    elif isinstance(src, DenseSpec):
        m = _dense_to_conv(src, dst).then(canonical(dst).inverse())
    elif isinstance(dst, DenseSpec):
        m = canonical(src).then(_dense_to_conv(dst, src).inverse())
    else:
        m = _conv_to_conv(src, dst)
    return m.simplify().named(_axis_names(src), _axis_names(dst))


def plan(source: LayerSpec, target: LayerSpec) -> Mapping:
    """The mapping that turns ``source``'s kernel into ``target``'s, or :class:`NoMapping` saying why.

    The two layers compute the same function (up to the shape of their outputs: a dense
    layer's ``(units,)`` is a full-map conv's ``(units, 1, 1)``) once the kernel goes through
    the mapping and the bias is carried over unchanged. Recurrent and attention specs get a
    :class:`~equivcheck.sequence.named.NamedMapping`: one plan per target tensor.
    """
    if isinstance(source, SEQUENCE_SPECS) or isinstance(target, SEQUENCE_SPECS):
        return sequence_named.plan(source, target)
    for role, s in (("source", source), ("target", target)):
        if not isinstance(s, (DenseSpec, ConvSpec)):
            raise SpecError(f"{role}={s!r} is not a spec: build one with equivcheck.spec('keras:dense', ...)")
    return _plan(source, target)


def _axis_names(spec: LayerSpec) -> str:
    """The stored kernel's axis names: ``"io"``, ``"oihw"``, ``"hwim"``..."""
    return spec.kernel_layout.lower()


def convert(source: LayerSpec, target: LayerSpec, kernel: Any, bias: Any = None) -> tuple[Any, Any]:
    """Convert ``(kernel, bias)`` of ``source`` into ``target``'s; arrays keep their kind.

    A missing source bias becomes zeros when the target has one; a source bias that the
    target cannot hold is refused unless it is all zeros. Recurrent and attention specs take and
    give a dict of named tensors (``kernel`` is that dict; ``bias`` is not used).
    """
    if isinstance(source, SEQUENCE_SPECS) or isinstance(target, SEQUENCE_SPECS):
        return sequence_named.convert(source, target, kernel)
    m = plan(source, target)
    check_weights("kernel", kernel, m.in_shape, source)
    if bias is not None:
        check_weights("bias", bias, source.bias_shape, source)
    new_kernel = m.apply(kernel)
    if not target.bias:
        if bias is not None and bool(np.any(np.asarray(bias) != 0)):
            raise NoMapping(f"the target {target.describe()} has no bias but the source bias is not zero")
        return new_kernel, None
    if bias is None:
        return new_kernel, _arrays.ops_for(new_kernel).zeros(new_kernel, target.bias_shape)
    return new_kernel, _copy(bias)


def check_weights(name: str, array: Any, shape: tuple[int, ...], spec: LayerSpec) -> None:
    """Refuse weights of the wrong shape, a non-float dtype, or holding NaN/Inf."""
    got = tuple(int(s) for s in getattr(array, "shape", ()))
    if not hasattr(array, "shape"):
        raise SpecError(f"{name} of type={type(array).__name__} is not an array: expected a numpy, torch, tensorflow or jax array")
    if got != shape:
        raise SpecError(f"{name} shape={got} does not match {spec.describe()}: expected {shape}")
    _arrays.ops_for(array).check(array, name)
    values = np.asarray(_arrays.to_numpy(array))
    if not (np.issubdtype(values.dtype, np.floating) or values.dtype.name == "bfloat16"):
        raise SpecError(f"{name} dtype={values.dtype} is not a floating-point type: expected float16/bfloat16/float32/float64 weights")
    if not np.all(np.isfinite(values.astype(np.float32) if values.dtype.name == "bfloat16" else values)):
        raise SpecError(f"{name} holds NaN or Inf: a conversion of non-finite weights cannot be verified; fix the weights first")


def _copy(array: Any) -> Any:
    """A new array of the same kind and values: a converted bias never shares the caller's memory."""
    return Mapping.identity(tuple(int(s) for s in array.shape)).apply(array)
