"""onnx2torch's Gemm, Conv and ConvTranspose converters, checked with equivcheck on ONNX Runtime and torch.

Per layer: the converter under test builds a one-node ONNX model with :mod:`onnx.helper` around
the source kernel, converts it with ``onnx2torch.convert`` and returns the weights of the torch
module it made; equivcheck runs the source layer on ONNX Runtime and the target on torch.
Whole model: a torch model exported by ``torch.onnx.export`` and converted back by onnx2torch,
checked layer by layer (attributes included: stride, pads, groups, output_padding).
"""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest

import equivcheck as ec

torch = pytest.importorskip("torch", reason="torch is not installed")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _import_onnx2torch() -> types.ModuleType:
    """onnx2torch, imported beside a torchvision that cannot load.

    onnx2torch imports torchvision at import time for its NonMaxSuppression and RoiAlign
    converters only. The torchvision built for torch 2.13 (0.28.0) is a CUDA build that cannot
    load beside the CPU torch wheel; where that is so, a stand-in whose ops raise serves for the
    import and is removed after it (the converters checked here never call torchvision).
    """
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        pass
    except (ImportError, OSError, RuntimeError):
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    else:
        return pytest.importorskip("onnx2torch", reason="onnx2torch is not installed (.ci/examples-requirements.txt)")

    def unavailable(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("torchvision cannot load beside this torch")

    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
    stand_in = types.ModuleType("torchvision")
    stand_in.ops = ops  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": stand_in, "torchvision.ops": ops})
    try:
        return pytest.importorskip("onnx2torch", reason="onnx2torch is not installed (.ci/examples-requirements.txt)")
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]


onnx2torch = _import_onnx2torch()
from onnx import helper, numpy_helper  # noqa: E402

LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
          torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def through_onnx2torch(op: str, weights: dict[str, np.ndarray | None], **attributes: object
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """One ONNX node ``op(x, W[, B])`` with these initializers, converted by onnx2torch: its layer's weights."""
    names = [n for n, w in weights.items() if w is not None]
    node = helper.make_node(op, ["x", *names], ["y"], **attributes)
    graph = helper.make_graph(
        [node], "one_node",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(weights[n], dtype=np.float32), n) for n in names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = [m for m in onnx2torch.convert(model).modules() if isinstance(m, LAYERS)]
    assert len(layers) == 1, f"onnx2torch made {layers} from one {op} node"
    layer = layers[0]
    return layer.weight.detach().numpy(), None if layer.bias is None else layer.bias.detach().numpy()


def gemm(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Gemm as torch exports it: ``transB=1``, B the (out, in) weight."""
    return through_onnx2torch("Gemm", {"W": kernel, "B": bias}, transB=1)


def gemm_scaled(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The same function written with ``alpha=0.5`` and ``beta=4``: onnx2torch must fold them into the weights."""
    return through_onnx2torch("Gemm", {"W": kernel * 2, "B": None if bias is None else bias / 4},
                              transB=1, alpha=0.5, beta=4.0)


def gemm_in_out(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Gemm with ``transB=0``, B stored (in, out): onnx2torch transposes it into ``nn.Linear``."""
    return through_onnx2torch("Gemm", {"W": kernel, "B": bias}, transB=0)


def conv(stride: int = 1, pads: int = 0, dilation: int = 1, group: int = 1, transposed: bool = False,
         output_padding: int = 0):  # type: ignore[no-untyped-def]
    """A converter through one Conv (or ConvTranspose) node with these attributes; the kernel sets the rest."""
    def convert(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        rank = kernel.ndim - 2
        attributes: dict[str, object] = dict(kernel_shape=list(kernel.shape[2:]), strides=[stride] * rank,
                                             pads=[pads] * 2 * rank, dilations=[dilation] * rank, group=group)
        if transposed:
            attributes["output_padding"] = [output_padding] * rank
        return through_onnx2torch("ConvTranspose" if transposed else "Conv", {"W": kernel, "B": bias}, **attributes)
    return convert


# ---- per layer: the source runs on ONNX Runtime, the converted weights on torch


def test_gemm(equivcheck):
    equivcheck.check_converter(gemm, source="onnx:dense", target="torch:dense", channels=(1, 24), units=(1, 16),
                               max_examples=10)


def test_gemm_after_flatten(equivcheck):
    """Flatten(NCHW) → Gemm: onnx2torch keeps the (out, C·H·W) weight for torch's own CHW flatten."""
    equivcheck.check_converter(gemm, source="onnx:dense", target="torch:dense", channels=3, spatial=(4, 5), units=6)


def test_gemm_alpha_beta_folded(equivcheck):
    equivcheck.check_converter(gemm_scaled, source="onnx:dense", target="torch:dense", channels=(1, 24),
                               units=(1, 16), max_examples=10)


def test_gemm_trans_b_0(equivcheck):
    source = ec.spec("onnx:dense", channels=12, units=5, kernel_layout="IO")  # ONNX Runtime runs it with transB=0
    equivcheck.check_converter(gemm_in_out, source=source, target=ec.spec("torch:dense", channels=12, units=5))


def test_conv_strided_dilated(equivcheck):
    equivcheck.check_converter(conv(stride=2, pads=1, dilation=2), source="onnx:conv", target="torch:conv",
                               channels=(1, 6), units=(1, 6), spatial=(9, 10), kernel_size=((1, 3), (1, 3)),
                               stride=2, padding=1, dilation=2, max_examples=10)


def test_conv_1d_and_3d(equivcheck):
    equivcheck.check_converter(conv(), source="onnx:conv", target="torch:conv", channels=3, units=4, spatial=(9,))
    equivcheck.check_converter(conv(), source="onnx:conv", target="torch:conv", channels=2, units=3,
                               spatial=(4, 5, 3), kernel_size=(2, 3, 2))


def test_depthwise(equivcheck):
    equivcheck.check_converter(conv(group=4), source="onnx:depthwise", target="torch:depthwise", channels=4,
                               multiplier=2, spatial=(6, 6), kernel_size=(3, 3))


def test_conv_transpose(equivcheck):
    equivcheck.check_converter(conv(stride=2, pads=1, transposed=True, output_padding=1), source="onnx:conv_transpose",
                               target="torch:conv_transpose", channels=(1, 6), units=(1, 6), spatial=(5, 4),
                               kernel_size=(3, 3), stride=2, padding=1, output_padding=1, max_examples=10)


# ---- whole model: torch → torch.onnx.export → onnx2torch, layer by layer


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.depthwise = torch.nn.Conv2d(6, 12, 3, groups=6)
        self.fc = torch.nn.Linear(12 * 14 * 14, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = torch.relu(self.up(torch.relu(self.down(x))))
        return self.fc(torch.flatten(self.depthwise(x), 1))


def round_trip(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx2torch.convert(onnx.load_from_string(buffer.getvalue()))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript-based exporter is deprecated
def test_exported_model_round_trip(equivcheck):
    torch.manual_seed(0)
    result = equivcheck.check_model_converter(round_trip, source=Net, input_shape=(2, 3, 16, 16))
    assert result.verdict == "pass", result.render()
    assert [row.kind for row in result.layers] == ["conv", "conv_transpose", "depthwise", "dense"], result.render()
    assert not result.unpaired
