"""Normalisation layers as checked pairs: batch norm (1-3-D), layer norm (last axis) and group norm.

A norm layer is fully described by its parameters: ``gamma``/``beta`` (the record's kernel and
bias), the running ``mean``/``var`` (batch norm, inference) and ``eps``. Each converted norm
layer is replayed alone on its partner's input and compared with a float64 reference computed
from the *source's* parameters, under a bound from the dtype's rounding and the size of the
reduction; a second replay on designed data (every channel non-constant, well away from its
mean) makes sure no channel escapes the check where the captured activations are sparse. A
failing pair is named from the parameters: mean and variance swapped, gamma and beta swapped,
eps differs (both values), statistics or affine parameters not copied (still at their initial
values), groups differ. A momentum convention that differs is a training-time note, never a failure.
Framework-free: the adapters fill :class:`~equivcheck.modelcheck.layers.Linear` records with
``kind`` in :data:`NORMS` and the parameters in ``config``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from equivcheck.compare import Comparison

__all__ = ["NORMS", "diagnose_norm", "judge_norm", "momentum_note", "norm_config", "reference"]

NORMS = ("batchnorm", "layernorm", "groupnorm")
_UNIT = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def norm_config(*, mean: Any = None, var: Any = None, eps: float, groups: int = 1, data_format: str,
                keep: float | None = None) -> dict[str, Any]:
    """A norm record's ``config``: statistics as float arrays, ``keep`` the share of the running statistics
    one training step keeps (torch ``1 - momentum``, Keras ``momentum``), where known."""
    def arr(a: Any) -> np.ndarray | None:
        return None if a is None else np.asarray(a)

    return {"mean": arr(mean), "var": arr(var), "eps": float(eps), "groups": int(groups), "data_format": data_format,
            "keep": keep}


def _params(kernel: np.ndarray | None, bias: np.ndarray | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.ones(channels) if kernel is None else np.asarray(kernel, np.float64).reshape(-1)
    b = np.zeros(channels) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return g, b


def _shape(xc: np.ndarray) -> list[int]:
    shape = [1] * xc.ndim
    shape[1] = -1
    return shape


def _factor(n: int) -> float:
    """The reduction factor of :func:`judge_norm`'s bound: ``16 + 4·sqrt(n)``."""
    return 16 + 4 * math.sqrt(n)


def _unit_of(xc: np.ndarray, dtype: str | None) -> str:
    """The dtype the layer is judged in: ``dtype`` where given, else the input's own (float32 when unknown)."""
    name = dtype or np.asarray(xc).dtype.name
    return name if name in _UNIT else "float32"


def _spread(x: np.ndarray, mu: np.ndarray, var: np.ndarray, eps: float, dtype: str) -> np.ndarray:
    """The magnitude of ``(x - mean)/sqrt(var + eps)`` for the bound, the variance computed either way.

    ``E[x²] - E[x]²`` (one pass, Flax's default ``use_fast_variance=True``) cancels: with ``c = 4 + 8·sqrt(n)``
    that variance is off by at most ``d = c·u·(E[x²] + E[x]²)`` (the two sums off by ``c/2·u`` of their
    magnitudes, ``E[x]²`` twice the mean's error, the subtraction one rounding), then clipped at zero, so the
    computed ``1/sqrt(var + eps)`` lies in ``[r, r_hi]``, ``r_hi = 1/sqrt(max(var - d, 0) + eps)`` (the exact
    worst case, not its linearisation: ``d`` may reach ``var``). The output then moves by ``|x - mean|·(r_hi - r)``
    (divided by the bound's ``(16 + 4·sqrt(n))·u`` to be a magnitude) and the rounding of ``x - mean`` is scaled
    by up to ``r_hi``. A two-pass variance (``d`` far smaller) is inside it.
    """
    n = x.shape[-1]
    u = _UNIT[dtype]
    d = (4 + 8 * math.sqrt(n)) * u * ((x * x).mean(axis=-1, keepdims=True) + mu * mu)
    r = 1 / np.sqrt(var + eps)
    r_hi = 1 / np.sqrt(np.maximum(var - d, 0.0) + eps)
    return (np.abs(x) + np.abs(mu)) * r_hi + np.abs(x - mu) * (r_hi - r) / (_factor(n) * u)


