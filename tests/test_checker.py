"""The checker behind the pytest fixture, used directly (no pytest machinery)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck.checker import (
    PRESET_BACKENDS,
    Checker,
    ConversionCheckFailed,
    Options,
    check_conversion,
    derive_seed,
    identify_conventions,
    options_from,
    resolve_backend,
    spec_code,
    summary_table,
)
from equivcheck.errors import NoMapping, SpecError
from equivcheck.mutations import mutants
from equivcheck.report.records import check_record

SHAPE = dict(channels=3, spatial=(2, 4), units=2)
SRC, DST = ec.spec("onnx:dense", **SHAPE), ec.spec("theano:conv", **SHAPE)


def right(k, b):
    return ec.plan(SRC, DST).apply(k), b


def no_flip(k, b):  # a torch-style conversion where Theano needs the kernel flipped
    return k.reshape(2, 3, 2, 4), b


def test_good_converter_passes_and_its_conventions_are_named():
    checker = Checker(Options(seed=3))
    cases = checker.check_converter(right, "onnx:dense", "theano:conv", **SHAPE)
    assert [c.verdict for c in cases] == ["pass"]
    assert all(m.outcome == "rejected" for m in cases[0].mutations)
    assert checker.records[0].conventions == "matches theano:conv (= scipy:conv)"


def test_wrong_converter_fails_with_conventions_and_a_working_reproducer():
    checker = Checker(Options(seed=3))
    with pytest.raises(ConversionCheckFailed) as info:
        checker.check_converter(no_flip, "onnx:dense", "theano:conv", **SHAPE)
    message = str(info.value)
    assert "no_flip does not convert onnx:dense → theano:conv correctly (fail)" in message
    assert "matches theano:conv except: missing flip" in message
    assert "right kernel for torch:conv" in message  # what it really is
    assert "w.reshape(2, 3, 2, 4)[:, :, ::-1, ::-1]" in message  # the right mapping
    snippet = message.split("reproduce:\n")[1]
    code = "\n".join(line[4:] for line in snippet.splitlines() if "import no_flip" not in line)
    namespace = {"no_flip": no_flip}
    exec(code.replace("print(case.verdict, case.reason)", "result = case"), namespace)
    assert namespace["result"].verdict == "fail"
    assert checker.records[-1].case.verdict == "fail"


def test_fixed_shapes_check_every_dtype():
    cases = Checker().check_converter(right, "onnx:dense", "theano:conv", dtypes=["float32", "float16", "bfloat16"], **SHAPE)
    assert [(c.dtype, c.verdict) for c in cases] == [("float32", "pass"), ("float16", "pass"), ("bfloat16", "pass")]


def test_a_pair_no_conversion_can_match_is_an_error_not_a_failure():
    with pytest.raises(NoMapping):
        Checker().check_converter(right, "onnx:dense", "theano:conv", kernel_size=(1, 2), **SHAPE)
    with pytest.raises(SpecError, match="not callable"):
        Checker().check_converter("f", "onnx:dense", "theano:conv", **SHAPE)
    with pytest.raises(SpecError, match=r"channels=\(5, 1\) is not a range"):
        Checker().check_converter(right, "onnx:dense", "theano:conv", channels=(5, 1), spatial=(2, 2), units=2)


def test_wrong_shapes_from_the_converter_fail_with_a_clear_reason():
    with pytest.raises(ConversionCheckFailed, match=r"returns a kernel of shape \(6, 8\)"):
        Checker().check_converter(lambda k, b: (k.reshape(6, 8), b), "onnx:dense", "theano:conv", **SHAPE)


def _flatten_bug(k, b):
    """Right whenever one channel, wrong flatten order otherwise (onnx:dense → tflite:dense)."""
    return k, b


def test_ranges_search_and_shrink_to_the_smallest_failing_case():
    checker = Checker(Options(seed=1, max_examples=30))
    with pytest.raises(ConversionCheckFailed) as info:
        checker.check_converter(_flatten_bug, "onnx:dense", "tflite:dense", channels=(1, 6),
                                spatial=((1, 4), (1, 4)), units=(1, 3))
    shrunk = checker.records[-1].case.source
    assert (shrunk.channels, shrunk.units) == (2, 1) and sorted(shrunk.spatial) == [1, 2]
    assert len(checker.records) == 1  # only the shrunk case is kept
    assert "wrong flatten order" in str(info.value)


def test_strategies_and_ranges_pass_for_a_right_converter():
    checker = Checker(Options(seed=2, max_examples=8))
    cases = checker.check_converter(lambda k, b: (k.transpose(0, 3, 1, 2), b), "tflite:conv", "caffe:conv",
                                    channels=st.integers(1, 3), spatial=((2, 4), (2, 4)), units=range(1, 3),
                                    kernel_size=((1, 2), (1, 2)))
    assert len(cases) == 8 and {c.verdict for c in cases} == {"pass"}
    assert all(r.conventions.startswith("matches caffe:conv") for r in checker.records)


def test_check_pairs_runs_a_generic_converter_over_generated_pairs():
    checker = Checker(Options(seed=4, max_examples=10), pair_defaults={"presets": ["onnx", "tflite", "caffe"]})
    cases = checker.check_pairs(lambda s, d, k, b: (ec.plan(s, d).apply(k), b))
    assert len(cases) == 10 and {c.verdict for c in cases} == {"pass"}

    def flip_everything(s, d, k, b):
        m = ec.plan(s, d)
        return (m.flip(*range(2, len(d.kernel_shape))) if d.kind == "conv" else m).apply(k), b

    with pytest.raises(ConversionCheckFailed) as info:
        checker.check_pairs(flip_everything, kinds=["conv->conv"])
    assert "spurious flip" in str(info.value)
    assert "lambda k, b: flip_everything(source, target, k, b)" in str(info.value)


def test_identify_names_each_single_mistake():
    wrong = mutants(SRC, DST)
    assert len(wrong) >= 7
    for m in wrong:
        found = identify_conventions(lambda k, b, m=m: (m.mapping.apply(k), b), SRC, DST)
        assert found.differences == (m.name,), found.summary()


def test_identify_two_mistakes_other_presets_and_value_changes():
    by_name = {m.name: m.mapping for m in mutants(SRC, DST)}
    undo = ec.plan(SRC, DST).inverse()
    err_flip, err_channels = (undo.then(by_name[n]) for n in ("missing flip", "channels permuted"))
    both = ec.plan(SRC, DST).then(err_flip).then(err_channels)
    found = identify_conventions(lambda k, b: (both.apply(k), b), SRC, DST)
    assert set(found.differences) == {"missing flip", "channels permuted"}
    keras = ec.spec("keras:dense", **SHAPE)
    found = identify_conventions(lambda k, b: (ec.plan(keras, ec.spec("keras:conv", **SHAPE)).apply(k), b),
                                 keras, ec.spec("flax:conv", **SHAPE))
    assert found.exact and found.same_as == ("keras:conv", "keras_cf:conv", "tf:conv")
    assert "changes weight values" in identify_conventions(lambda k, b: (2 * right(k, b)[0], b), SRC, DST).summary()
    assert "raised ValueError" in identify_conventions(lambda k, b: (_ for _ in ()).throw(ValueError()), SRC, DST).summary()


def test_explore_and_the_checker_run_a_preset_on_the_same_framework():
    from equivcheck.exploration.sides import _backend_for

    for name in ("theano:conv", "flax:dense", "keras:dense", "caffe:dense", "onnx:dense"):
        layer = ec.spec(name, **SHAPE) if name.endswith("dense") else ec.spec(name, channels=2, spatial=(3, 3), units=2)
        assert _backend_for(layer, None) == resolve_backend(layer, "float32")[0], name


def test_backend_resolution_falls_back_to_numpy_with_a_note():
    assert PRESET_BACKENDS["flax"] == "jax" and PRESET_BACKENDS["theano"] == "scipy"
    assert PRESET_BACKENDS["onnx"] == "onnxruntime" and "caffe" not in PRESET_BACKENDS
    assert resolve_backend(ec.spec("caffe:dense", **SHAPE), "float32") == ("numpy", "")
    name, note = resolve_backend(ec.spec("torch:dense", **SHAPE), "float32", allowed=("numpy",))
    assert name == "numpy" and "'torch' is not among the allowed backends" in note
    checker = Checker(Options(backends=("numpy",)))
    checker.check_converter(lambda k, b: (k.reshape(2, 3, 2, 4), b), "torch:dense", "caffe:conv", **SHAPE)
    record = checker.records[0]
    assert record.case.source_backend == "numpy" and any("torch" in n for n in record.notes)


def test_real_torch_runs_the_torch_layers():
    pytest.importorskip("torch", reason="checks a converter on real torch layers")
    from equivcheck.checker import installed_backends

    assert "torch" in installed_backends(), "torch imports here, but equivcheck does not offer its backend"
    checker = Checker(Options(seed=5))
    cases = checker.check_converter(lambda k, b: (k.reshape(2, 3, 2, 4), b), "torch:dense", "torch:conv",
                                    dtypes=["float32", "bfloat16"], **SHAPE)
    assert [(c.source_backend, c.target_backend, c.verdict) for c in cases] == [("torch", "torch", "pass")] * 2
    with pytest.raises(ConversionCheckFailed, match="except: spurious flip"):
        checker.check_converter(lambda k, b: (np.ascontiguousarray(k.reshape(2, 3, 2, 4)[:, :, ::-1, ::-1]), b),
                                "torch:dense", "torch:conv", dtypes=["bfloat16"], **SHAPE)


def test_check_conversion_is_reproducible_from_its_seed():
    a = check_conversion(no_flip, SRC, DST, seed=11)
    b = check_conversion(no_flip, SRC, DST, seed=11)
    assert a.verdict == b.verdict == "fail" and a.comparison == b.comparison


def test_helpers():
    assert derive_seed(1, "t", 2) == derive_seed(1, "t", 2) != derive_seed(1, "t", 3)
    assert 0 <= derive_seed("x") < 2**32
    assert spec_code(DST) == "ec.spec('theano:conv', channels=3, spatial=(2, 4), units=2)"
    odd = ec.DenseSpec(channels=2, spatial=(3,), units=2, flatten="WC")
    assert spec_code(odd).startswith("ec.DenseSpec(") and eval(spec_code(odd), {"ec": ec}) == odd
    options, pairs = options_from(("numpy",), None, 7, {"max_examples": 3, "kinds": ["dense->conv"]})
    assert options == Options(backends=("numpy",), max_examples=3, seed=7) and pairs == {"kinds": ["dense->conv"]}
    with pytest.raises(SpecError, match="marker option 'colour'"):
        options_from(None, None, 0, {"colour": 1})
    with pytest.raises(SpecError, match="max_examples=0"):
        Options(max_examples=0)
    rows = [{"conversion": "a → b", "converter": "f", "backends": "numpy → numpy", "dtype": "float32",
             "verdict": v, "conventions": "matches b"} for v in ("pass", "pass", "fail")]
    rows[0]["notes"] = ["torch:dense ran on numpy: backend 'torch' is not installed"]
    table = summary_table(rows)
    assert table[-1] == "note: torch:dense ran on numpy: backend 'torch' is not installed"
    assert table[0].split()[:3] == ["conversion", "converter", "backends"]
    assert "3" in table[1].split() and "1 fail 2 pass" in table[1] and table[1].endswith("matches b")


def test_a_failed_check_carries_its_record_and_case():
    checker = Checker()
    with pytest.raises(ec.ConversionCheckFailed) as info:
        checker.check_converter(lambda k, b: (k.reshape(4, 2, 3, 2).transpose(3, 2, 0, 1), b), "keras:dense", "torch:conv",
                                channels=2, spatial=(4, 3), units=2)
    assert isinstance(info.value, ec.EquivcheckError) and isinstance(info.value, AssertionError)
    assert info.value.case.verdict == "fail" and info.value.record is checker.records[-1]


def test_every_exception_equivcheck_defines_derives_from_the_root():
    import importlib
    import inspect
    import pkgutil

    import equivcheck

    outside = []
    for info in pkgutil.walk_packages(equivcheck.__path__, "equivcheck."):
        if info.name.split(".")[-1] in ("plugin", "__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and not issubclass(obj, Warning)
                    and obj.__module__ == module.__name__
                    and not issubclass(obj, ec.EquivcheckError) and not name.startswith("_")):
                outside.append(f"{module.__name__}.{name}")
    assert not outside, f"exceptions outside EquivcheckError: {outside}"


def test_a_converter_that_raises_is_a_recorded_error_case():
    checker = Checker()

    def broken(kernel, bias):
        raise KeyError("fc1.weight")

    with pytest.raises(ec.ConversionCheckFailed, match=r"the converter raised KeyError: 'fc1\.weight'") as info:
        checker.check_converter(broken, "keras:dense", "torch:conv", channels=2, spatial=(4, 3), units=2)
    assert info.value.case.verdict == "error" and checker.records[-1].case.verdict == "error"
    assert checker.records[-1].summary()["verdict"] == "error"
    assert check_record(checker.records[-1])["reason"].startswith("the converter raised KeyError")


@pytest.mark.parametrize(("source", "module", "dtype", "native_dtype"), [
    ("torch:dense", "torch", "bfloat16", "torch.bfloat16"),
    ("torch:dense", "torch", "float32", "torch.float32"),
    ("keras:dense", "tensorflow", "bfloat16", "<dtype: 'bfloat16'>"),
    ("caffe:dense", None, "float16", "float16"),
])
def test_native_converters_receive_the_source_frameworks_own_tensors(source, module, dtype, native_dtype):
    if module:
        pytest.importorskip(module, reason=f"{module} is not installed")
    seen = []

    def convert(kernel, bias):
        seen.append((type(kernel).__module__.split(".")[0], str(kernel.dtype), type(bias).__module__.split(".")[0]))
        k = kernel.float().numpy() if hasattr(kernel, "float") else np.asarray(kernel, np.float32)
        b = bias.float().numpy() if hasattr(bias, "float") else np.asarray(bias, np.float32)
        return ec.convert(src, dst, k, b)

    shape = dict(channels=3, spatial=(4, 5), units=6)
    src, dst = ec.spec(source, **shape), ec.spec("torch:conv", **shape)
    cases = Checker().check_converter(convert, source, "torch:conv", **shape, dtypes=dtype, native=True)
    assert [c.verdict for c in cases] == ["pass"]
    expected_module = {"torch": "torch", "tensorflow": "tensorflow", None: "numpy"}[module]
    assert seen and all(s == (expected_module, native_dtype, expected_module) for s in seen), seen
    plain = []
    Checker().check_converter(lambda k, b: (plain.append(type(k)), ec.convert(src, dst, k, b))[1], source, "torch:conv",
                              **shape, dtypes=dtype)
    assert plain and all(t is np.ndarray for t in plain)


def test_old_spellings_still_work_with_a_deprecation_note():
    with pytest.warns(DeprecationWarning, match=r"mutations= is deprecated: use mutants="):
        case = ec.verify_pair(SRC, DST, mutations=False)
    assert case.verdict == "pass" and case.mutations == []
    assert ec.verify_pair(SRC, DST).mutations, "mutants=True is the default"
    with (pytest.warns(DeprecationWarning, match=r"original= is deprecated: use source="),
          pytest.raises(ec.HeadError, match=r"neither a Keras model nor a torch\.nn\.Module")):
        ec.verify_model(original=object(), converted=object())
    with pytest.raises(ec.HeadError, match="converted is missing"):
        ec.verify_model(object())


def test_check_converter_outside_pytest_is_the_fixtures_method():
    src, dst = ec.spec("keras:dense", **SHAPE), ec.spec("torch:conv", **SHAPE)
    assert [c.verdict for c in ec.check_converter(lambda k, b: ec.convert(src, dst, k, b), "keras:dense", "torch:conv",
                                                  **SHAPE)] == ["pass"]
    with pytest.raises(ConversionCheckFailed, match=r"wrong flatten order"):
        ec.check_converter(lambda k, b: (k.T.reshape(dst.kernel_shape), b), "keras:dense", "torch:conv", **SHAPE)


def test_source_and_target_options_set_spec_fields_fixed_or_searched():
    shape = dict(channels=3, spatial=(4, 5), units=6)

    def convert_from(flatten):
        src, dst = ec.spec("keras:dense", **shape, flatten=flatten), ec.spec("torch:conv", **shape)
        return lambda k, b: ec.convert(src, dst, k, b)

    checker = Checker()
    cases = checker.check_converter(convert_from("CHW"), "keras:dense", "torch:conv", **shape,
                                    source_options={"flatten": "CHW"})
    assert [c.verdict for c in cases] == ["pass"] and cases[0].source.flatten == "CHW"
    with pytest.raises(ConversionCheckFailed, match="wrong flatten order"):
        checker.check_converter(convert_from("HWC"), "keras:dense", "torch:conv", **shape,
                                source_options={"flatten": ["HWC", "CHW"]}, max_examples=10)
    assert {r.case.source.flatten for r in checker.records} >= {"CHW"}


def test_a_failure_carries_its_patch_in_the_target_framework():
    checker = Checker()

    def no_flip(kernel, bias):  # Theano flips its conv kernel; this converter forgets it
        return kernel.T.reshape(2, 3, 5, 5), bias

    with pytest.raises(ec.ConversionCheckFailed) as info:
        checker.check_converter(no_flip, "theano:dense", "theano:conv", channels=3, spatial=(5, 5), units=2)
    record = checker.records[-1]
    assert record.patch and "[:, :, ::-1, ::-1]" in "\n".join(record.patch)
    assert "  fix        # w, b: the source layer's kernel" in str(info.value)
    assert check_record(record)["patch"] == record.patch
