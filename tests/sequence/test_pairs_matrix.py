"""Every ordered pair of recurrent presets of one cell, and of attention presets of one head layout, converted by
the planned mapping and verified on the real layers in float32 (``benchmarks/sequence_pairs.py`` draws the whole
matrix, in float16 and bfloat16 too); a low-precision sample: each preset with itself and with torch's preset."""

import contextlib
import importlib.util
import itertools

import pytest

import equivcheck as ec
from equivcheck.sequence.backends import LOW_PRECISION, backend_of
from equivcheck.sequence.presets import ATTENTION, RECURRENT

RECURRENT_SIZES = dict(input_size=5, units=6)
ATTENTION_SIZES = dict(embed_dim=8, heads=2)
#: Both reset placements of the GRU presets that take a flag for it.
GRU_VARIANTS = {"keras:gru": ({}, {"reset_after": False}), "onnx:gru": ({}, {"linear_before_reset": True})}
#: The modules each runtime needs, with the reason of the skip when one is missing.
NEEDS = {
    "torch": (("torch", "torch not installed: pip install 'equivcheck[torch]'"),),
    "keras": (("tensorflow", "tensorflow not installed: pip install 'equivcheck[tensorflow]'"),
              ("keras", "keras not installed: pip install 'equivcheck[tensorflow]'")),
    "onnxruntime": (("onnx", "onnx not installed: pip install onnx onnxruntime"),
                    ("onnxruntime", "onnxruntime not installed: pip install onnx onnxruntime")),
    "flax": (("jax", "jax not installed: pip install 'equivcheck[jax]'"), ("flax", "flax not installed: pip install flax")),
    "tflite": (("tensorflow", "tensorflow not installed: pip install 'equivcheck[tflite]'"),),
    "numpy": (),
}


def _label(name, flags):
    return name + (f"({','.join(f'{k}={v}' for k, v in flags.items())})" if flags else "")


def _groups():
    """``{group: [(label, spec), ...]}``: each recurrent cell's presets (GRU with both reset placements), the
    attention presets, and those that take one key/value head for two query heads."""
    out = {}
    for storage, cell in RECURRENT:
        name = f"{storage}:{cell}"
        for flags in GRU_VARIANTS.get(name, ({},)):
            out.setdefault(cell, []).append((_label(name, flags), ec.spec(name, **RECURRENT_SIZES, **flags)))
    for storage in ATTENTION:
        name = f"{storage}:mha"
        out.setdefault("mha", []).append((name, ec.spec(name, **ATTENTION_SIZES)))
        with contextlib.suppress(ec.SpecError):  # raised by the presets with one key/value head per query head
            out.setdefault("gqa", []).append((_label(name, {"kv_heads": 1}), ec.spec(name, **ATTENTION_SIZES, kv_heads=1)))
    return out


GROUPS = _groups()
PAIRS = [pytest.param(s, t, id=f"{a}->{b}") for presets in GROUPS.values()
         for (a, s), (b, t) in itertools.product(presets, presets)]
#: The pairs whose float32 check also runs the mutants (the rest: the layers' agreement only, for speed): one
#: cross-framework pair of each group, in both directions, and each preset with itself.
WITH_MUTANTS = {"torch:lstm->keras:lstm", "keras:lstm->torch:lstm", "torch:gru->onnx:gru(linear_before_reset=True)",
                "onnx:gru(linear_before_reset=True)->torch:gru", "keras:rnn->onnx:rnn", "onnx:rnn->keras:rnn",
                "torch:mha->keras:mha", "keras:mha->torch:mha", "llama:mha(kv_heads=1)->internlm2:mha(kv_heads=1)",
                "internlm2:mha(kv_heads=1)->llama:mha(kv_heads=1)"}
#: The group's preset on torch: every preset of the group is checked against it in float16 and bfloat16.
TORCH_PRESET = {"lstm": "torch:lstm", "gru": "torch:gru", "rnn": "torch:rnn", "mha": "torch:mha",
                "gqa": "llama:mha(kv_heads=1)"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch on one thread while this module runs: its layers here are tiny, and on a busy machine a float16 or
    bfloat16 matmul split over threads waits on them (15 ms a call instead of 0.2 ms on 2 busy cores)."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _need(*specs):
    for backend in {backend_of(s) for s in specs}:
        for module, reason in NEEDS[backend]:
            pytest.importorskip(module, reason=reason)


def _convertible(source, target):
    try:
        ec.plan(source, target)
    except ec.NoMapping:
        return False
    return True


def _verify(source, target, dtype, mutants=True):
    return ec.verify_pair(source, target, source_backend=backend_of(source), target_backend=backend_of(target),
                          dtype=dtype, mutants=mutants)


def test_the_matrix_covers_every_preset():
    labels = {label for presets in GROUPS.values() for label, _ in presets}
    assert {f"{s}:{c}" for s, c in RECURRENT} | {f"{s}:mha" for s in ATTENTION} <= labels
    assert {"keras:gru(reset_after=False)", "onnx:gru(linear_before_reset=True)", "keras:mha(kv_heads=1)",
            "llama:mha(kv_heads=1)", "internlm2:mha(kv_heads=1)"} <= labels
    ids = {p.id for p in PAIRS}
    assert ids >= WITH_MUTANTS and len(ids) == sum(len(v) ** 2 for v in GROUPS.values())


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_pair_converts_and_verifies_in_float32(request, source, target):
    if not _convertible(source, target):  # a GRU with the reset gate after the recurrent matmul and one before
        assert source.cell == "gru" and source.reset_after != target.reset_after
        with pytest.raises(ec.NoMapping, match="reset gate is applied after the recurrent matmul in one"):
            _verify(source, target, "float32")
        return
    _need(source, target)
    own = source == target or request.node.callspec.id in WITH_MUTANTS
    case = _verify(source, target, "float32", mutants=own)
    assert case.verdict == "pass", case.reason
    if own:
        assert case.mutations and all(m.outcome == "rejected" for m in case.mutations)


LOW = [pytest.param(s, t, dtype, id=f"{a}->{b}-{dtype}") for group, presets in GROUPS.items()
       for a, s in presets for b, t in dict.fromkeys([(a, s), *(p for p in presets if p[0] == TORCH_PRESET[group])])
       for dtype in ("float16", "bfloat16") if _convertible(s, t)
       and not (a == b and a.startswith("flax:"))]  # Flax compiles each run: its pair with torch's only


@pytest.mark.parametrize(("source", "target", "dtype"), LOW)
def test_low_precision_sample(source, target, dtype):
    """Each preset with itself (the mutants too; Flax's with torch's only) and with the torch preset of its group:
    ``pass`` where both runtimes run the dtype, else a ``skip`` that says so."""
    _need(source, target)
    case = _verify(source, target, dtype, mutants=source == target)
    if {backend_of(source), backend_of(target)} <= set(LOW_PRECISION):
        assert case.verdict == "pass", case.reason
    else:
        assert case.verdict == "skip" and f"does not run recurrent or attention layers in {dtype}" in case.reason