def reference(kind: str, xc: np.ndarray, kernel: np.ndarray | None, bias: np.ndarray | None,
              config: dict[str, Any], dtype: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(the exact output in float64, a magnitude per output for the bound, elements per reduction).

    ``xc`` is canonical: ``(N, C, *spatial)`` (batch and group norm) or ``(N, F)`` (layer norm). ``dtype`` is
    the one :func:`judge_norm` is given (``xc``'s own when None). The layer and group norm magnitudes cover
    the variance computed either way, two-pass or one-pass (:func:`_spread`).
    """
    x = np.asarray(xc, np.float64)
    channels = x.shape[1]
    g, b = _params(kernel, bias, channels)
    eps = config["eps"]
    if kind == "batchnorm":
        mean = np.asarray(config["mean"], np.float64).reshape(_shape(x))
        var = np.asarray(config["var"], np.float64).reshape(_shape(x))
        inv = 1 / np.sqrt(var + eps)
        y = (x - mean) * inv * g.reshape(_shape(x)) + b.reshape(_shape(x))
        mag = (np.abs(x) + np.abs(mean)) * inv * np.abs(g.reshape(_shape(x))) + np.abs(b.reshape(_shape(x)))
        return y, mag, 1
    if kind == "layernorm":
        flat = x.reshape(len(x), -1)
        mu = flat.mean(axis=1, keepdims=True)
        var = ((flat - mu) ** 2).mean(axis=1, keepdims=True)
        y = (flat - mu) / np.sqrt(var + eps) * g + b
        mag = _spread(flat, mu, var, eps, _unit_of(xc, dtype)) * np.abs(g) + np.abs(b)
        return y.reshape(x.shape), mag.reshape(x.shape), flat.shape[1]
    groups = config["groups"]
    grouped = x.reshape(len(x), groups, -1)
    mu = grouped.mean(axis=2, keepdims=True)
    var = ((grouped - mu) ** 2).mean(axis=2, keepdims=True)
    y = ((grouped - mu) / np.sqrt(var + eps)).reshape(x.shape) * g.reshape(_shape(x)) + b.reshape(_shape(x))
    spread = _spread(grouped, mu, var, eps, _unit_of(xc, dtype))
    mag = spread.reshape(x.shape) * np.abs(g.reshape(_shape(x))) + np.abs(b.reshape(_shape(x)))
    return y, mag, grouped.shape[2]


def judge_norm(actual: np.ndarray, exact: np.ndarray, mag: np.ndarray, n: int, dtype: str) -> Comparison:
    """``actual`` against the float64 ``exact`` under ``(16 + 4·sqrt(n))·u·magnitude`` (+ the output's own rounding)."""
    u = _UNIT[dtype]
    a = np.asarray(actual, np.float64)
    bound = _factor(n) * u * mag + u * np.abs(exact) + np.finfo(np.float64).tiny
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(a - exact), np.inf)
        ratio = err / bound
        absr = np.abs(exact)
        rel = np.divide(err, absr, out=np.where(err > 0, np.inf, 0.0), where=absr > 0)
    if a.size == 0:
        return Comparison(True, dtype, dtype, n, 0.0, 0.0, 0.0, 0.0, (), 0.0, 0, 0)
    worst = np.unravel_index(int(np.argmax(ratio)), a.shape)
    out = int(np.count_nonzero(~(ratio <= 1.0)))
    nonfinite = int(a.size - np.count_nonzero(finite))
    return Comparison(out == 0, dtype, dtype, n, float(np.max(err)), float(np.max(rel)), float(ratio[worst]),
                      float(bound[worst]), tuple(int(i) for i in worst), out / a.size, nonfinite, int(a.size))


def designed_input(xc: np.ndarray, seed: int) -> np.ndarray:
    """Dense values of the captured input's shape and scale: every channel varies, none sits at its mean."""
    rng = np.random.default_rng(seed)
    scale = float(np.max(np.abs(np.asarray(xc, np.float64)), initial=0.0)) or 1.0
    return (rng.standard_normal(xc.shape) * scale).astype(xc.dtype)


def _close(a: Any, b: Any, dtype: str) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a64, b64 = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return a64.shape == b64.shape and bool(np.allclose(a64, b64, rtol=4 * _UNIT[dtype], atol=0.0))


def _is(a: Any, value: float) -> bool:
    return a is not None and bool(np.all(np.asarray(a, np.float64) == value))


def diagnose_norm(kind: str, s_kernel: Any, s_bias: Any, s_cfg: dict[str, Any], c_kernel: Any, c_bias: Any,
                  c_cfg: dict[str, Any], dtype: str) -> tuple[str, str]:
    """(mistake, one sentence) from the two layers' parameters."""
    channels = int(np.asarray(s_kernel if s_kernel is not None else s_cfg["mean"]).size)
    sg, sb = _params(s_kernel, s_bias, channels)
    cg, cb = _params(c_kernel, c_bias, channels)
    found = []
    if kind == "batchnorm":
        sm, sv, cm, cv = s_cfg["mean"], s_cfg["var"], c_cfg["mean"], c_cfg["var"]
        if not (_close(sm, cm, dtype) and _close(sv, cv, dtype)):
            if _close(sm, cv, dtype) and _close(sv, cm, dtype):
                found.append(("mean and variance swapped", "the converted layer's running mean holds the source's "
                              "variance and its variance the source's mean"))
            elif _is(cm, 0.0) and _is(cv, 1.0):
                found.append(("statistics not copied", "the converted running mean and variance are still at their "
                              "initial values (0 and 1); the source's were not loaded"))
            elif _close(sm, cm, dtype):
                found.append(("wrong variance", "the running variance is not the source's"
                              + (" (it looks like the standard deviation)" if _close(np.sqrt(np.abs(np.asarray(sv, np.float64))), cv, dtype) else "")))
            elif _close(sv, cv, dtype):
                found.append(("wrong mean", "the running mean is not the source's"))
            else:
                found.append(("wrong statistics", "the running mean and variance are not the source's"))
    if not (_close(sg, cg, dtype) and _close(sb, cb, dtype)):
        if _close(sg, cb, dtype) and _close(sb, cg, dtype):
            found.append(("gamma and beta swapped", "the converted scale holds the source's offset and its offset "
                          "the source's scale"))
        elif _is(cg, 1.0) and _is(cb, 0.0):
            found.append(("scale and offset not copied", "the converted gamma and beta are still at their initial "
                          "values (1 and 0)"))
        elif _close(sg, cg, dtype):
            found.append(("wrong beta", "the offset (beta) is not the source's"))
        elif _close(sb, cb, dtype):
            found.append(("wrong gamma", "the scale (gamma) is not the source's"))
        else:
            found.append(("wrong scale and offset", "gamma and beta are not the source's"))
    if kind == "groupnorm" and s_cfg["groups"] != c_cfg["groups"]:
        found.append(("groups differ", f"the source normalises {s_cfg['groups']} groups, the converted layer "
                      f"{c_cfg['groups']}"))
    if s_cfg["eps"] != c_cfg["eps"] and not math.isclose(s_cfg["eps"], c_cfg["eps"], rel_tol=1e-6):
        found.append(("eps differs", f"eps {s_cfg['eps']:g} in the source, {c_cfg['eps']:g} in the converted layer"))
    if not found:
        return "weights right, output differs", ("the parameters are the source's: the layer computes differently "
                                                 "(axis, dtype or an op the framework adds)")
    if len(found) == 1:
        return found[0]
    return found[0][0], "; ".join(f"{name}: {detail}" for name, detail in found)


def momentum_note(s_cfg: dict[str, Any], c_cfg: dict[str, Any]) -> str:
    """A training-time note where the two layers keep different shares of their running statistics per step."""
    a, b = s_cfg.get("keep"), c_cfg.get("keep")
    if a is None or b is None or math.isclose(a, b, abs_tol=1e-6):
        return ""
    return (f"momentum differs (training only, inference is unaffected): the source keeps {a:g} of its running "
            f"statistics per step, the converted layer {b:g}")
