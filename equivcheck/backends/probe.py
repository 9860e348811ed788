"""Machine facts, measured: does a layer run here, how often is its output rounded, what do its sums use.

Conventions (kernel layouts, flatten order, correlation or convolution) are data in
:mod:`equivcheck.presets`. What a framework does on *this* CPU — whether its kernel for a
layer exists in a dtype and layout, whether the bias is added in the same rounding as the
sum, and in which precision float16/bfloat16 products are summed — depends on the CPU
(AVX512-FP16, AMX, oneDNN or not) and on the framework build, so it is probed: the layer runs
once on the probe's own weights and inputs and is compared with the float64 reference.

The probe never sees the weights under test, so a wrong conversion cannot loosen its own bound.
Its data are signed and spread over several binades: partial sums then need more bits than
the dtype has, and summing in the dtype leaves errors far above what one rounding of the
output allows, while summing in float32 stays within it. A bias of the output's own size
tells one rounding from two. Facts are cached per process, keyed by the framework version,
the CPU and the environment variables that steer kernel choice; with
``EQUIVCHECK_FACTS_CACHE`` set (a folder, or ``1`` for the user's cache folder) they are kept
on disk too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck.backends.base import Backend, np_dtype
from equivcheck.compare import compare, unit_roundoff
from equivcheck.errors import EquivcheckError, framework_message
from equivcheck.specs import DenseSpec, LayerSpec, fan_in

__all__ = ["KERNEL_ENV", "LAYER_KINDS", "Facts", "clear_cache", "cpu_flags", "environment_key", "layer_kinds", "probe",
           "probe_spec"]

#: Environment variables that change which kernels the frameworks pick.
KERNEL_ENV = (
    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "TF_ENABLE_ONEDNN_OPTS",
    "TF_ENABLE_XLA", "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS",
)
#: CPU features that change the float16/bfloat16 kernels.
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16", "amx_tile", "asimdhp", "sve")
#: Probe layers at most this large; a larger spec is probed on a smaller twin of the same structure.
PROBE_MAX_KERNEL = 1 << 16
#: Outputs the probe compares (over the batch).
PROBE_OUTPUTS = 512
_SEED = 20261202


@dataclass(frozen=True)
class Facts:
    """What one backend does with one layer in one dtype on this machine."""

    backend: str
    dtype: str
    layer: str
    runs: bool
    reason: str = ""  # why it does not run (the framework's own words), or computes wrongly
    accumulate: str = ""  # the precision its sums are judged in: float64, float32, tf32, bf16x, float16, bfloat16
    roundings: int = 2  # times the output is rounded: 1 with the bias fused into the sum, 2 when added after
    decided: bool = True  # False: the probe could not tell; the looser answer is used
    note: str = ""
    probed_on: str = ""  # the smaller layer of the same structure that was probed, when not the layer itself

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.runs:
            return f"does not run: {self.reason}"
        text = f"sums in {self.accumulate}, output rounded {'once' if self.roundings == 1 else 'twice'}"
        return text if self.decided else f"{text} (undecided: {self.note})"


# -- keys --------------------------------------------------------------------------------
def cpu_flags() -> str:
    """The machine and the CPU features that change kernels: ``"x86_64 avx2 avx512f"``."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    return " ".join([platform.machine(), *(f for f in _CPU_FEATURES if f in flags)])


def _framework_capability(backend: Backend) -> str:
    """What the backend's framework says of the CPU it dispatches for (frameworks already loaded only)."""
    parts = []
    torch = sys.modules.get("torch")
    if backend.name == "torch" and torch is not None:
        with contextlib.suppress(Exception):
            parts.append(f"aten={torch.backends.cpu.get_cpu_capability()}")
    if backend.module in ("tensorflow", "keras") and "tensorflow" in sys.modules:
        with contextlib.suppress(Exception):
            from tensorflow.python.util import _pywrap_util_port  # the only place TF says whether oneDNN is on

            parts.append(f"onednn={_pywrap_util_port.IsMklEnabled()}")
    return " ".join(parts)


def environment_key(backend: Backend) -> str:
    """Framework version, CPU and kernel-steering environment: facts measured under one key hold under it."""
    env = ",".join(f"{v}={os.environ[v]}" for v in KERNEL_ENV if v in os.environ)
    return f"{backend.name} {backend.version()} | {cpu_flags()} {_framework_capability(backend)} | {env}"


