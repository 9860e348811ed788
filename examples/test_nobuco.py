"""nobuco 0.17 (torch → Keras 2 through ``tf_keras``) on a small CNN, checked with equivcheck layer by layer.

nobuco traces the torch model and writes a tf_keras functional model: channels-last convs with
the padding as ``ZeroPadding2D`` layers, the batch norm as ``BatchNormalization``, and before the
``Dense`` a ``tf.transpose`` back to NCHW and a ``tf.reshape`` (so the Dense kernel is the torch
weight transposed). equivcheck pairs each torch layer with its tf_keras layer, replays each one
alone on its partner's input, and reads the flatten order off the graph.

nobuco wraps every torch function and ``nn.Module.__new__`` when it is imported (its tracer), and
keeps them wrapped: torch.fx tracing in the same process then fails (onnx2torch's round trip
does). So the conversion runs in a child process, ``python examples/test_nobuco.py STATE OUT.h5``,
which writes nobuco's model as ``.h5``; the test loads it with ``tf_keras.models.load_model``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import types
from collections.abc import Callable

import numpy as np
import pytest

import equivcheck as ec

torch = pytest.importorskip("torch", reason="torch is not installed")
tf_keras = pytest.importorskip("tf_keras", reason="tf_keras is not installed: pip install 'equivcheck[tfkeras]'")
if importlib.util.find_spec("nobuco") is None:
    pytest.skip("nobuco is not installed (.ci/examples-requirements.txt)", allow_module_level=True)

INPUT = (2, 3, 12, 10)  # N, C, H, W: a non-square map, so H and W cannot be confused silently


def _import_nobuco() -> types.ModuleType:
    """nobuco, imported where ``keras`` is Keras 3 and torchvision cannot load.

    nobuco 0.17 was written for TensorFlow ≤ 2.15, where ``import keras`` gave Keras 2: it does
    ``import keras`` and ``from keras.src.engine.keras_tensor import KerasTensor``. With TensorFlow
    2.21, Keras 2 is the ``tf_keras`` package, so for the import only ``keras`` and its submodules
    name tf_keras's; every nobuco module keeps the tf_keras it imported, and Keras 3 is put back
    right after. nobuco also imports torchvision for its NMS/RoIAlign/StochasticDepth converters,
    and the torchvision built for torch 2.13 cannot load beside the CPU torch wheel
    (examples/README.md): a stand-in whose functions raise serves for the import and is removed
    after it. The converters this model uses never touch torchvision.
    """
    saved = {name: module for name, module in sys.modules.items() if name == "keras" or name.startswith("keras.")}
    keras2 = {"keras" + name[len("tf_keras"):]: module for name, module in sys.modules.items()
              if name == "tf_keras" or name.startswith("tf_keras.")}

    class StandIn(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            if name.startswith("__"):
                raise AttributeError(name)

            def unavailable(*args: object, **kwargs: object) -> None:
                raise NotImplementedError("torchvision cannot load beside this torch")

            value = unavailable if name[:1].islower() else type(name, (), {"__init__": unavailable})
            setattr(self, name, value)
            return value

    names = ("torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.ops.poolers",
             "torchvision.transforms", "torchvision.transforms.functional", "torchvision.utils")
    real_torchvision = True
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        real_torchvision = False
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    stand_ins = {name: StandIn(name) for name in names} if not real_torchvision else {}
    for name, module in stand_ins.items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(stand_ins[parent], child, module)
    for name in saved:
        del sys.modules[name]
    sys.modules.update(keras2)
    sys.modules.update(stand_ins)
    if stand_ins:
        torch.ops.torchvision.nms = stand_ins["torchvision.ops"].nms  # nobuco registers a converter for it
    try:
        import nobuco
    finally:
        for name in keras2:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        for name in stand_ins:
            sys.modules.pop(name, None)
        if stand_ins:
            del torch.ops.torchvision.nms
    return nobuco


class SmallCNN(torch.nn.Module):
    """conv, batch norm, relu, max pool, strided conv, relu, flatten of a 6×3×3 map, linear, relu, linear."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(torch.nn.functional.relu(self.bn1(self.conv1(x))))
        x = torch.nn.functional.relu(self.conv2(x))
        return self.fc2(torch.nn.functional.relu(self.fc1(torch.flatten(x, 1))))


def make_cnn() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN().eval()
    with torch.no_grad():  # trained-looking statistics: a swap or a missed copy shows
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.running_var.uniform_(0.5, 2)
        net.bn1.weight.uniform_(0.5, 2)
        net.bn1.bias.uniform_(-0.5, 0.5)
    return net


