"""The convention explorer: it must rediscover, by probing real layers, what the planner says."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.errors import EquivcheckError, SpecError
from equivcheck.exploration import BlackBox, explore, pair_mapping, probe_layer
from equivcheck.exploration import probe as probe_module
from equivcheck.exploration.atoms import NotAPermutation, mapping_from_lines
from equivcheck.exploration.probe import index_digits, probe_side
from equivcheck.exploration.sides import Shape, preset_spec, spec_side
from equivcheck.presets import PRESETS

from .backends._support import fails_for_real

# One shape per family of layers; small, but with no two sizes equal where that would hide a swap.
DENSE = dict(channels=3, spatial=(2, 3), units=4)
FAMILIES = {
    "conv": dict(channels=2, spatial=(4, 5), units=3, kernel_size=(2, 3), stride=(1, 2), padding="same"),
    "conv_transpose": dict(channels=2, spatial=(3, 3), units=3, kernel_size=(2, 3), stride=2),
    "depthwise": dict(channels=2, spatial=(4, 5), kernel_size=(2, 3), multiplier=2),
}
# The framework each preset names, written here (not read from equivcheck): caffe has none, the reference runs it.
FRAMEWORK_OF = {"keras": "keras", "keras_cf": "keras", "tf": "tf", "torch": "torch", "jax": "jax", "flax": "jax",
                "scipy": "scipy", "theano": "scipy", "onnx": "onnxruntime", "tf2onnx": "onnxruntime", "tflite": "tflite", "caffe": "numpy"}


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def frameworks(keras, torch, jax):
    """Every framework the explorer is tested on (tensorflow comes with keras); scipy too."""
    pytest.importorskip("scipy", reason="scipy not installed: pip install 'equivcheck[scipy]'")
    return {"keras": keras, "torch": torch, "jax": jax}


@pytest.fixture(scope="module")
def probed(frameworks):
    """Every preset layer, built on its own framework where there is a backend for it, probed once."""
    out = {}
    families = {"dense": DENSE, "conv_for_dense": DENSE, **FAMILIES}
    for family, shape in families.items():
        layer = "conv" if family == "conv_for_dense" else family
        for name, preset in PRESETS.items():
            if layer in preset.layers():
                side = spec_side(preset_spec(f"{name}:{layer}", Shape(**shape)), None)
                out[(family, name)] = probe_side(side)
    return out


# -- every preset pair, on the real frameworks -------------------------------------------
def test_preset_layers_run_on_their_frameworks(probed):
    """Each layer is explored on its preset's framework; on the numpy reference only where that framework,
    running the layer directly here (not through equivcheck's probe), fails too."""
    assert set(FRAMEWORK_OF) == set(PRESETS)
    for (family, name), p in probed.items():
        assert p.ok, f"{family} {name}: {p.failure}"
        assert p.calls == 1, "small kernels are probed in one call"
        expected = FRAMEWORK_OF[name]
        assert p.side.label.endswith(f"({p.side.framework})"), p.side.label
        if p.side.framework != expected:
            spec = p.side.layer.spec
            assert p.side.framework == "numpy", p.side.label
            assert fails_for_real(expected, spec, "float32"), (
                f"{family} {name}: explored on the numpy reference, but {expected} runs {spec.describe()} right here")


@pytest.mark.parametrize("family", ["dense→conv", *FAMILIES])
def test_every_preset_pair_rediscovers_the_plan(probed, family):
    if family == "dense→conv":
        sources = {k[1]: v for k, v in probed.items() if k[0] == "dense"}
        targets = {k[1]: v for k, v in probed.items() if k[0] == "conv_for_dense"}
    else:
        sources = targets = {k[1]: v for k, v in probed.items() if k[0] == family}
    assert len(sources) >= 9 and len(targets) >= 9
    for a, src in sources.items():
        for b, dst in targets.items():
            expected = ec.plan(src.side.layer.spec, dst.side.layer.spec)
            assert pair_mapping(src, dst).equivalent(expected), f"{a} → {b}"


@pytest.mark.parametrize(
    "source, target, shape",
    [
        ("keras:dense", "torch:conv", DENSE),
        ("torch:dense", "keras:conv", DENSE),
        ("jax:dense", "scipy:conv", DENSE),
        ("tf:conv", "jax:conv", FAMILIES["conv"]),
        ("torch:depthwise", "keras:depthwise", FAMILIES["depthwise"]),
        ("keras:conv_transpose", "torch:conv_transpose", FAMILIES["conv_transpose"]),
    ],
)
def test_explore_across_frameworks_verifies(frameworks, source, target, shape):
    r = explore(source, target, **shape)
    assert r.found, r.reason
    assert r.verification is not None and r.verification.passed
    expected = ec.plan(preset_spec(source, Shape(**shape)), preset_spec(target, Shape(**shape)))
    assert r.mapping.equivalent(expected)
    assert r.forward_calls == 4  # one probe call per side, two for the check


# -- layers built directly in each framework ---------------------------------------------
def _dense_conv_plan(src_preset: str, dst_preset: str) -> ec.Mapping:
    return ec.plan(ec.spec(f"{src_preset}:dense", **DENSE), ec.spec(f"{dst_preset}:conv", **DENSE))


def test_torch_flatten_linear_to_conv(frameworks):
    torch = frameworks["torch"]
    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(18, 4))
    conv = torch.nn.Conv2d(3, 4, (2, 3))
    before = seq[1].weight.detach().clone()
    r = explore(seq, conv, channels=3, spatial=(2, 3))
    assert r.found and r.mapping.equivalent(_dense_conv_plan("torch", "torch"))
    assert torch.equal(seq[1].weight, before), "probing must not touch the layer's own weights"
    bare = explore(torch.nn.Linear(18, 4), conv, channels=3, spatial=(2, 3))  # fed flat, CHW order
    assert bare.found and bare.mapping.equivalent(r.mapping)


