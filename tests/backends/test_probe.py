"""The probes: their decisions on fake backends whose behaviour is known, and their agreement with the real frameworks.

The real-framework tests assert consistency, never a machine's fact: says it runs ⇔ it runs when
built directly; says float32 sums ⇔ the errors on fresh data fit the float32 bound; says
low-precision sums ⇒ they do not.
"""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.backends import probe as probes
from equivcheck.backends.base import ArrayLayer, Backend
from equivcheck.compare import compare
from equivcheck.specs import fan_in

from ._support import BACKEND_NAMES, reference, require

DENSE = ec.spec("torch:dense", channels=16, spatial=(3, 3), units=8)


def _rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.astype(ec.backends.np_dtype(dtype))


class _FakeLayer(ArrayLayer):
    """A dense layer whose rounding behaviour is chosen: ``mode`` in sum16, fused, unfused, wrong, raise, shape."""

    mode = "fused"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "raise":
            raise RuntimeError("no kernel for this\nsecond line")
        w = self.kernel.astype(np.float64).T if self.spec.kernel_layout == "OI" else self.kernel.astype(np.float64)
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        b = 0.0 if self.bias is None else self.bias.astype(np.float64)
        if self.mode == "sum16":  # every partial sum rounded to float16
            products = (flat[:, :, None] * w[None]).astype(np.float16)
            y = np.add.accumulate(products, axis=1, dtype=np.float16)[:, -1].astype(np.float64)
            return _rounded(y + b, self.dtype)
        if self.mode == "shape":
            return _rounded(flat @ w, self.dtype)[:, :-1]
        s = flat @ w
        if self.mode == "wrong":
            s = s[:, ::-1]
        if self.mode == "unfused":  # the sum rounded, then the bias added and rounded again
            s = _rounded(s, self.dtype).astype(np.float64)
        return _rounded(s + b, self.dtype)


def _fake(mode: str) -> Backend:
    layer_cls = type(f"Layer_{mode}", (_FakeLayer,), {"mode": mode})

    class Fake(Backend):
        name = f"fake-{mode}"
        module = "numpy"

        def build(self, spec, dtype="float32"):
            self._check(spec, dtype)
            return layer_cls(spec, dtype)

    return Fake()


@pytest.mark.parametrize(("mode", "accumulate", "roundings"), [
    ("fused", "float32", 1), ("unfused", "float32", 2), ("sum16", "float16", 2),  # below float32 sums: 2 assumed
])
def test_probe_finds_how_a_fake_backend_rounds_and_sums(mode, accumulate, roundings):
    facts = probes.probe(_fake(mode), DENSE, "float16")
    assert facts.runs and facts.decided, facts
    assert (facts.accumulate, facts.roundings) == (accumulate, roundings), facts


def test_a_framework_error_marks_the_layer_unsupported_with_its_message():
    facts = probes.probe(_fake("raise"), DENSE, "float32")
    assert not facts.runs
    assert facts.reason == "RuntimeError: no kernel for this"


@pytest.mark.parametrize(("mode", "words"), [("wrong", "different result"), ("shape", "shape=")])
def test_a_wrong_result_or_shape_is_not_a_layer_that_runs(mode, words):
    facts = probes.probe(_fake(mode), DENSE, "float32")
    assert not facts.runs and words in facts.reason, facts


def test_facts_are_measured_once_per_environment(monkeypatch):
    backend = _fake("fused")
    calls = []
    build = backend.build
    monkeypatch.setattr(backend, "build", lambda *a, **k: calls.append(1) or build(*a, **k))
    first = probes.probe(backend, DENSE, "float32")
    assert probes.probe(backend, DENSE, "float32") is first and len(calls) == 1
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # another kernel choice: measured again
    probes.probe(backend, DENSE, "float32")
    assert len(calls) == 2


def test_disk_cache_lives_where_it_is_told_and_is_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("EQUIVCHECK_FACTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EQUIVCHECK_FACTS_KEY", str(tmp_path / "config" / "facts.key"))
    probes.clear_cache()
    facts = probes.probe(_fake("unfused"), DENSE, "bfloat16")
    assert (tmp_path / "cache" / "facts.json").is_file() and (tmp_path / "config" / "facts.key").is_file()
    probes.clear_cache()
    backend = _fake("unfused")
    backend.build = None  # a second probe would fail: the facts must come from disk
    assert probes.probe(backend, DENSE, "bfloat16") == facts


def test_a_large_layer_is_probed_on_a_small_twin_of_the_same_structure():
    big = ec.spec("keras:conv", channels=512, spatial=(14, 14), kernel_size=(3, 3), units=512, stride=2, padding="same",
                  data_format="channels_first")
    small = probes.probe_spec(big)
    assert np.prod(small.kernel_shape) <= probes.PROBE_MAX_KERNEL
    for field in ("kernel_size", "stride", "dilation", "padding", "data_format", "kernel_layout", "groups", "bias", "op"):
        assert getattr(small, field) == getattr(big, field), field
    depthwise = ec.spec("torch:depthwise", channels=1024, spatial=(7, 7), kernel_size=(7, 7), multiplier=2)
    twin = probes.probe_spec(depthwise)
    assert twin.groups == twin.in_channels and twin.out_channels == 2 * twin.in_channels