def nobuco_to_h5(state: str, out: str) -> None:
    """What a nobuco user writes (channels-last input), run in the child process. The batch stays the traced one:
    with ``input_shapes={x: (None, ...)}`` nobuco's reshape before the Dense has shape (None, None), which the
    model in memory runs but tf_keras cannot rebuild from the saved config ("The last dimension of the inputs to
    a Dense layer should be defined")."""
    nobuco = _import_nobuco()
    net = SmallCNN().eval()
    net.load_state_dict(torch.load(state))
    x = torch.zeros(INPUT)
    model = nobuco.pytorch_to_keras(net, args=[x], inputs_channel_order=nobuco.ChannelOrder.TENSORFLOW,
                                    outputs_channel_order=nobuco.ChannelOrder.PYTORCH)
    model.save(out)


@pytest.fixture(scope="module")
def convert(tmp_path_factory) -> Callable[[torch.nn.Module], object]:
    """nobuco's conversion of a SmallCNN in a child process, loaded back (one run per distinct set of weights)."""
    folder = tmp_path_factory.mktemp("nobuco")

    def run(net: torch.nn.Module):
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()[:16]
        state, out = folder / f"{digest}.pt", folder / f"{digest}.h5"
        if not out.exists():
            torch.save(net.state_dict(), state)
            done = subprocess.run([sys.executable, __file__, str(state), str(out)], capture_output=True, text=True,
                                  timeout=300, check=False)
            assert done.returncode == 0, "nobuco failed:\n" + "\n".join(done.stderr.splitlines()[-20:])
        return tf_keras.models.load_model(out, compile=False)

    return run


def linear_layers(model) -> list:
    return [layer for layer in model.layers if type(layer).__name__ in ("Conv2D", "Dense")]


def test_nobuco_writes_a_tf_keras_model_that_passes_layer_by_layer(convert):
    result = ec.check_model_converter(convert, source=make_cnn, input_shape=INPUT)
    assert result.verdict == "pass", result.render()
    assert result.converted.startswith("tf_keras")
    assert [row.source for row in result.layers] == ["conv1", "bn1", "conv2", "fc1", "fc2"]
    assert not result.unchecked
    fc1 = next(row for row in result.layers if row.source == "fc1")
    assert "CHW" in fc1.boundary  # nobuco transposes back to NCHW before its reshape: the torch order


@pytest.mark.parametrize("mistake", ["conv kernel H and W exchanged", "fc1 rows in HWC order"])
def test_a_planted_mistake_after_conversion_is_named_at_its_layer(convert, mistake):
    net = make_cnn()
    converted = convert(net)
    _, conv2, fc1, _ = linear_layers(converted)  # conv1, conv2, fc1, fc2
    if mistake.startswith("conv"):
        planted, source = conv2, "conv2"
        kernel, bias = conv2.get_weights()
        conv2.set_weights([kernel.transpose(1, 0, 2, 3), bias])  # (kh, kw, in, out) → (kw, kh, in, out)
        expected = "H and W of the kernel exchanged"
    else:
        planted, source = fc1, "fc1"
        kernel, bias = fc1.get_weights()  # rows in CHW order (C=6, H=3, W=3): permuted to HWC
        fc1.set_weights([kernel.reshape(6, 3, 3, 16).transpose(1, 2, 0, 3).reshape(54, 16), bias])
        expected = "flatten order"
    result = ec.check_models(net, converted, input_shape=INPUT)
    assert result.verdict == "fail", result.render()
    first = result.first_divergence
    assert (first.source, first.converted) == (source, planted.name), result.render()
    assert expected in first.diagnosis, first.diagnosis
    assert [row.source for row in result.layers if row.verdict == "fail"] == [source]
    with pytest.raises(ec.ConversionCheckFailed, match=f"first divergence: {source} ↔ {planted.name}"):
        ec.check_model_converter(lambda _: converted, source=net, input_shape=INPUT)


def test_the_conversion_agrees_end_to_end(convert):
    net = make_cnn()
    converted = convert(net)
    x = np.random.default_rng(0).standard_normal(INPUT).astype(np.float32)
    want = net(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(converted(x.transpose(0, 2, 3, 1), training=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":  # the child process: python examples/test_nobuco.py STATE OUT.h5
    nobuco_to_h5(*sys.argv[1:3])