def test_keras_flatten_dense_to_conv2d(frameworks):
    keras = frameworks["keras"]
    model = keras.Sequential([keras.Input((2, 3, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    conv = keras.layers.Conv2D(4, (2, 3))
    conv.build((None, 2, 3, 3))
    before = model.layers[-1].kernel.numpy().copy()
    r = explore(model, conv, spatial=(2, 3))
    assert r.found, r.reason
    assert r.mapping.equivalent(_dense_conv_plan("keras", "keras"))
    assert np.array_equal(model.layers[-1].kernel.numpy(), before)
    rows = {(c.side, c.convention, c.value): c.status for c in r.conventions}
    assert rows[("source", "flatten order", "HWC")] == "holds"
    assert rows[("source", "data format", "channels_last")] == "holds"
    assert rows[("target", "kernel layout", "HWIO")] == "holds"
    assert "keras" in r.source.presets and "keras" in r.target.presets


def test_keras_channels_first_flatten_moves_channels_last(frameworks):
    keras = frameworks["keras"]
    model = keras.Sequential([keras.Input((3, 2, 3)), keras.layers.Flatten(data_format="channels_first"),
                              keras.layers.Dense(4)])
    r = explore(model, "torch:conv", spatial=(2, 3), units=4)
    assert r.found and r.mapping.equivalent(_dense_conv_plan("keras_cf", "torch"))


def test_keras_depthwise_to_torch_groups(frameworks):
    keras, torch = frameworks["keras"], frameworks["torch"]
    dw = keras.layers.DepthwiseConv2D((2, 3), depth_multiplier=2)
    dw.build((None, 4, 5, 2))
    tconv = torch.nn.Conv2d(2, 4, (2, 3), groups=2)
    r = explore(dw, tconv, spatial=(4, 5))
    shape = Shape(**FAMILIES["depthwise"] | {"stride": 1, "padding": "valid"})
    assert r.found and r.mapping.equivalent(ec.plan(preset_spec("keras:depthwise", shape), preset_spec("torch:depthwise", shape)))


def test_tf_nn_function_to_torch(frameworks):
    import tensorflow as tf

    def tf_conv(x, kernel, bias):
        return tf.nn.conv2d(x, kernel, strides=1, padding="VALID") + bias

    box = BlackBox(tf_conv, kernel_shape=(2, 3, 3, 4), data_format="channels_last")
    r = explore(box, frameworks["torch"].nn.Conv2d(3, 4, (2, 3)), channels=3, spatial=(2, 3))
    assert r.found and r.mapping.equivalent(ec.plan(ec.spec("tf:conv", **DENSE), ec.spec("torch:conv", **DENSE)))

    def tf_dense(x, kernel, bias):  # tf.reshape + tf.matmul on an NHWC map
        return tf.matmul(tf.reshape(x, (tf.shape(x)[0], -1)), kernel) + bias

    tf_dense.kernel_shape, tf_dense.data_format = (18, 4), "channels_last"
    r = explore(tf_dense, box, channels=3, spatial=(2, 3))
    assert r.found and r.mapping.equivalent(ec.plan(ec.spec("tf:dense", **DENSE), ec.spec("tf:conv", **DENSE)))


def test_jax_function_to_keras(frameworks):
    from jax import lax

    def jax_conv(x, kernel, bias):  # default dimension numbers: NCHW map, OIHW kernel
        return lax.conv_general_dilated(x, kernel, (1, 1), "VALID") + bias[None, :, None, None]

    box = BlackBox(jax_conv, kernel_shape=(4, 3, 2, 3))
    r = explore(box, "keras:conv", channels=3, spatial=(2, 3), units=4)
    assert r.found, r.reason
    assert r.source.probed.side.dtype == "float64"  # exact index values need x64 inside jax
    assert r.mapping.equivalent(ec.plan(ec.spec("jax:conv", **DENSE), ec.spec("keras:conv", **DENSE)))


def _scipy_conv(x, kernel, bias):
    """True convolution, one channel pair at a time: the Theano/scipy convention."""
    from scipy import signal

    out = np.stack([
        np.stack([sum(signal.convolve(xn[c], kernel[o, c], mode="valid") for c in range(xn.shape[0])) for o in range(kernel.shape[0])])
        for xn in x
    ])
    return out + bias[None, :, None, None]


def test_scipy_convolve_callable_is_flipped(frameworks):
    _scipy_conv.kernel_shape = (4, 3, 2, 3)
    r = explore(_scipy_conv, "torch:conv", channels=3, spatial=(3, 4), units=4, kernel_size=(2, 3))
    assert r.found, r.reason
    shape = dict(channels=3, spatial=(3, 4), units=4, kernel_size=(2, 3))
    assert r.mapping.equivalent(ec.plan(ec.spec("scipy:conv", **shape), ec.spec("torch:conv", **shape)))
    assert r.mapping.flipped_axes == 2
    rows = {(c.side, c.convention, c.value): c.status for c in r.conventions}
    assert rows[("source", "flip H", "yes")] == rows[("source", "flip W", "yes")] == "holds"


# -- the motivating case, at full size, on the numpy reference ---------------------------
def test_theano_fc6_exact_code():
    r = explore("theano:dense", "theano:conv", channels=512, spatial=(7, 7), units=4096, backend="numpy")
    assert r.found, r.reason
    assert r.code["numpy"] == "w.T.reshape(4096, 512, 7, 7)[:, :, ::-1, ::-1]"
    assert r.forward_calls <= 8
    assert r.combinations == 6 * 2 * 24 * 4 and r.combinations_holding == 1


# -- probing: a constant number of calls, any digit count, both strategies -----------------
@pytest.mark.parametrize("strategy", ["lines", "selectors"])
def test_forward_calls_do_not_grow_with_size(strategy):
    small = explore("keras:dense", "torch:conv", channels=3, spatial=(2, 3), units=4, backend="numpy", probe=strategy)
    big = explore("keras:dense", "torch:conv", channels=8, spatial=(4, 5), units=9, backend="numpy", probe=strategy)
    assert small.found and big.found
    assert small.forward_calls == big.forward_calls
    assert big.source.probed.strategy == strategy


@pytest.mark.parametrize("cap", [8, 32])
@pytest.mark.parametrize("pair", [("tflite:dense", "theano:conv"), ("tflite:depthwise", "keras:depthwise")])
def test_indices_split_into_digits_when_the_float_type_is_short(monkeypatch, cap, pair):
    monkeypatch.setitem(probe_module.CAPS, "float64", cap)
    shape = DENSE if pair[0].endswith("dense") else dict(channels=3, spatial=(3, 4), kernel_size=(2, 3), multiplier=2)
    r = explore(*pair, backend="numpy", **shape)
    assert r.found, r.reason
    assert r.source.probed.calls > 1, "a short float type needs more than one digit"
    assert r.mapping.equivalent(ec.plan(preset_spec(pair[0], Shape(**shape)), preset_spec(pair[1], Shape(**shape))))


def test_index_digits_cover_every_axis():
    digits = index_digits((25088, 4096), 1 << 22)
    assert [d.axes for d in digits] == [(1,), (0,)]
    digits = index_digits((40, 3), 8, first=(1,))
    assert digits[0].axes == (1,) and sum(1 for d in digits if d.base) == 2  # 40 > 8: two base-8 digits


def test_atoms_refuse_what_is_not_a_rearrangement():
    with pytest.raises(NotAPermutation):  # both positions read weight 0
        mapping_from_lines([np.array([0, 0]), np.array([0, 2])], 0, (4,), (2, 2))
    with pytest.raises(NotAPermutation):  # stride 2 twice: overlapping weights
        mapping_from_lines([np.array([0, 2]), np.array([0, 2])], 0, (4,), (2, 2))
    m = mapping_from_lines([np.array([2, 3]), np.array([2, 0])], 2, (4,), (2, 2))  # axis 1 reversed
    assert m.apply(np.arange(4)).tolist() == [[2, 0], [3, 1]]


# -- conventions that a shape cannot tell apart -------------------------------------------
def test_one_wide_axis_flip_is_ambiguous():
    r = explore("keras:dense", "theano:conv", channels=3, spatial=(1, 4), units=2, backend="numpy")
    assert r.found
    rows = {(c.side, c.convention, c.value): c.status for c in r.conventions}
    assert rows[("target", "flip H", "yes")] == rows[("target", "flip H", "no")] == "ambiguous"
    assert rows[("target", "flip W", "yes")] == "holds"
    assert rows[("target", "flip W", "no")] == "fails"
    assert r.combinations_holding > 1


def test_flatten_order_on_a_1x1_map_is_ambiguous():
    r = explore("keras:dense", "torch:conv", channels=5, spatial=(1, 1), units=3, backend="numpy")
    assert r.found
    orders = {c.value: c.status for c in r.conventions if c.side == "source" and c.convention == "flatten order"}
    assert set(orders.values()) == {"ambiguous"}
    formats = {c.value: c.status for c in r.conventions if c.convention == "data format"}
    assert set(formats.values()) == {"ambiguous"}


# -- when no mapping exists ------------------------------------------------------------------
def test_different_receptive_field_is_reported():
    r = explore("keras:dense", "torch:conv", channels=3, spatial=(4, 4), units=2, kernel_size=(2, 2), backend="numpy")
    assert not r.found and r.mapping is None
    assert "kernel size" in r.reason
    d = r.to_dict()
    assert d["found"] is False and d["code"]["numpy"] is None


def _torch_conv_box(scale: float = 1.0, relu: bool = False, offset: float = 0.0, bias: bool = True) -> BlackBox:
    def fn(x, kernel, b=None):
        y = _numpy_conv(x, kernel) + (0 if b is None else b[None, :, None, None])
        y = y * scale + offset
        return np.maximum(y, 0) if relu else y

    return BlackBox(fn, kernel_shape=(4, 3, 2, 3), bias=bias)


def _numpy_conv(x, kernel):
    """A covering OIHW correlation: (n, c, h, w) · (o, c, h, w) → (n, o, 1, 1)."""
    return np.einsum("nchw,ochw->no", x, kernel)[:, :, None, None]


def test_plain_callable_is_found():
    r = explore("keras:dense", _torch_conv_box(), backend="numpy", **DENSE)
    assert r.found and r.mapping.equivalent(_dense_conv_plan("keras", "torch"))


def test_scaled_target_has_no_mapping_and_shows_how_far():
    r = explore("keras:dense", _torch_conv_box(scale=2.0), backend="numpy", **DENSE)
    assert not r.found and "2 × what the source does" in r.reason
    assert r.nearest is not None
    assert r.nearest["relative_error"] == pytest.approx(1.0, rel=1e-3)
    assert r.nearest["scale"] == pytest.approx(2.0, rel=1e-3)
    assert r.nearest["code"] == _dense_conv_plan("keras", "torch").code("numpy")


def test_nonlinear_target_has_no_mapping():
    r = explore("keras:dense", _torch_conv_box(relu=True), backend="numpy", **DENSE)
    assert not r.found
    assert "not linear" in r.reason
    assert r.nearest is not None and r.nearest["relative_error"] > 0.1


def test_bias_that_cannot_match():
    r = explore("keras:dense", _torch_conv_box(offset=1.5, bias=False), backend="numpy", **DENSE)
    assert not r.found and "offset" in r.reason
    no_bias = explore("keras:dense", _torch_conv_box(bias=False), backend="numpy", **DENSE)
    assert not no_bias.found and "bias" in no_bias.reason
    fine = explore("keras:dense", _torch_conv_box(bias=False), backend="numpy", bias=False, **DENSE)
    assert fine.found, fine.reason


# -- the result and the CLI ----------------------------------------------------------------
def test_result_dict_and_render():
    r = explore("keras:dense", "torch:conv", backend="numpy", **DENSE)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["code"]["numpy"] == _dense_conv_plan("keras", "torch").code("numpy")
    assert d["code"]["einops"] == _dense_conv_plan("keras", "torch").code("einops") == (
        "rearrange(w, '(h w i) o -> o i h w', i=3, h=2, w=3)")  # axes named after the probed layouts
    assert {"name", "holds"} <= set(d["conventions"][0])
    assert d["forward_calls"] == r.forward_calls == 4
    assert d["verification"]["passed"] is True
    text = r.render()
    assert "mapping found" in text and "HWC" in text and "OIHW" in text


def test_explore_releases_its_buffers_and_times_imports_apart(frameworks):
    from equivcheck.backends.base import IMPORT_SECONDS

    r = explore("keras:dense", "torch:conv", **DENSE)
    assert r.found, r.reason
    for rep in (r.source, r.target):  # at VGG fc6 size each would pin hundreds of MB
        assert rep.probed.side.layer is None and rep.probed.side._scratch is None
    assert {"keras", "torch"} <= set(IMPORT_SECONDS)
    d = r.to_dict()
    assert set(d["import_seconds"]) <= {"keras", "torch"} and d["seconds"] >= 0
    r.imports = {"keras": 2.5, "torch": 0.004}
    assert r.render().endswith("(+2.50 s importing keras)")


def test_cli_json_and_exit_codes(capsys, tmp_path):
    from equivcheck.cli import main

    rc = main(["explore", "--from", "keras:dense", "--to", "theano:conv", "--channels", "3", "--spatial", "2,3",
               "--units", "4", "--json", "--report", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["found"] is True
    assert out["code"]["numpy"] == ec.plan(ec.spec("keras:dense", **DENSE), ec.spec("theano:conv", **DENSE)).code()
    assert all({"name", "holds"} <= set(c) for c in out["conventions"]) and out["forward_calls"] >= 2
    written = json.loads((tmp_path / "equivcheck.json").read_text())
    assert written["extra"]["explorations"][0]["found"] is True
    assert written["extra"]["explorations"][0]["code"]["numpy"] == out["code"]["numpy"]
    assert (tmp_path / "equivcheck.html").is_file() and (tmp_path / "equivcheck.md").is_file()
    rc = main(["explore", "--from", "keras:dense", "--to", "torch:conv", "--channels", "3", "--spatial", "4,4",
               "--units", "2", "--kernel-size", "2,2"])
    assert rc == 1 and "no mapping" in capsys.readouterr().out


def test_cli_module_attr(capsys, tmp_path, monkeypatch):
    from equivcheck.cli import main

    (tmp_path / "mylayers.py").write_text(
        "import numpy as np\n"
        "def fc(x, kernel, bias):\n"
        "    return x.reshape(len(x), -1) @ kernel + bias\n"
        "fc.kernel_shape = (18, 4)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc = main(["explore", "--source", "mylayers:fc", "--to", "theano:conv", "--channels", "3", "--spatial", "2,3",
               "--units", "4"])
    text = capsys.readouterr().out
    assert rc == 0 and "[:, :, ::-1, ::-1]" in text  # a CHW (in, out) dense to Theano's flipped conv
    assert main(["explore", "--source", "mylayers:nope", "--to", "theano:conv", "--channels", "3"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="nosuch:dense", target="torch:conv", channels=3), "preset"),
        (dict(source="keras:dense", target="torch:conv"), "channels"),
        (dict(source=lambda x, k, b: x, target="torch:conv", channels=3), "kernel_shape"),
        (dict(source="keras:dense", target="torch:conv", channels=3, spatial=(2, 3), units=4, probe="guess"), "probe"),
    ],
)
def test_bad_input_is_one_line_error(kwargs, match):
    with pytest.raises(EquivcheckError, match=match) as info:
        explore(kwargs.pop("source"), kwargs.pop("target"), **kwargs)
    assert "\n" not in str(info.value)


def test_torch_module_with_two_layers_is_refused(frameworks):
    torch = frameworks["torch"]
    with pytest.raises(SpecError, match="exactly one"):
        probe_layer(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))


def test_probe_layer_reports_canonical():
    p = probe_layer("torch:dense", backend="numpy", **DENSE)
    assert p.ok and p.canonical.equivalent(ec.canonical(ec.spec("torch:dense", **DENSE)).reshape(4, 3, 2, 3))
    assert math.prod(p.side.kernel_shape) == 72
