"""ModelCheck.repair() / patch() and ``check-models --fix``: the identified fix applied, proven and written.

The corpus: small ports (torch→Keras, Keras→torch, torch→ONNX) made by converters written
independently of equivcheck (``examples.to_keras``, ``examples.keras_to_torch``, ``torch.onnx.export``),
each with one planted weight mistake: every mutant the identifier names on each layer, a scaled
kernel and a permuted bias. A repair must pass ``check_models`` and agree end to end with the source
(run here directly in each framework); a refusal must name its reason.
"""

from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import pytest

from equivcheck.modelcheck import examples as M

SHAPE = M.SHAPE
CHECK = {"mutants": False}  # the source's input shape: the torch model's SHAPE, what a Keras model records


@pytest.fixture(scope="module")
def onnx():
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'equivcheck[onnx]'")
    return pytest.importorskip("onnx", reason="onnx not installed: pip install 'equivcheck[onnx]'")


@pytest.fixture(scope="module")
def ec(torch, keras, onnx):
    import equivcheck as ec

    return ec


# -- the ports, and planting a mistake in them with each framework's own API ------------------------
def _export(model, torch):
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(*SHAPE),), buf, dynamo=False)
    import onnx

    return onnx.load_from_string(buf.getvalue())


def _port(direction: str, seed: int, torch):
    if direction == "torch→keras":
        src = M.torch_vgg(seed).eval()
        src.input_shape = SHAPE[1:]
        return src, M.to_keras(src)
    if direction == "keras→torch":
        src = M.keras_vgg(seed)
        return src, M.keras_to_torch(src).eval()
    src = M.torch_vgg(seed).eval()
    src.input_shape = SHAPE[1:]
    return src, _export(src, torch)


def _weights(model, name: str):
    """(kernel, bias) of layer ``name`` as numpy, in the framework's stored layout."""
    import onnx
    from onnx import numpy_helper

    if isinstance(model, onnx.ModelProto):
        node = next(n for n in model.graph.node if n.name == name)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return inits[node.input[1]], inits[node.input[2]]
    if hasattr(model, "get_layer"):
        layer = model.get_layer(name)
        return np.asarray(layer.kernel), np.asarray(layer.bias)
    module = dict(model.named_modules())[name]
    return module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()


def _planted(model, name: str, kernel, bias):
    """A copy of ``model`` with layer ``name``'s weights replaced."""
    import onnx
    from onnx import numpy_helper

    if isinstance(model, onnx.ModelProto):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        node = next(n for n in out.graph.node if n.name == name)
        for t in out.graph.initializer:
            for i, value in ((1, kernel), (2, bias)):
                if t.name == node.input[i]:
                    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), t.name))
        return out
    if hasattr(model, "get_layer"):
        import keras

        out = keras.models.clone_model(model)
        out.set_weights(model.get_weights())
        out.get_layer(name).set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
        return out
    import torch

    out = copy.deepcopy(model)
    module = dict(out.named_modules())[name]
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel, np.float32)))
        module.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias, np.float32)))
    return out


