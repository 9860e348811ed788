"""An independent float64 reference written from the equations (no framework).

Recurrent layers read ``x`` of shape (batch, time, input_size) from a zero state and return
every step's output (batch, time, directions·units), the backward direction reading the
sequence reversed and its outputs put back in time order, concatenated after the forward's.

- LSTM: ``i, f, o = σ(·)``, ``g = tanh(·)`` of ``W x + b_W + R h + b_R``; ``c = f c + i g``;
  ``h = o tanh(c)``.
- GRU: ``r, z = σ(W x + b_W + R h + b_R)``; reset after: ``n = tanh(W_n x + b_Wn + r (R_n h + b_Rn))``;
  reset before: ``n = tanh(W_n x + b_Wn + R_n (r h) + b_Rn)``; ``h = (1 - z) n + z h``.
- SimpleRNN: ``h = tanh(W x + b_W + R h + b_R)``.
- Attention: ``softmax(Q Kᵀ / √head_dim + mask) V`` per head, heads concatenated, then the
  output projection; ``mask`` (query, key) is True where a query may attend. With shared key/value
  heads (``kv_heads`` < ``heads``) query head ``h`` uses key/value head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from equivcheck.errors import SpecError
from equivcheck.sequence.named import canonical
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec, SequenceSpec

__all__ = ["GROWTH", "UNIT_ROUNDOFF", "error_bound", "forward", "magnitude"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _f64(weights: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}


def _direction(cell: str, reset_after: bool, W: np.ndarray, R: np.ndarray, b: np.ndarray, x: np.ndarray
               ) -> tuple[np.ndarray, float]:
    """One direction over ``x`` (batch, time, in): outputs and the largest |pre-activation| sum."""
    batch, steps, _ = x.shape
    units = R.shape[1]
    h = np.zeros((batch, units))
    c = np.zeros((batch, units))
    aW, aR, ab = np.abs(W), np.abs(R), np.abs(b)
    out, mag = [], 0.0
    for t in range(steps):
        xt = x[:, t]
        wx = np.einsum("gui,bi->bgu", W, xt) + b[0]
        rh = np.einsum("guv,bv->bgu", R, h) + b[1]
        m = np.einsum("gui,bi->bgu", aW, np.abs(xt)) + np.einsum("guv,bv->bgu", aR, np.abs(h)) + ab.sum(0)
        mag = max(mag, float(m.max()))
        if cell == "lstm":
            pre = wx + rh
            i, f, g, o = _sigmoid(pre[:, 0]), _sigmoid(pre[:, 1]), np.tanh(pre[:, 2]), _sigmoid(pre[:, 3])
            c = f * c + i * g
            h = o * np.tanh(c)
        elif cell == "gru":
            r = _sigmoid(wx[:, 0] + rh[:, 0])
            z = _sigmoid(wx[:, 1] + rh[:, 1])
            if reset_after:
                n = np.tanh(wx[:, 2] + r * rh[:, 2])
            else:
                n = np.tanh(wx[:, 2] + (r * h) @ R[2].T + b[1, 2])
            h = (1 - z) * n + z * h
        else:
            h = np.tanh(wx[:, 0] + rh[:, 0])
        out.append(h)
    return np.stack(out, 1), mag


def forward(spec: SequenceSpec, weights: dict[str, Any], inputs: Any, mask: Any = None) -> np.ndarray:
    """The layer's output in float64 from its named weights.

    ``inputs``: ``x`` (batch, time, input_size) for a recurrent layer; ``(query, key, value)``
    each (batch, time, embed_dim) for attention.
    """
    return _run(spec, weights, inputs, mask)[0]


def magnitude(spec: SequenceSpec, weights: dict[str, Any], inputs: Any, mask: Any = None) -> float:
    """The largest sum of absolute products behind one pre-activation (for the error bound)."""
    return _run(spec, weights, inputs, mask)[1]


def _run(spec: SequenceSpec, weights: dict[str, Any], inputs: Any, mask: Any) -> tuple[np.ndarray, float]:
    c = canonical(spec).apply(_f64(weights))
    if isinstance(spec, AttentionSpec):
        return _attention(spec, c, *(np.asarray(a, dtype=np.float64) for a in inputs), mask)
    assert isinstance(spec, RecurrentSpec)
    x = np.asarray(inputs, dtype=np.float64)
    outs, mag = [], 0.0
    for d in range(spec.directions):
        xd = x if d == 0 else x[:, ::-1]
        y, m = _direction(spec.cell, spec.reset_after, c[f"W{d}"], c[f"R{d}"], c[f"b{d}"], xd)
        outs.append(y if d == 0 else y[:, ::-1])
        mag = max(mag, m)
    return np.concatenate(outs, -1), mag


def _in_projections(spec: AttentionSpec, c: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each query head's q, k, v projection (3, heads, head_dim, E) and bias (3, heads, head_dim):
    with shared key/value heads, query head ``h`` reads key/value head ``h // (heads // kv_heads)``."""
    if "Win" in c:
        W = c["Win"]
        return W, c.get("bin", np.zeros(W.shape[:3]))
    kv = np.arange(spec.heads) // (spec.heads // spec.kv_heads)
    Wkv = c["Wkv"]
    bq, bkv = (c["bq"], c["bkv"]) if "bq" in c else (np.zeros(c["Wq"].shape[:2]), np.zeros(Wkv.shape[:3]))
    return np.stack([c["Wq"], Wkv[0][kv], Wkv[1][kv]]), np.stack([bq, bkv[0][kv], bkv[1][kv]])


