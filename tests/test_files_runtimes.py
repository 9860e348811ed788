"""Weights from runtime model files: ONNX initializers, TFLite buffers, a .keras archive's HDF5, read without running them.

The valid files come from the real writers (onnx.helper/onnx.save, TFLiteConverter, Keras
``model.save``) and the read arrays are compared with what those frameworks say they hold.
The builders here are shared with the hostile catalogue in ``test_hardening_files.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equivcheck import files
from equivcheck.cli import main
from equivcheck.errors import FileFormatError

KERNEL = np.random.default_rng(1).standard_normal((6, 60)).astype(np.float32)  # (out, in): ONNX Gemm transB=1, TFLite FC
BIAS = np.linspace(-1, 1, 6, dtype=np.float32)
SHAPE = ["--channels", "3", "--spatial", "4,5", "--units", "6"]


def convert(src, out, preset, *extra) -> int:
    return main(["convert", "--from", f"{preset}:dense", "--to", "torch:conv", *SHAPE, str(src), str(out), *extra])


# -- builders ------------------------------------------------------------------------------------
def onnx_file(path: Path, nodes=None, initializers=None, opsets=None, functions=()) -> Path:
    """An ONNX model (Flatten + Gemm transB=1 by default) written with onnx.save, unchecked: a builder for hostile ones too."""
    onnx = pytest.importorskip("onnx", reason="onnx writes .onnx files")
    from onnx import TensorProto, helper, numpy_helper

    if nodes is None:
        nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
                 helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc", transB=1)]
    if initializers is None:
        initializers = [numpy_helper.from_array(KERNEL, "W"), numpy_helper.from_array(BIAS, "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 17)], functions=list(functions))
    onnx.save(model, path)
    return path


def external(name: str, array: np.ndarray, location: str, offset: int = 0, length: int | None = None):
    """An initializer whose data the model says lives in ``location``."""
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes if length is None else length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def tflite_bytes(tensors=None, ops=None, codes=(9,), buffers=None, *, external_buffer: int = 0, buffer_at=None) -> bytes:
    """A TFLite flatbuffer from the schema's own builder functions.

    ``tensors``: (name, shape, type, buffer); ``ops``: (opcode index, inputs, outputs);
    ``buffers``: bytes each (the first empty, as the format asks). Default: one FULLY_CONNECTED.
    ``buffer_at``: (buffer, offset, size) to point a buffer at bytes outside the flatbuffer.
    """
    flatbuffers = pytest.importorskip("flatbuffers", reason="flatbuffers builds .tflite files")
    s = pytest.importorskip("ai_edge_litert.schema_py_generated", reason="ai-edge-litert carries the TFLite schema")
    if tensors is None:
        tensors = [("x", [1, 60], 0, 0), ("W", [6, 60], 0, 1), ("b", [6], 0, 2), ("y", [1, 6], 0, 0)]
        ops = [(0, [0, 1, 2], [3])]
        buffers = [b"", KERNEL.tobytes(), BIAS.tobytes()]
    b = flatbuffers.Builder(1024)

    def ints(start, values):
        start(b, len(values))
        for v in reversed(values):
            b.PrependInt32(v)
        return b.EndVector()

    def tables(start, offsets):
        start(b, len(offsets))
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    made_buffers = []
    for i, data in enumerate(buffers):
        vec = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
        s.BufferStart(b)
        if vec is not None:
            s.BufferAddData(b, vec)
        if buffer_at is not None and buffer_at[0] == i:
            s.BufferAddOffset(b, buffer_at[1])
            s.BufferAddSize(b, buffer_at[2])
        made_buffers.append(s.BufferEnd(b))
    made_tensors = []
    for i, (name, shape, kind, buffer) in enumerate(tensors):
        n, sh = b.CreateString(name), ints(s.TensorStartShapeVector, shape)
        s.TensorStart(b)
        s.TensorAddShape(b, sh)
        s.TensorAddType(b, kind)
        s.TensorAddBuffer(b, buffer)
        s.TensorAddName(b, n)
        if external_buffer and i == 1:
            s.TensorAddExternalBuffer(b, external_buffer)
        made_tensors.append(s.TensorEnd(b))
    made_ops = []
    for index, ins, outs in ops:
        i_vec, o_vec = ints(s.OperatorStartInputsVector, ins), ints(s.OperatorStartOutputsVector, outs)
        s.OperatorStart(b)
        s.OperatorAddOpcodeIndex(b, index)
        s.OperatorAddInputs(b, i_vec)
        s.OperatorAddOutputs(b, o_vec)
        made_ops.append(s.OperatorEnd(b))
    t_vec, op_vec = tables(s.SubGraphStartTensorsVector, made_tensors), tables(s.SubGraphStartOperatorsVector, made_ops)
    s.SubGraphStart(b)
    s.SubGraphAddTensors(b, t_vec)
    s.SubGraphAddOperators(b, op_vec)
    graph = s.SubGraphEnd(b)
    made_codes = []
    for code in codes:
        s.OperatorCodeStart(b)
        s.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        s.OperatorCodeAddBuiltinCode(b, code)
        s.OperatorCodeAddVersion(b, 1)
        made_codes.append(s.OperatorCodeEnd(b))
    code_vec, graph_vec = tables(s.ModelStartOperatorCodesVector, made_codes), tables(s.ModelStartSubgraphsVector, [graph])
    buf_vec = tables(s.ModelStartBuffersVector, made_buffers)
    s.ModelStart(b)
    s.ModelAddVersion(b, 3)
    s.ModelAddOperatorCodes(b, code_vec)
    s.ModelAddSubgraphs(b, graph_vec)
    s.ModelAddBuffers(b, buf_vec)
    b.Finish(s.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def keras_file(path: Path, layers: int = 1) -> Path:
    keras = pytest.importorskip("keras", reason="Keras writes .keras files")
    model = keras.Sequential([keras.Input((4, 5, 3)), keras.layers.Flatten(),
                              *(keras.layers.Dense(60 if i < layers - 1 else 6) for i in range(layers))])
    model.layers[-1].set_weights([KERNEL.T, BIAS])
    model.save(path)
    return path


def expected_conv(kernel_out_in: np.ndarray, channels_last: bool) -> np.ndarray:
    """torch:conv's OIHW kernel for a dense (out, in) kernel reading a (4, 5, 3) NHWC or (3, 4, 5) NCHW map."""
    if channels_last:
        return kernel_out_in.reshape(6, 4, 5, 3).transpose(0, 3, 1, 2)
    return kernel_out_in.reshape(6, 3, 4, 5)