def _run(model, x: np.ndarray) -> np.ndarray:
    """The model's output on NCHW input ``x``, run by its own framework (Keras models read NHWC)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if hasattr(model, "get_layer"):
        return np.asarray(model(x.transpose(0, 2, 3, 1), training=False))
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _corpus(ec, direction: str, seed: int, torch):
    """(source, right port, [(layer, planted mistake, wrong port)]): each mutant the identifier names, planted
    once per direction in one of the layers it applies to (drawn with ``seed``)."""
    from equivcheck.mutations import mutants
    from equivcheck.planning import plan
    from equivcheck.serialize import spec_from_dict

    src, port = _port(direction, seed, torch)
    right = ec.check_models(src, port, **CHECK)
    assert right.verdict == "pass", right.render()
    where: dict[str, list] = {}
    for row in right.layers:
        s_spec, c_spec = spec_from_dict(row.source_spec), spec_from_dict(row.converted_spec)
        for m in mutants(s_spec, c_spec, plan(s_spec, c_spec)):
            if not m.ambiguous and m.target is None:
                where.setdefault(m.name, []).append((row, m))
    rng = np.random.default_rng(seed)
    cases = []
    for name, options in where.items():
        row, m = options[int(rng.integers(len(options)))]
        kernel, bias = _weights(src, row.source)
        good_kernel, good_bias = _weights(port, row.converted)
        wrong_kernel = m.mapping.apply(kernel).reshape(good_kernel.shape)
        wrong_bias = m.bias.apply(bias) if m.bias is not None else good_bias
        cases.append((row.converted, name, _planted(port, row.converted, wrong_kernel, wrong_bias)))
    first, last = right.layers[0].converted, right.layers[-1].converted
    k, b = _weights(port, last)
    cases.append((last, "kernel scaled", _planted(port, last, k * 2, b)))
    k, b = _weights(port, first)
    cases.append((first, "bias permuted", _planted(port, first, k, b[::-1].copy())))
    return src, port, cases


@pytest.mark.parametrize("direction", ["torch→keras", "keras→torch", "torch→onnx"])
def test_every_planted_weight_mistake_is_repaired_and_agrees_end_to_end(ec, torch, direction):
    seed = {"torch→keras": 0, "keras→torch": 1, "torch→onnx": 2}[direction]
    src, _, cases = _corpus(ec, direction, seed, torch)
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    y_src = _run(src, x)
    before = [np.array(w, copy=True) for w in (src.get_weights() if hasattr(src, "get_weights") else
                                                [p.detach().numpy().copy() for p in src.parameters()])]
    table, repaired = [], 0
    for layer, planted, bad in cases:
        result = ec.check_models(src, bad, **CHECK)
        assert result.verdict == "fail", f"{direction} {layer} {planted} (seed {seed}) not detected:\n{result.render()}"
        assert result.first_divergence.converted == layer, result.render()
        fixed = result.repair()
        assert fixed.check.verdict == "pass", f"{direction} {layer} {planted}:\n{fixed.check.render()}"
        assert [f.converted for f in fixed.patch.fixes] == [layer]
        assert np.allclose(_run(fixed.model, x), y_src, rtol=1e-4, atol=1e-5), f"{direction} {layer} {planted}"
        assert not np.allclose(_run(bad, x), y_src, rtol=1e-4, atol=1e-5)  # the copy was changed, not the planted port
        repaired += 1
        table.append(f"{direction} seed={seed} {layer:38} {planted:36} {result.first_divergence.mistake:40} repaired")
    print("\n".join(table))
    assert repaired == len(cases) >= 5
    after = src.get_weights() if hasattr(src, "get_weights") else [p.detach().numpy() for p in src.parameters()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # the source is never changed


def test_patch_code_runs_in_each_framework_and_fixes_the_model(ec, torch):
    for direction in ("torch→keras", "keras→torch", "torch→onnx"):
        src, port = _port(direction, 3, torch)
        layer = ec.check_models(src, port, **CHECK).layers[2].converted  # the first dense, behind the flatten
        k, b = _weights(port, layer)
        bad = _planted(port, layer, k[::-1].copy(), b[::-1].copy())
        result = ec.check_models(src, bad, **CHECK)
        found = result.patch()
        assert [f.converted for f in found.fixes] == [layer] and found.framework in direction
        fix = found.fixes[0]
        assert fix.mapping.startswith("w") and fix.parameters and fix.source_parameters
        target = _planted(bad, layer, *_weights(bad, layer))  # a fresh copy for the pasted lines to fix
        exec(found.code(), {"source_model": src, "converted_model": target})  # the patch as pasted
        assert ec.check_models(src, target, **CHECK).verdict == "pass", found.code()
        assert json.loads(json.dumps(found.to_dict()))["layers"][0]["converted"] == layer


def test_a_wrong_permute_before_flatten_is_folded_into_the_next_dense(ec, torch):
    src = M.torch_vgg(4).eval()
    bad = M.to_keras(src, flatten="graph-wrong")  # Permute to CWH, kernel merely transposed
    result = ec.check_models(src, bad, input_shape=SHAPE, mutants=False)
    assert result.verdict == "fail"
    fixed = result.repair()
    assert fixed.passed, fixed.check.render()
    assert "to_cwh" in [layer.name for layer in fixed.model.layers]  # the graph is unchanged
    assert "to_cwh" in [layer.name for layer in bad.layers]
    (note,) = fixed.notes
    assert "fc1" in note and "folds that permutation into the kernel" in note and "graph is unchanged" in note
    assert "the graph is unchanged" in fixed.render() and "fc1" in fixed.patch.fixes[0].folded
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    assert np.allclose(_run(fixed.model, x), _run(src, x), rtol=1e-4, atol=1e-5)


def _keras_like(port, *, fc1_activation="relu", swap_hw_before_conv2=False):
    """``examples.to_keras``'s graph with a graph-level mistake, the port's weights copied by layer name."""
    import keras

    L = keras.layers
    inp = keras.Input((12, 10, 3))
    x = L.MaxPooling2D(2, name="pool1")(L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp))
    if swap_hw_before_conv2:
        x = L.Permute((2, 1, 3), name="swap_hw")(x)
    x = L.MaxPooling2D(2, name="pool2")(L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x))
    x = L.Dense(8, activation=fc1_activation, name="fc1")(L.Flatten(name="flatten")(x))
    out = keras.Model(inp, L.Dense(5, name="fc2")(x))
    for layer in out.layers:
        if layer.weights:
            layer.set_weights(port.get_layer(layer.name).get_weights())
    return out


def test_graph_mistakes_no_weight_change_fixes_are_refused_in_one_line(ec, torch):
    from equivcheck.modelcheck.repair import RepairError

    src = M.torch_vgg(5).eval()
    port = M.to_keras(src)
    reasons = {}
    for planted, bad in (("activation", _keras_like(port, fc1_activation="tanh")),
                         ("H and W swapped", _keras_like(port, swap_hw_before_conv2=True))):
        result = ec.check_models(src, bad, **CHECK)
        assert result.verdict == "fail", result.render()
        with pytest.raises(RepairError) as info:
            result.repair()
        message = str(info.value)
        assert "\n" not in message and message.startswith("cannot repair ")
        with pytest.raises(RepairError):
            result.patch()
        reasons[planted] = message
    assert "fc2" in reasons["activation"] and "no change of its weights" in reasons["activation"]
    assert "conv2" in reasons["H and W swapped"] and "fix the graph" in reasons["H and W swapped"]
    print("\n".join(f"refused ({k}): {v}" for k, v in reasons.items()))


def test_repair_refuses_what_it_cannot_reach(ec, torch):
    from equivcheck.modelcheck import ModelCheck
    from equivcheck.modelcheck.repair import RepairError

    with pytest.raises(RepairError, match="keeps no models"):
        ModelCheck("a", "b", "fail").repair()
    src = M.torch_vgg(6).eval()
    result = ec.check_models(src, M.to_keras(src), **CHECK)
    same = result.repair()  # nothing failed: an unchanged copy, checked again
    assert same.passed and same.patch.fixes == [] and same.patch.code() == "# nothing to fix"


def test_cli_fix_round_trips_keras_state_dicts_and_onnx(ec, torch, keras, onnx, tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    from equivcheck.cli import main

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    model = ["--model", "equivcheck.modelcheck.examples:torch_vgg", "--no-mutants"]
    src = M.torch_vgg(7).eval()
    torch.save(src.state_dict(), tmp_path / "src.pt")
    M.to_keras(src, flatten="wrong").save(tmp_path / "wrong.keras")
    k_src = M.keras_vgg(7)
    k_src.save(tmp_path / "src.keras")
    torch.save(M.keras_to_torch(k_src, flatten="wrong").state_dict(), tmp_path / "wrong.pt")
    right = _export(src, torch)
    k, b = _weights(right, "/features/features.3/Conv")
    (tmp_path / "wrong.onnx").write_bytes(_planted(right, "/features/features.3/Conv", k[:, :, ::-1], b)
                                          .SerializeToString())
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)

    def fix(a: str, b: str, out: str, *extra: str) -> int:
        return main(["check-models", str(tmp_path / a), str(tmp_path / b), *model, "--fix", str(tmp_path / out), *extra])

    # .keras
    assert fix("src.pt", "wrong.keras", "fixed.keras", "--input-shape", "2,3,12,10") == 0
    assert "repaired 1 layer(s): fc1" in capsys.readouterr().out
    loaded = keras.saving.load_model(tmp_path / "fixed.keras")
    assert ec.check_models(src, loaded, **CHECK).passed
    assert np.allclose(_run(loaded, x), _run(src, x), rtol=1e-4, atol=1e-5)
    # a torch state dict, with the patch in the JSON
    assert fix("src.keras", "wrong.pt", "fixed.pt", "--json") == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "fail" and out["repair"]["passed"] and out["repair"]["output"].endswith("fixed.pt")
    layer = out["repair"]["patch"]["layers"][0]
    assert layer["converted"] == "classifier.0" and layer["parameters"] == ["classifier.0.weight", "classifier.0.bias"]
    assert "load_state_dict" in out["repair"]["patch"]["code"]
    net = M.torch_vgg()
    net.load_state_dict(torch.load(tmp_path / "fixed.pt", weights_only=True))
    assert ec.check_models(k_src, net.eval(), **CHECK).passed
    # .onnx, initializers rewritten
    assert fix("src.pt", "wrong.onnx", "fixed.onnx", "--input-shape", "2,3,12,10") == 0, capsys.readouterr().err
    assert "repaired 1 layer(s): /features/features.3/Conv (flip H only" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "fixed.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: x})[0], _run(src, x), rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(onnx.load(tmp_path / "fixed.onnx"))
    # OUT exists: refused before any work, unless --force; another format than DST: refused
    stamp = (tmp_path / "fixed.onnx").stat().st_mtime_ns
    assert fix("src.pt", "wrong.onnx", "fixed.onnx", "--input-shape", "2,3,12,10") == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "fixed.onnx").stat().st_mtime_ns == stamp
    assert fix("src.pt", "wrong.onnx", "fixed.onnx", "--input-shape", "2,3,12,10", "--force") == 0
    assert fix("src.pt", "wrong.onnx", "fixed.keras") == 2
    assert "format" in capsys.readouterr().err
    # a failing layer with no identified fix: one line, exit 2, nothing written
    _keras_like(M.to_keras(src), fc1_activation="tanh").save(tmp_path / "graph.keras")
    assert fix("src.pt", "graph.keras", "never.keras", "--input-shape", "2,3,12,10") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot repair classifier.3 ↔ fc2 (graph)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never.keras").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_flax_models_are_repaired_both_ways(ec, torch):
    jax = pytest.importorskip("jax", reason="jax not installed: pip install 'equivcheck[jax]'")
    nn = pytest.importorskip("flax.linen", reason="flax not installed: pip install flax")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), name="conv")(x)), (2, 2), strides=(2, 2))
            return nn.Dense(5, name="fc")(x.reshape((x.shape[0], -1)))  # flattens HWC

    flax_model = CNN()
    variables = flax_model.init(jax.random.PRNGKey(8), np.zeros((2, 12, 10, 3), np.float32))
    p = jax.tree.map(np.asarray, variables["params"])
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 5, 5)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(p["conv"]["kernel"].transpose(3, 2, 0, 1).copy()))
        net[0].bias.copy_(torch.from_numpy(p["conv"]["bias"].copy()))
        net[4].weight.copy_(torch.from_numpy(p["fc"]["kernel"].T.copy()))  # planted: HWC rows read as CHW
        net[4].bias.copy_(torch.from_numpy(p["fc"]["bias"].copy()))
    x = np.random.default_rng(8).standard_normal((2, 12, 10, 3)).astype(np.float32)
    result = ec.check_models((flax_model, variables), net, input_shape=(2, 12, 10, 3), mutants=False)
    assert result.first_divergence.converted == "4"
    fixed = result.repair()
    assert fixed.passed, fixed.check.render()
    with torch.no_grad():
        y = fixed.model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.allclose(y, np.asarray(flax_model.apply(variables, x)), rtol=1e-4, atol=1e-5)
    # the other way: the torch model (now right) is the source, the Flax variables are wrong
    wrong = jax.tree.map(lambda a: a, variables)
    wrong["params"]["conv"]["kernel"] = variables["params"]["conv"]["kernel"][::-1]  # a spurious flip of H
    result = ec.check_models(fixed.model, (flax_model, wrong), input_shape=(2, 3, 12, 10), mutants=False)
    assert result.first_divergence.converted == "conv"
    again = result.repair()
    assert again.passed and again.patch.fixes[0].parameters == ("params/conv/kernel", "params/conv/bias")
    assert np.array_equal(np.asarray(wrong["params"]["conv"]["kernel"]), np.asarray(variables["params"]["conv"]["kernel"])[::-1])
    assert np.allclose(np.asarray(flax_model.apply(again.model[1], x)), np.asarray(flax_model.apply(variables, x)),
                       rtol=1e-4, atol=1e-5)


def test_layer_level_patch_lines_compute_the_right_kernel(torch, onnx):
    from onnx import numpy_helper

    import equivcheck as ec
    from equivcheck.checker.messages import converter_patch
    from equivcheck.planning import convert, plan

    dense = {"channels": 6, "spatial": (3, 2), "units": 8}
    pairs = [(ec.spec("torch:dense", **dense), ec.spec("keras:dense", **dense)),
             (ec.spec("keras:conv", channels=3, spatial=(5, 5), kernel_size=(3, 3), units=4),
              ec.spec("torch:conv", channels=3, spatial=(5, 5), kernel_size=(3, 3), units=4)),
             (ec.spec("keras:conv", channels=3, spatial=(5, 5), kernel_size=(3, 3), units=4),
              ec.spec("onnx:conv", channels=3, spatial=(5, 5), kernel_size=(3, 3), units=4))]

    class Layer:
        values: tuple = ()

        def set_weights(self, values):
            self.values = values

    rng = np.random.default_rng(9)
    for source, target in pairs:
        w = rng.standard_normal(source.kernel_shape).astype(np.float32)
        b = rng.standard_normal(source.bias_shape).astype(np.float32)
        want = convert(source, target, w, b)
        layer, state_dict = Layer(), {}
        initializers = {n: numpy_helper.from_array(np.zeros(1, np.float32), n) for n in ("W", "B")}
        lines = converter_patch(source, target, plan(source, target))
        assert lines[0].startswith("# w, b: the source layer's kernel and bias")
        exec("\n".join(lines), {"np": np, "torch": torch, "numpy_helper": numpy_helper, "w": w, "b": b, "name": "fc",
                                "layer": layer, "state_dict": state_dict, "initializers": initializers, "W": "W", "B": "B"})
        if state_dict:
            got = [state_dict["fc.weight"].numpy(), state_dict["fc.bias"].numpy()]
        else:
            got = layer.values or [numpy_helper.to_array(initializers[n]) for n in ("W", "B")]
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), lines
