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
on disk too. A cached fact decides verdicts, so the file is not trusted: each row is keyed by
everything the probe depends on, signed (HMAC-SHA256) with a key kept outside the cache folder
(``EQUIVCHECK_FACTS_KEY``, default ``~/.config/equivcheck/facts.key``, made on first use), and
checked against what a probe of that layer in that dtype can answer. A row that fails, or a
file that is unreadable, not a regular file or larger than :data:`CACHE_MAX_BYTES`, is ignored
with one :class:`FactsCacheWarning` and probed again. Writes go to a temporary file created
exclusively beside the cache (no symlink followed), then renamed over it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import importlib.util
import json
import math
import os
import platform
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck.backends.base import Backend, np_dtype
from equivcheck.compare import compare, unit_roundoff
from equivcheck.errors import EquivcheckError, framework_message
from equivcheck.specs import DenseSpec, LayerSpec, fan_in

__all__ = ["KERNEL_ENV", "LAYER_KINDS", "Facts", "FactsCacheWarning", "clear_cache", "cpu_flags", "environment_key", "layer_kinds", "probe",
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
@functools.lru_cache(maxsize=1)
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
    """Forget every fact measured in this process (the disk cache is left alone, and read again when next used)."""
    _CACHE.clear()
    _DISK.clear()
    _STATE.clear()


def probe(backend: str | Backend, spec: LayerSpec, dtype: str) -> Facts:
    """The facts of ``spec`` in ``dtype`` on ``backend``, measured on first use and cached.

    Never raises for what the framework does: a framework error marks the layer as not
    running, with the framework's own message.
    """
    from equivcheck import backends

    return probe_with_keys(backends.get(backend) if isinstance(backend, str) else backend, spec, dtype, {})


def probe_with_keys(b: Backend, spec: LayerSpec, dtype: str, keys: dict[str, str]) -> Facts:
    """:func:`probe`, with the :func:`environment_key` of each backend kept in ``keys`` (by name) for the next
    call: a pair's two probes read the environment once."""
    np_dtype(dtype)
    static = b.unsupported(spec, dtype) if b.available() else f"{b.module} is not installed"
    if static:
        return Facts(b.name, dtype, spec.describe(), runs=False, reason=static)
    env = keys.get(b.name)
    if env is None:
        env = keys[b.name] = environment_key(b)
    key = (env, spec, dtype)
    if key in _CACHE:
        return _CACHE[key]
    label = spec.describe()
    facts = _from_disk(key, b, label)
    if facts is None:
        facts = _measure(b, spec, dtype, label)
        _to_disk(key, facts, b)
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
    from equivcheck.presets import PRESET_BACKENDS, PRESETS, spec

    preset = next((p for p, b in PRESET_BACKENDS.items() if b == backend), "torch")
    extra = {} if data_format is None else {"data_format": data_format}
    out = {}
    for kind, (layer, shape) in LAYER_KINDS.items():
        name = preset if layer in PRESETS[preset].layers() else "torch"
        out[kind] = spec(f"{name}:{layer}", **shape, **extra)
    return out


# -- the optional disk cache -------------------------------------------------------------
#: What the probe itself depends on beyond the environment key: change any, and cached rows no longer match.
PROBE_VERSION = f"probe-3 seed={_SEED} outputs={PROBE_OUTPUTS} max_kernel={PROBE_MAX_KERNEL} margin={MEASURED_MARGIN}"
#: A facts file above this is not one equivcheck wrote: ignored (with one warning) and rewritten.
CACHE_MAX_BYTES = 4 << 20
#: Rows kept on disk at most (the oldest go first).
CACHE_MAX_ROWS = 4096
_TEXT_MAX = 2000  # a reason, note or label longer than this is not one a probe wrote
_CACHE_FORMAT = 2
_KEY_BYTES = 32


class FactsCacheWarning(UserWarning):
    """The disk cache of probed facts, or one of its rows, was ignored (the facts are probed again)."""


_DISK: dict[str, Any] = {}  # digest -> row, as read from (and written to) the cache file
_STATE: dict[str, Any] = {}  # "loaded": the cache file read (or found unusable); "warned": messages already given


def _warn(message: str) -> None:
    warned = _STATE.setdefault("warned", set())
    if message not in warned:
        warned.add(message)
        import warnings

        warnings.warn(f"facts cache {message}", FactsCacheWarning, stacklevel=4)


def _cache_file() -> Path | None:
    where = os.environ.get("EQUIVCHECK_FACTS_CACHE", "")
    if not where or where == "0":
        return None
    if where == "1":
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "equivcheck" / "facts.json"
    return Path(where) / "facts.json"


def _key_file() -> Path:
    """Where the key that signs cached rows lives: ``EQUIVCHECK_FACTS_KEY``, else the user's config folder."""
    where = os.environ.get("EQUIVCHECK_FACTS_KEY", "")
    if where:
        return Path(where)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "equivcheck" / "facts.key"


def _signing_key(cache: Path) -> bytes | None:
    """This machine's key for the cache's rows, kept outside the cache folder; made on first use (mode 600).

    None (with one warning) when it lies inside the cache folder, or cannot be read or made:
    the disk cache is then not used at all.
    """
    if "key" in _STATE:
        return _STATE["key"]
    path = _key_file()
    key = None
    try:
        folder = cache.parent.resolve()
        if path.resolve() == folder or folder in path.resolve().parents:
            _warn(f"key file={str(path)!r} lies inside the cache folder={str(folder)!r}, where whoever writes the cache "
                  "could forge rows: not used; set EQUIVCHECK_FACTS_KEY to a file outside it")
        else:
            key = _read_key(path)
            if key is None:
                key = _make_key(path)
    except OSError as exc:
        _warn(f"key file={str(path)!r} cannot be used ({exc.strerror or exc}): the disk cache is not used")
        key = None
    _STATE["key"] = key
    return key


def _read_key(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError("not a regular file; delete it to make a new key")
    with os.fdopen(fd, "rb") as fh:
        text = fh.read(4 * _KEY_BYTES)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != _KEY_BYTES or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(f"not a {_KEY_BYTES}-byte hex key in a regular file of this user, writable by no one else; "
                      "delete it to make a new one")
    return key


def _make_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another process made it meanwhile
        made = _read_key(path)
        if made is None:
            raise
        return made
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


#: The modules whose code decides a probe's answer besides the backend's own (its source is hashed into the key).
_PROBE_CODE = ("equivcheck.backends.probe", "equivcheck.compare", "equivcheck.data", "equivcheck.backends.numpy",
               "equivcheck.backends.base")


def _row_key(key: tuple[str, LayerSpec, str], backend: Backend) -> dict[str, str]:
    """Everything a probe's answer depends on: environment, layer, dtype, the probe's own design and code,
    the reference's numpy."""
    from equivcheck.version import __version__

    env, spec, dtype = key
    return {"environment": env, "spec": repr(spec), "dtype": dtype, "probe": PROBE_VERSION,
            "code": _code_digest_of(backend),
            "versions": f"equivcheck {__version__} numpy {np.__version__} python {platform.python_version()}"}


def _code_digest_of(backend: Backend) -> str:
    cached = _STATE.setdefault("code", {})
    if backend.name not in cached:
        digest = hashlib.sha256()
        for name in (*_PROBE_CODE, type(backend).__module__):
            with contextlib.suppress(OSError, TypeError, AttributeError, ImportError, ValueError):
                origin = importlib.util.find_spec(name).origin  # type: ignore[union-attr]  # not imported: only read
                digest.update(name.encode() + b"\0" + Path(str(origin)).read_bytes())
        cached[backend.name] = digest.hexdigest()[:24]
    return cached[backend.name]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(row_key: dict[str, str]) -> str:
    return hashlib.sha256(_canonical(row_key)).hexdigest()[:32]


def _mac(secret: bytes, row_key: dict[str, str], facts: dict[str, Any]) -> str:
    return hmac.new(secret, _canonical({"key": row_key, "facts": facts}), hashlib.sha256).hexdigest()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]!r} is not finite")
    return value


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _parse_int(text: str) -> int:
    if len(text) > 30:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _load_disk(path: Path) -> None:
    """Read the cache file once: a file that is missing is empty; one that is not a regular file, too large or
    not the expected JSON is ignored with one warning (its rows are probed again and the file is rewritten)."""
    _STATE["loaded"] = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except FileNotFoundError:
        return
    except OSError as exc:
        _warn(f"file={str(path)!r} cannot be read ({exc.strerror or exc}): ignored, facts probed again")
        return
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _warn(f"file={str(path)!r} is not a regular file: ignored, facts probed again")
        return
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > CACHE_MAX_BYTES:
            _warn(f"file={str(path)!r} holds {st.st_size} bytes, more than the {CACHE_MAX_BYTES} a facts cache takes: "
                  "ignored, facts probed again")
            return
        try:
            data = fh.read(CACHE_MAX_BYTES + 1)
        except OSError as exc:
            _warn(f"file={str(path)!r} cannot be read ({exc.strerror or exc}): ignored, facts probed again")
            return
    try:
        doc = json.loads(data, parse_float=_finite, parse_int=_parse_int, parse_constant=_refuse_constant)
        if len(data) > CACHE_MAX_BYTES:
            raise ValueError("it grew while being read")
        if not (isinstance(doc, dict) and doc.get("format") == _CACHE_FORMAT and isinstance(doc.get("rows"), dict)):
            raise ValueError(f"expected an object with format={_CACHE_FORMAT} and rows")
    except (ValueError, RecursionError) as exc:
        _warn(f"file={str(path)!r} is not a facts cache ({str(exc).splitlines()[0][:100] if str(exc) else 'not JSON'}): "
              "ignored, facts probed again")
        return
    _DISK.update(list(doc["rows"].items())[-CACHE_MAX_ROWS:])