# -- consistency with the real frameworks -------------------------------------------------
def _direct(backend: str, spec, dtype: str):
    """The real layer on data the probe never saw, bypassing the probe: (failure, ratio(accumulate, roundings))."""
    rng = np.random.default_rng(99)  # the probe's kind of data, other values; its batch, so jax compiles once
    kernel = probes.probe_values(spec.kernel_shape, dtype, rng)
    x = probes.probe_values((probes.probe_batch(spec), *spec.input_shape), dtype, rng)
    bias = probes.probe_bias(spec, dtype, rng)
    try:
        layer = ec.backends.get(backend).build(spec, dtype)
        layer.set_weights(kernel, bias)
        y = layer(x)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", None
    exact = reference(spec, kernel, bias, x)
    if np.shape(y) != exact.shape:
        return f"output shape {np.shape(y)} != {exact.shape}", None
    nb = None if bias is None else reference(spec, kernel, None, x)
    mag = reference(spec, np.abs(kernel), None if bias is None else np.abs(bias), np.abs(x))

    def ratio(accumulate: str, roundings: int) -> float:
        return compare(y, exact, mag, dtype=dtype, fan_in=fan_in(spec), accumulate=accumulate,
                       exact_without_bias=nb if roundings == 2 else None).max_error_ratio

    loosest = dtype if dtype in ("float16", "bfloat16") else None
    return ("" if ratio(loosest, 2) <= 1 else f"wrong result ({ratio(loosest, 2):.3g}x the loosest bound)"), ratio


# Every kind in the layout frameworks prefer, and the kinds whose kernels differ most by layout in the other.
CASES = [(b, k, "channels_last") for b in BACKEND_NAMES if b != "numpy" for k in probes.LAYER_KINDS] + [
    (b, k, "channels_first") for b in BACKEND_NAMES if b != "numpy" for k in ("dense", "conv2d", "conv_transpose2d", "depthwise2d")
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])  # float64 runs-or-not: test_against_numpy
@pytest.mark.parametrize(("backend", "kind", "data_format"), CASES, ids=["-".join(c) for c in CASES])
def test_probe_agrees_with_the_real_framework(backend, kind, data_format, dtype):
    require(backend)
    spec = probes.layer_kinds(backend, data_format)[kind]
    facts = probes.probe(backend, spec, dtype)
    static = ec.backends.get(backend).unsupported(spec, dtype)
    failure, ratio = (static, None) if static else _direct(backend, spec, dtype)
    assert facts.runs == (failure == ""), f"probe says runs={facts.runs} ({facts.reason}); run directly: {failure or 'runs'}"
    if not facts.runs:
        return
    assert ratio(facts.accumulate, facts.roundings) <= 1, f"probe says {facts.summary()}, but fresh data exceed that bound"
    if facts.accumulate == dtype and dtype in ("float16", "bfloat16") and facts.decided:
        assert ratio("float32", 2) > 1, f"probe says {backend} sums {kind} in {dtype}, but fresh data fit float32 sums"


def test_every_verified_case_records_the_facts_it_was_judged_by():
    from equivcheck.verification import verify_pair

    src = ec.spec("onnx:dense", channels=3, spatial=(4, 5), units=5)
    dst = ec.spec("torch:conv", channels=3, spatial=(4, 5), units=5)
    case = verify_pair(src, dst, dtype="bfloat16")
    assert case.verdict == "pass"
    assert set(case.facts) == {"source", "target"}
    assert case.to_dict()["facts"]["target"]["accumulate"] == case.facts["target"].accumulate


def test_disk_cache_rows_are_signed_and_an_edit_is_probed_again(monkeypatch, tmp_path):
    import json
    import warnings

    monkeypatch.setenv("EQUIVCHECK_FACTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EQUIVCHECK_FACTS_KEY", str(tmp_path / "config" / "facts.key"))
    probes.clear_cache()
    facts = probes.probe(_fake("fused"), DENSE, "float16")
    path = tmp_path / "cache" / "facts.json"
    doc = json.loads(path.read_text())
    (row,) = doc["rows"].values()
    assert row["facts"] == facts.to_dict() and len(row["mac"]) == 64
    row["facts"]["accumulate"] = "float16"  # looser, and what a probe in float16 could answer: only the signature tells
    path.write_text(json.dumps(doc))
    probes.clear_cache()
    with pytest.warns(probes.FactsCacheWarning, match="not signed by this machine's key"):
        assert probes.probe(_fake("fused"), DENSE, "float16") == facts
    probes.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probes.probe(_fake("fused"), DENSE, "float16") == facts  # rewritten: read back silently
    probes.clear_cache()