# -- ONNX --------------------------------------------------------------------------------------------
def test_onnx_gemm_converts_by_its_one_linear_node(tmp_path):
    src = onnx_file(tmp_path / "m.onnx")
    assert convert(src, tmp_path / "out.npz", "onnx") == 0
    got = files.load_arrays(tmp_path / "out.npz")
    assert np.array_equal(got["kernel"], expected_conv(KERNEL, False)) and np.array_equal(got["bias"], BIAS)
    assert sorted(files.load_arrays(src)) == ["W", "b"]


@pytest.mark.parametrize("dtype", ["float32-typed", "float16", "bfloat16", "float64"])
def test_onnx_initializers_match_onnx_own_reading(tmp_path, dtype):
    onnx = pytest.importorskip("onnx", reason="onnx")
    from onnx import TensorProto, helper, numpy_helper

    values = KERNEL[:2, :5].astype(np.float32)
    if dtype == "float32-typed":  # float_data, not raw_data
        t = helper.make_tensor("W", TensorProto.FLOAT, values.shape, values.ravel().tolist())
    elif dtype == "bfloat16":
        t = helper.make_tensor("W", TensorProto.BFLOAT16, values.shape, values.ravel().tolist())
    else:
        t = numpy_helper.from_array(values.astype(dtype), "W")
    src = onnx_file(tmp_path / "m.onnx", initializers=[t])
    got = files.load_arrays(src)["W"]
    want = numpy_helper.to_array(onnx.load(src).graph.initializer[0])
    assert got.dtype.name == want.dtype.name == (dtype.split("-")[0])
    assert np.array_equal(got.astype(np.float64), want.astype(np.float64))


def test_onnx_matmul_takes_the_bias_of_its_add(tmp_path):
    from onnx import helper, numpy_helper

    pytest.importorskip("onnx", reason="onnx")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"), helper.make_node("MatMul", ["f", "Wt"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "bias"], ["y"], name="add")]
    inits = [numpy_helper.from_array(KERNEL.T.copy(), "Wt"), numpy_helper.from_array(BIAS, "bias")]
    src = onnx_file(tmp_path / "m.onnx", nodes, inits)
    assert main(["convert", "--from", "torch:dense", "--to", "torch:conv", *SHAPE, "--kernel-key", "Wt", str(src),
                 str(tmp_path / "bad.npz")]) == 2  # (in, out) is not torch's (out, in): the shape check says so
    assert main(["convert", "--from", "jax:dense", "--to", "torch:conv", *SHAPE, str(src), str(tmp_path / "o.npz")]) == 0
    got = files.load_arrays(tmp_path / "o.npz")
    assert np.array_equal(got["bias"], BIAS) and got["kernel"].shape == (6, 3, 4, 5)