def _from_disk(key: tuple[str, LayerSpec, str], backend: Backend, label: str) -> Facts | None:
    path = _cache_file()
    if path is None:
        return None
    secret = _signing_key(path)
    if secret is None:
        return None
    if not _STATE.get("loaded"):
        _load_disk(path)
    row_key = _row_key(key, backend)
    digest = _digest(row_key)
    if digest not in _DISK:
        return None
    row = _DISK[digest]
    problem = _row_problem(row, secret, row_key, backend, key[1], key[2], label)
    if problem is None:
        return Facts(**row["facts"])
    del _DISK[digest]
    _warn(f"row {digest} of {str(path)!r} ({label} in {key[2]} on {backend.name}) {problem}: ignored, probed again")
    return None


_FIELDS = {f: t for f, t in Facts.__annotations__.items()}
_TYPES = {"str": str, "bool": bool, "int": int}


def _row_problem(row: Any, secret: bytes, row_key: dict[str, str], backend: Backend, spec: LayerSpec, dtype: str,
                 label: str) -> str | None:
    """Why ``row`` cannot be trusted for this key, or None: its shape, its signature, then what a probe can say."""
    if not isinstance(row, dict) or set(row) != {"key", "facts", "mac"}:
        return "is not a {key, facts, mac} object"
    facts = row["facts"]
    if not isinstance(facts, dict) or set(facts) != set(_FIELDS):
        return f"has facts with fields other than {', '.join(_FIELDS)}"
    for name, kind in _FIELDS.items():
        value = facts[name]
        if type(value) is not _TYPES[kind]:
            return f"has {name}={str(value)[:40]!r}: expected a {kind}"
        if isinstance(value, str) and len(value) > _TEXT_MAX:
            return f"has a {name} of {len(value)} characters"
    if row["key"] != row_key:
        return "was measured for another key"
    if not isinstance(row["mac"], str) or not hmac.compare_digest(row["mac"], _mac(secret, row_key, facts)):
        return "is not signed by this machine's key (edited, or written elsewhere)"
    return _implausible(facts, backend, spec, dtype, label)