def _attention(spec: AttentionSpec, c: dict[str, np.ndarray], q: np.ndarray, k: np.ndarray, v: np.ndarray,
               mask: Any) -> tuple[np.ndarray, float]:
    W, b = _in_projections(spec, c)
    proj = [np.einsum("bte,nde->btnd", a, W[j]) + b[j] for j, a in enumerate((q, k, v))]
    mag = max(float((np.einsum("bte,nde->btnd", np.abs(a), np.abs(W[j])) + np.abs(b[j])).max())
              for j, a in enumerate((q, k, v)))
    scores = np.einsum("btnd,bsnd->bnts", proj[0], proj[1]) / np.sqrt(spec.head_dim)
    if mask is not None:
        scores = np.where(np.asarray(mask, dtype=bool), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights = weights / weights.sum(-1, keepdims=True)
    heads = np.einsum("bnts,bsnd->btnd", weights, proj[2])
    out = np.einsum("btnd,end->bte", heads, c["Wo"]) + c.get("bo", 0.0)
    mag = max(mag, float((np.einsum("btnd,end->bte", np.abs(heads), np.abs(c["Wo"])) + np.abs(c.get("bo", 0.0))).max()))
    return out, mag


# -- a running error bound ----------------------------------------------------------------------
#: Unit roundoff of each dtype a layer may compute in.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: The probabilistic growth factor of a sum's rounding errors, k·√n (as for dense and conv layers).
GROWTH = 4.0


def _growth(n: int, ua: float) -> float:
    """The factor on Σ|terms| of a sum of ``n`` terms rounded at ``ua``: ``GROWTH·√n·ua``, or the worst case
    ``γ_n = n·ua / (1 − n·ua)`` where that is smaller (short sums: ``n`` < 16)."""
    return min(GROWTH * math.sqrt(n) * ua, n * ua / (1 - n * ua))


def error_bound(spec: SequenceSpec, weights: dict[str, Any], inputs: Any, dtype: str, mask: Any = None, *,
                accumulate: str | None = None) -> np.ndarray:
    """A bound on |layer − exact| per output element, for a layer computing in ``dtype``.

    A running error analysis along the exact float64 computation: each sum of ``n`` products
    adds ``min(4·√n, γ_n)·u_acc·Σ|products|`` (``u_acc`` the unit roundoff of ``accumulate``, the precision
    the sums run in: by default ``dtype`` itself, the worst a framework does), each rounded
    result ``u·|value|`` (twice where a bias is added apart), each activation its rounding plus the error of its argument
    times the largest slope over that argument's error interval; errors in the state are
    carried from step to step through the recurrent kernel (so depth and contraction count as
    they are, not as a worst case). Attention carries the errors through the projections, the
    scores (a shift of at most ε_i in score i moves softmax weight i by at most a factor
    e^{ε_i + max ε}), the weighted sum (whose weights sum to one: a shift of them moves it by
    Σ|δp|·|v − mean|) and the output projection.
    """
    for name in (dtype, accumulate or dtype):
        if name not in UNIT_ROUNDOFF:
            raise SpecError(f"dtype={name!r} is not supported for sequence layers: expected one of {', '.join(UNIT_ROUNDOFF)}")
    u, ua = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[accumulate or dtype]
    c = canonical(spec).apply(_f64(weights))
    if isinstance(spec, AttentionSpec):
        return _attention_bound(spec, c, *(np.asarray(a, dtype=np.float64) for a in inputs), mask, u, ua)
    assert isinstance(spec, RecurrentSpec)
    x = np.asarray(inputs, dtype=np.float64)
    outs = []
    for d in range(spec.directions):
        xd = x if d == 0 else x[:, ::-1]
        e = _direction_bound(spec.cell, spec.reset_after, c[f"W{d}"], c[f"R{d}"], c[f"b{d}"], xd, u, ua)
        outs.append(e if d == 0 else e[:, ::-1])
    return np.concatenate(outs, -1)


def _slope_sigmoid(z: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The largest σ' on [z − e, z + e]."""
    s = _sigmoid(np.maximum(np.abs(z) - e, 0.0))
    return s * (1 - s)


def _slope_tanh(z: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The largest tanh' on [z − e, z + e]."""
    return 1 - np.tanh(np.maximum(np.abs(z) - e, 0.0)) ** 2


def _direction_bound(cell: str, reset_after: bool, W: np.ndarray, R: np.ndarray, b: np.ndarray, x: np.ndarray,
                     u: float, ua: float) -> np.ndarray:
    batch, steps, inputs = x.shape
    units = R.shape[1]
    g_in = _growth(inputs + 1, ua)  # a sum over the inputs and a bias
    g_rec = _growth(units + 1, ua)
    act = 4 * u  # an activation: its own error (a few ulps) and its rounding, relative to its value
    aW, aR = np.abs(W), np.abs(R)
    h, c = np.zeros((batch, units)), np.zeros((batch, units))
    eh, ec = np.zeros((batch, units)), np.zeros((batch, units))
    out = []
    for t in range(steps):
        xt = x[:, t]
        wx = np.einsum("gui,bi->bgu", W, xt) + b[0]
        rh = np.einsum("guv,bv->bgu", R, h) + b[1]
        e_wx = g_in * (np.einsum("gui,bi->bgu", aW, np.abs(xt)) + np.abs(b[0])) + u * (2 * np.abs(wx) + np.abs(b[0]))
        e_rh = (g_rec * (np.einsum("guv,bv->bgu", aR, np.abs(h)) + np.abs(b[1])) + np.einsum("guv,bv->bgu", aR, eh)
                + u * (2 * np.abs(rh) + np.abs(b[1])))
        if cell == "lstm":
            pre = wx + rh
            e_pre = e_wx + e_rh + u * np.abs(pre)
            i, f, g, o = _sigmoid(pre[:, 0]), _sigmoid(pre[:, 1]), np.tanh(pre[:, 2]), _sigmoid(pre[:, 3])
            ei, ef, eo = (_slope_sigmoid(pre[:, k], e_pre[:, k]) * e_pre[:, k] + act * v
                          for k, v in ((0, i), (1, f), (3, o)))
            eg = _slope_tanh(pre[:, 2], e_pre[:, 2]) * e_pre[:, 2] + act * np.abs(g)
            c_new = f * c + i * g
            ec = (np.abs(f) * ec + (np.abs(c) + ec) * ef + np.abs(i) * eg + (np.abs(g) + eg) * ei
                  + 2 * u * (np.abs(f * c) + np.abs(i * g)) + u * np.abs(c_new))
            c = c_new
            tc = np.tanh(c)
            etc = _slope_tanh(c, ec) * ec + act * np.abs(tc)
            h_new = o * tc
            eh = np.abs(o) * etc + (np.abs(tc) + etc) * eo + u * np.abs(h_new)
        elif cell == "gru":
            pr, pz = wx[:, 0] + rh[:, 0], wx[:, 1] + rh[:, 1]
            epr = e_wx[:, 0] + e_rh[:, 0] + u * np.abs(pr)
            epz = e_wx[:, 1] + e_rh[:, 1] + u * np.abs(pz)
            r, z = _sigmoid(pr), _sigmoid(pz)
            er = _slope_sigmoid(pr, epr) * epr + act * r
            ez = _slope_sigmoid(pz, epz) * epz + act * z
            if reset_after:
                rn = r * rh[:, 2]
                e_rn = np.abs(r) * e_rh[:, 2] + (np.abs(rh[:, 2]) + e_rh[:, 2]) * er + u * np.abs(rn)
            else:
                rh_h = r * h
                e_rhh = np.abs(r) * eh + (np.abs(h) + eh) * er + u * np.abs(rh_h)
                rn = rh_h @ R[2].T + b[1, 2]
                e_rn = (g_rec * (np.abs(rh_h) @ aR[2].T + np.abs(b[1, 2])) + e_rhh @ aR[2].T
                        + u * (2 * np.abs(rn) + np.abs(b[1, 2])))
            inner = wx[:, 2] + rn
            e_inner = e_wx[:, 2] + e_rn + u * np.abs(inner)
            n = np.tanh(inner)
            en = _slope_tanh(inner, e_inner) * e_inner + act * np.abs(n)
            h_new = (1 - z) * n + z * h
            eh = (np.abs(1 - z) * en + (np.abs(n) + en) * (ez + u * np.abs(1 - z)) + np.abs(z) * eh + (np.abs(h) + eh) * ez
                  + 2 * u * (np.abs((1 - z) * n) + np.abs(z * h)) + u * np.abs(h_new))
        else:
            pre = wx[:, 0] + rh[:, 0]
            e_pre = e_wx[:, 0] + e_rh[:, 0] + u * np.abs(pre)
            h_new = np.tanh(pre)
            eh = _slope_tanh(pre, e_pre) * e_pre + act * np.abs(h_new)
        h = h_new
        out.append(eh)
    return np.stack(out, 1)


def _attention_bound(spec: AttentionSpec, c: dict[str, np.ndarray], q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     mask: Any, u: float, ua: float) -> np.ndarray:
    E, Dh = q.shape[-1], spec.head_dim
    W, b = _in_projections(spec, c)
    g_in = _growth(E + 1, ua)
    proj, err = [], []
    for j, a in enumerate((q, k, v)):
        p = np.einsum("bte,nde->btnd", a, W[j]) + b[j]
        m = np.einsum("bte,nde->btnd", np.abs(a), np.abs(W[j])) + np.abs(b[j])
        proj.append(p)
        err.append(g_in * m + u * (2 * np.abs(p) + np.abs(b[j])))
    (pq, pk, pv), (eq, ek, ev) = proj, err
    scale = 1 / np.sqrt(Dh)
    scores = np.einsum("btnd,bsnd->bnts", pq, pk) * scale
    e_scores = (np.einsum("btnd,bsnd->bnts", np.abs(pq), ek) + np.einsum("btnd,bsnd->bnts", eq, np.abs(pk) + ek)
                + _growth(Dh, ua) * np.einsum("btnd,bsnd->bnts", np.abs(pq), np.abs(pk))) * scale
    e_scores = e_scores + 3 * u * np.abs(scores)  # the product's rounding, the scaling's (before or after)
    keys = k.shape[1]
    if mask is not None:
        allowed = np.broadcast_to(np.asarray(mask, dtype=bool), scores.shape)
        scores = np.where(allowed, scores, -np.inf)
        e_scores = np.where(allowed, e_scores, 0.0)
    shifted = scores - scores.max(-1, keepdims=True)
    p = np.exp(shifted)
    p = p / p.sum(-1, keepdims=True)
    e_shift = p * np.expm1(e_scores + e_scores.max(-1, keepdims=True))  # the weights still sum to one
    e_round = p * (6 * u + _growth(keys, ua))  # exp, sum, division and the weight's own rounding
    heads = np.einsum("bnts,bsnd->btnd", p, pv)
    spread = np.abs(pv.transpose(0, 2, 1, 3)[:, :, None] - heads.transpose(0, 2, 1, 3)[:, :, :, None])
    # spread[b, n, t, s, d] = |v[b, s, n, d] - head[b, t, n, d]|
    e_heads = (np.einsum("bnts,bsnd->btnd", p, ev) + np.einsum("bnts,bntsd->btnd", e_shift, spread)
               + np.einsum("bnts,bsnd->btnd", e_shift + e_round, ev) + np.einsum("bnts,bsnd->btnd", e_round, np.abs(pv))
               + _growth(keys, ua) * np.einsum("bnts,bsnd->btnd", p, np.abs(pv)) + u * np.abs(heads))
    Wo = c["Wo"]
    bo = c.get("bo", np.zeros(Wo.shape[0]))
    out = np.einsum("btnd,end->bte", heads, Wo) + bo
    g_out = _growth(spec.inner_dim + 1, ua)
    return (np.einsum("btnd,end->bte", e_heads, np.abs(Wo))
            + g_out * (np.einsum("btnd,end->bte", np.abs(heads), np.abs(Wo)) + np.abs(bo)) + u * (2 * np.abs(out) + np.abs(bo)))