# -- the probe's layer and data ----------------------------------------------------------
def probe_spec(spec: LayerSpec) -> LayerSpec:
    """``spec``, or a smaller layer of the same structure when ``spec`` is too large to probe cheaply.

    Kind, rank, data format, kernel layout, stride, dilation, padding mode, groups (a depthwise
    layer stays depthwise) and bias are kept; channels, units and map shrink.
    """
    if math.prod(spec.kernel_shape) <= PROBE_MAX_KERNEL:
        return spec
    if isinstance(spec, DenseSpec):
        spatial = tuple(min(n, 4) for n in spec.spatial)
        return spec.replace(channels=min(spec.channels, 16), spatial=spatial, units=min(spec.units, 16))
    g = spec.groups
    depthwise = g == spec.in_channels and g > 1
    cin = min(spec.in_channels // g, 16) * (1 if depthwise else g)
    groups = cin if depthwise else g
    cout = (spec.out_channels // spec.in_channels) * cin if depthwise else min(spec.out_channels // g, 16) * g
    changes: dict[str, Any] = dict(in_channels=cin, out_channels=cout, groups=groups)
    for _ in range(2):
        with contextlib.suppress(EquivcheckError):
            smaller = spec.replace(**changes)
            if math.prod(smaller.kernel_shape) <= PROBE_MAX_KERNEL:
                return smaller
        changes.update(in_channels=max(groups, cin // 4) if not depthwise else cin,
                       out_channels=max(groups, cout // 4) if not depthwise else cout)
    return spec


def probe_batch(spec: LayerSpec) -> int:
    """Samples the probe runs: about :data:`PROBE_OUTPUTS` outputs in all."""
    return min(64, max(2, -(-PROBE_OUTPUTS // max(1, math.prod(spec.output_shape)))))


def probe_values(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Signed values over four binades, rounded to ``dtype``: their sums need more bits than ``dtype`` has."""
    v = rng.choice((-1.0, 1.0), size=shape) * np.exp2(rng.uniform(-2.0, 2.0, size=shape))
    return v.astype(np_dtype(dtype)) if dtype != "float64" else v


def probe_bias(spec: LayerSpec, dtype: str, rng: np.random.Generator) -> np.ndarray | None:
    """A bias of the outputs' own size: rounding the sum before adding it then shows."""
    if not spec.bias:
        return None
    return (rng.standard_normal(spec.bias_shape) * 2.0 * math.sqrt(fan_in(spec))).astype(np_dtype(dtype))


def _probe_data(spec: LayerSpec, dtype: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    rng = np.random.default_rng(_SEED)
    kernel = probe_values(spec.kernel_shape, dtype, rng)
    x = probe_values((probe_batch(spec), *spec.input_shape), dtype, rng)
    return kernel, probe_bias(spec, dtype, rng), x


def _reference(spec: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    from equivcheck.backends.numpy import forward

    f64 = np.float64
    return forward(spec, kernel.astype(f64), None if bias is None else bias.astype(f64), x.astype(f64))


# -- the decision ------------------------------------------------------------------------
def _candidates(dtype: str) -> tuple[str, ...]:
    """Accumulation precisions to try, tightest first."""
    if dtype == "float64":
        return ("float64",)
    if dtype == "float32":
        return ("float32", "tf32", "bf16x")
    return ("float32", dtype)


@dataclass(frozen=True)
class _Observation:
    """A layer's output on one probe input, with the float64 truth the bound is built from."""

    y: np.ndarray
    exact: np.ndarray
    exact_nb: np.ndarray | None  # without the bias
    magnitude: np.ndarray
    fan_in: int  # non-zero products per output

    def fits(self, dtype: str, accumulate: str, roundings: int) -> float:
        nb = self.exact_nb if roundings == 2 else None
        return compare(self.y, self.exact, self.magnitude, dtype=dtype, fan_in=self.fan_in, accumulate=accumulate,
                       exact_without_bias=nb).max_error_ratio


def _observe(layer: Any, spec: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> _Observation:
    layer.set_weights(kernel, bias)
    y = np.asarray(layer(x))
    if y.shape != (len(x), *spec.output_shape):
        raise _WrongShape(f"returned an output of shape={y.shape}: expected {(len(x), *spec.output_shape)}")
    nonzero = int(np.count_nonzero(x.reshape(len(x), -1), axis=1).max(initial=1))
    return _Observation(y, _reference(spec, kernel, bias, x), None if bias is None else _reference(spec, kernel, None, x),
                        _reference(spec, np.abs(kernel), None if bias is None else np.abs(bias), np.abs(x)),
                        max(1, min(fan_in(spec), nonzero)))


class _WrongShape(Exception):
    pass


def _decide(backend: str, dtype: str, seen: list[_Observation], label: str, probed_on: str) -> Facts:
    """The tightest accumulation precision and rounding count every observation fits."""
    base = dict(backend=backend, dtype=dtype, layer=label, probed_on=probed_on)
    candidates = list(_candidates(dtype))
    low = dtype in ("float16", "bfloat16")
    if low:  # between float32 and the dtype: the precision the errors show, with a margin
        measured = [_measured_precision(o, dtype) for o in seen]
        candidates.insert(1, min(measured, key=lambda name: -unit_roundoff(name) if name else 0.0))
    has_bias = seen[0].exact_nb is not None
    n = max(o.fan_in for o in seen)
    ratios = {}
    for acc in dict.fromkeys(c for c in candidates if c):
        # below float32 sums the second rounding is not told apart from the sums' own errors: assume it
        for roundings in ((1, 2) if acc in ("float64", "float32") else (2,)) if has_bias else (1,):
            ratios[acc, roundings] = max(o.fits(dtype, acc, roundings) for o in seen)
            if ratios[acc, roundings] <= 1:
                if acc == "float32" and low and n <= 2:  # the looser answer
                    note = f"fan-in {n}: too few products to show how they are summed"
                    return Facts(**base, runs=True, accumulate=dtype, roundings=2, decided=False, note=note)
                return Facts(**base, runs=True, accumulate=acc, roundings=roundings)
    worst = min(ratios.values())
    return Facts(**base, runs=False, reason=(
        f"{backend} computes a different result here: its error is {worst:.3g}x the loosest bound "
        f"({candidates[-1]} sums) on the probe's data"))


#: How far above the largest accumulation error the probe saw a measured precision is set.
MEASURED_MARGIN = 4.0


def _measured_precision(o: _Observation, dtype: str) -> str | None:
    """``"2^-k"``: the smallest power of two at least :data:`MEASURED_MARGIN` × the accumulation error seen.

    The error left after the output's two roundings, per ``√n·|W|·|x|``, is what the sums added.
    None when that is float32's or the dtype's own precision anyway.
    """
    u_out = unit_roundoff(dtype)
    e = np.abs(o.exact)
    rounding = u_out * (e + (e if o.exact_nb is None else np.abs(o.exact_nb)))
    excess = np.maximum(np.abs(o.y.astype(np.float64) - o.exact) - rounding, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(o.magnitude > 0, excess / (math.sqrt(o.fan_in) * o.magnitude), 0)
    seen = float(np.nanmax(per, initial=0.0)) * MEASURED_MARGIN
    if not math.isfinite(seen) or seen <= unit_roundoff("float32"):
        return None
    k = math.floor(-math.log2(seen))
    return f"2^-{k}" if 2.0**-k < u_out else None


_CACHE: dict[tuple[str, LayerSpec, str], Facts] = {}


def clear_cache() -> None:
    """Forget every fact measured in this process (the disk cache is left alone)."""
    _CACHE.clear()
    _DISK.clear()


def probe(backend: str | Backend, spec: LayerSpec, dtype: str) -> Facts:
    """The facts of ``spec`` in ``dtype`` on ``backend``, measured on first use and cached.

    Never raises for what the framework does: a framework error marks the layer as not
    running, with the framework's own message.
    """
    from equivcheck import backends

    b = backends.get(backend) if isinstance(backend, str) else backend
    np_dtype(dtype)
    label = spec.describe()
    static = b.unsupported(spec, dtype) if b.available() else f"{b.module} is not installed"
    if static:
        return Facts(b.name, dtype, label, runs=False, reason=static)
    key = (environment_key(b), spec, dtype)
    if key in _CACHE:
        return _CACHE[key]
    facts = _from_disk(key)
    if facts is None:
        facts = _measure(b, spec, dtype, label)
        _to_disk(key, facts)
    _CACHE[key] = facts
    return facts


def _measure(b: Backend, spec: LayerSpec, dtype: str, label: str) -> Facts:
    """Run the probe's inputs: dense and signed over four binades; in float16/bfloat16 also verify's sparse kind."""
    from equivcheck.data import LOW_PRECISION_NONZEROS, sample_inputs, sample_weights

    small = probe_spec(spec)
    probed_on = "" if small is spec else small.describe()
    try:
        layer = b.build(small, dtype)
        seen = [_observe(layer, small, *_probe_data(small, dtype))]
        if dtype in ("float16", "bfloat16"):  # few products per output: product and bias roundings show
            rng = np.random.default_rng(_SEED + 1)
            kernel, bias = sample_weights(small, dtype, rng, nonzeros=LOW_PRECISION_NONZEROS)
            x = sample_inputs(small, None, dtype, rng, layout="native", nonzeros=LOW_PRECISION_NONZEROS)
            seen.append(_observe(layer, small, kernel, bias, x))
    except _WrongShape as exc:
        return Facts(b.name, dtype, label, runs=False, probed_on=probed_on, reason=f"{b.name} {exc}")
    except Exception as exc:  # whatever the framework raises: the layer does not run here
        return Facts(b.name, dtype, label, runs=False, reason=framework_message(exc), probed_on=probed_on)
    return _decide(b.name, dtype, seen, label, probed_on)


# -- the layers `equivcheck backends --facts`, the tests and the soundness benchmark probe ---------
#: kind -> (preset layer, shape keywords): fan-ins of 25 to 216, enough to show how products are summed.
LAYER_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", dict(channels=16, spatial=(3, 3), units=8)),
    "conv1d": ("conv", dict(channels=16, spatial=(9,), kernel_size=(5,), units=8)),
    "conv2d": ("conv", dict(channels=16, spatial=(6, 6), kernel_size=(3, 3), units=8)),
    "conv3d": ("conv", dict(channels=8, spatial=(4, 4, 4), kernel_size=(3, 3, 3), units=4)),
    "conv_transpose2d": ("conv_transpose", dict(channels=16, spatial=(4, 4), kernel_size=(3, 3), units=8, stride=2)),
    "depthwise2d": ("depthwise", dict(channels=8, spatial=(8, 8), kernel_size=(5, 5), multiplier=2)),
    "grouped2d": ("conv", dict(channels=16, spatial=(6, 6), kernel_size=(3, 3), units=8, groups=4)),
}


def layer_kinds(backend: str, data_format: str | None = None) -> dict[str, LayerSpec]:
    """:data:`LAYER_KINDS` as specs under the conventions of ``backend``'s own preset (torch's where it has none)."""
    from equivcheck.checker import PRESET_BACKENDS
    from equivcheck.presets import PRESETS, spec

    preset = next((p for p, b in PRESET_BACKENDS.items() if b == backend), "torch")
    extra = {} if data_format is None else {"data_format": data_format}
    out = {}
    for kind, (layer, shape) in LAYER_KINDS.items():
        name = preset if layer in PRESETS[preset].layers() else "torch"
        out[kind] = spec(f"{name}:{layer}", **shape, **extra)
    return out


# -- the optional disk cache -------------------------------------------------------------
_DISK: dict[str, dict[str, Any]] = {}


def _cache_file() -> Path | None:
    where = os.environ.get("EQUIVCHECK_FACTS_CACHE", "")
    if not where or where == "0":
        return None
    if where == "1":
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "equivcheck" / "facts.json"
    return Path(where) / "facts.json"


def _digest(key: tuple[str, LayerSpec, str]) -> str:
    env, spec, dtype = key
    return hashlib.sha256(f"{env}\x1f{spec!r}\x1f{dtype}".encode()).hexdigest()[:24]


def _from_disk(key: tuple[str, LayerSpec, str]) -> Facts | None:
    path = _cache_file()
    if path is None:
        return None
    if not _DISK:
        with contextlib.suppress(OSError, ValueError):
            _DISK.update(json.loads(path.read_text()))
    row = _DISK.get(_digest(key))
    with contextlib.suppress(TypeError):
        return None if row is None else Facts(**row)
    return None


def _to_disk(key: tuple[str, LayerSpec, str], facts: Facts) -> None:
    path = _cache_file()
    if path is None:
        return
    _DISK[_digest(key)] = facts.to_dict()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(_DISK))
        os.replace(tmp, path)