def _implausible(f: dict[str, Any], backend: Backend, spec: LayerSpec, dtype: str, label: str) -> str | None:
    """What in ``f`` no probe of ``spec`` in ``dtype`` on ``backend`` can answer, or None."""
    small = probe_spec(spec)
    probed_on = "" if small is spec else small.describe()
    if (f["backend"], f["dtype"], f["layer"]) != (backend.name, dtype, label):
        return f"names backend={f['backend'][:40]!r} dtype={f['dtype'][:20]!r}: expected {backend.name} {dtype}"
    if f["probed_on"] != probed_on:
        return f"says probed_on={f['probed_on'][:60]!r}: expected {probed_on!r}"
    if not f["runs"]:
        if not f["reason"] or f["accumulate"] or f["roundings"] != 2 or not f["decided"] or f["note"]:
            return "says the layer does not run but carries a decision, or no reason"
        return None
    if f["reason"]:
        return "says the layer runs but gives a reason it does not"
    acc, low = f["accumulate"], dtype in ("float16", "bfloat16")
    measured = low and acc.startswith("2^-") and acc[3:].isdigit() and len(acc) <= 6 and (
        unit_roundoff("float32") < 2.0 ** -int(acc[3:]) < unit_roundoff(dtype))
    if acc not in _candidates(dtype) and not measured:
        return f"says accumulate={acc[:20]!r}: a probe in {dtype} answers one of {', '.join(_candidates(dtype))}" + (
            " or a measured 2^-k" if low else "")
    allowed = ((1, 2) if acc in ("float64", "float32") else (2,)) if spec.bias else (1,)
    if f["roundings"] not in allowed:
        return f"says roundings={f['roundings']} for accumulate={acc}: expected {' or '.join(map(str, allowed))}"
    if not f["decided"] and not (low and acc == dtype and f["roundings"] == 2 and f["note"]):
        return "says undecided where a probe always decides"
    if f["decided"] and f["note"]:
        return "carries a note without being undecided"
    return None


def _to_disk(key: tuple[str, LayerSpec, str], facts: Facts, backend: Backend) -> None:
    path = _cache_file()
    if path is None:
        return
    secret = _signing_key(path)
    if secret is None:
        return
    row_key, values = _row_key(key, backend), facts.to_dict()
    digest = _digest(row_key)
    _DISK.pop(digest, None)
    _DISK[digest] = {"key": row_key, "facts": values, "mac": _mac(secret, row_key, values)}
    while len(_DISK) > CACHE_MAX_ROWS:
        del _DISK[next(iter(_DISK))]
    text = json.dumps({"format": _CACHE_FORMAT, "rows": _DISK}, ensure_ascii=True)
    while len(text) > CACHE_MAX_BYTES and len(_DISK) > 1:
        for old in list(_DISK)[: max(1, len(_DISK) // 4)]:
            del _DISK[old]
        text = json.dumps({"format": _CACHE_FORMAT, "rows": _DISK}, ensure_ascii=True)
    try:
        _write_atomically(path, text.encode())
    except OSError as exc:
        _warn(f"file={str(path)!r} cannot be written ({exc.strerror or exc}): facts kept for this process only")


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` to a new file created exclusively beside ``path`` (no symlink followed), then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