def test_onnx_external_data_inside_the_folder_is_read(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx")
    model = onnx.load(onnx_file(tmp_path / "plain.onnx"))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size >= KERNEL.nbytes
    assert convert(tmp_path / "m.onnx", tmp_path / "out.npz", "onnx") == 0
    assert np.array_equal(files.load_arrays(tmp_path / "out.npz")["kernel"], expected_conv(KERNEL, False))


def test_two_linear_nodes_need_a_key_and_the_message_lists_them(tmp_path, capsys):
    from onnx import helper, numpy_helper

    pytest.importorskip("onnx", reason="onnx")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"), helper.make_node("Gemm", ["f", "W", "b"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="fc2", transB=1)]
    inits = [numpy_helper.from_array(KERNEL, "W"), numpy_helper.from_array(BIAS, "b"),
             numpy_helper.from_array(np.eye(6, dtype=np.float32), "W2"), numpy_helper.from_array(BIAS, "b2")]
    src = onnx_file(tmp_path / "m.onnx", nodes, inits)
    assert convert(src, tmp_path / "out.npz", "onnx") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 linear nodes: Gemm 'fc1' (weight 'W'), Gemm 'fc2' (weight 'W2')" in err, err
    assert convert(src, tmp_path / "out.npz", "onnx", "--kernel-key", "W") == 0  # its own bias comes with it
    assert np.array_equal(files.load_arrays(tmp_path / "out.npz")["bias"], BIAS)


# -- TFLite ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_tflite(tmp_path_factory) -> tuple[Path, Path]:
    """A dense and a conv/depthwise/transposed-conv model, from TensorFlow's own converter."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow converts .tflite files")
    keras = pytest.importorskip("keras", reason="Keras builds the models")
    folder = tmp_path_factory.mktemp("tflite")
    dense = keras.Sequential([keras.Input((4, 5, 3)), keras.layers.Flatten(), keras.layers.Dense(6)])
    dense.layers[-1].set_weights([KERNEL.T, BIAS])
    convs = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"), keras.layers.DepthwiseConv2D(3, name="d"),
                              keras.layers.Conv2DTranspose(2, 3, name="t")])
    paths = folder / "dense.tflite", folder / "convs.tflite"
    for model, path in zip((dense, convs), paths):
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return paths


def test_tflite_fully_connected_converts(tmp_path, converted_tflite):
    assert convert(converted_tflite[0], tmp_path / "out.npz", "tflite") == 0
    got = files.load_arrays(tmp_path / "out.npz")
    assert np.array_equal(got["kernel"], expected_conv(KERNEL, True)) and np.array_equal(got["bias"], BIAS)


def test_tflite_conv_ops_are_found_with_tflite_layouts(tmp_path, capsys, converted_tflite):
    src = converted_tflite[1]
    arrays = files.load_arrays(src)
    assert convert(src, tmp_path / "out.npz", "tflite") == 2
    err = capsys.readouterr().err
    assert "3 linear nodes: CONV_2D" in err and "DEPTHWISE_CONV_2D" in err and "TRANSPOSE_CONV" in err and err.count("\n") == 1
    shapes = sorted(a.shape for a in arrays.values() if a.ndim == 4)
    assert shapes == [(1, 3, 3, 4), (2, 3, 3, 4), (4, 3, 3, 3)]  # depthwise (1,h,w,C·M), transposed OHWI, conv OHWI


def test_tflite_from_the_schema_builder_reads_the_same(tmp_path):
    src = tmp_path / "fc.tflite"
    src.write_bytes(tflite_bytes())
    got = files.load_arrays(src)
    assert sorted(got) == ["W", "b"] and np.array_equal(got["W"], KERNEL)
    assert convert(src, tmp_path / "out.npz", "tflite") == 0


def test_tflite_dequantized_float16_weights_are_followed(tmp_path):
    tensors = [("x", [1, 60], 0, 0), ("W16", [6, 60], 1, 1), ("W", [6, 60], 0, 0), ("b", [6], 0, 2), ("y", [1, 6], 0, 0)]
    ops = [(1, [1], [2]), (0, [0, 2, 3], [4])]
    src = tmp_path / "fp16.tflite"
    src.write_bytes(tflite_bytes(tensors, ops, (9, 6), [b"", KERNEL.astype(np.float16).tobytes(), BIAS.tobytes()]))
    assert convert(src, tmp_path / "out.npz", "tflite") == 0
    assert files.load_arrays(tmp_path / "out.npz")["kernel"].dtype == np.float16


# -- .keras ------------------------------------------------------------------------------------------
def test_keras_archive_weights_are_read_without_loading_the_model(tmp_path):
    src = keras_file(tmp_path / "m.keras")
    assert convert(src, tmp_path / "out.npz", "keras") == 0
    got = files.load_arrays(tmp_path / "out.npz")
    assert np.array_equal(got["kernel"], expected_conv(KERNEL, True)) and np.array_equal(got["bias"], BIAS)


def test_keras_archive_with_two_dense_layers_names_both(tmp_path, capsys):
    src = keras_file(tmp_path / "m.keras", layers=2)
    assert convert(src, tmp_path / "out.npz", "keras") == 2
    err = capsys.readouterr().err
    assert "2 layers with a kernel: 'layers/dense/vars/0', 'layers/dense_1/vars/0'" in err and err.count("\n") == 1, err


def test_keras_archive_without_weights_is_one_line(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(FileFormatError, match=r"holds no model\.weights\.h5"):
        files.load_arrays(tmp_path / "m.keras")
