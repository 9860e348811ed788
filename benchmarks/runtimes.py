"""Runtime backends' per-case overhead: the ``onnxruntime`` and ``tflite`` backends' build + set weights + run,
against a bare run of the very same single-op model (its session or interpreter made once, outside the timing).

Columns, per case (milliseconds): the bare run alone; the bare cost of a case from scratch (a new session or
interpreter on the serialised model, then one run); the backend's cold case (a spec not seen before: the
model built and checked, or converted); the backend's case (``build`` + ``set_weights`` + call on a new
layer of a spec seen before); its reuse (``set_weights`` + call on a built layer, as verify's mutants do);
and for ONNX Runtime the road not taken, one session fed the weights as graph inputs. Ratios are backend
case / bare run and backend case / bare from scratch, all measured side by side in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import equivcheck as ec
from equivcheck import backends

CASES = {
    "dense 16×7×7→32": ("dense", dict(channels=16, spatial=(7, 7), units=32)),
    "conv 3×3 16→32 on 14×14": ("conv", dict(channels=16, spatial=(14, 14), kernel_size=(3, 3), units=32, padding=1)),
    "conv_transpose 3×3 s2 16→8": ("conv_transpose", dict(channels=16, spatial=(7, 7), kernel_size=(3, 3), units=8,
                                                          stride=2, padding=1, output_padding=1)),
}
PRESET = {"onnxruntime": "onnx", "tflite": "tflite"}


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _bare_onnx(layer, x: np.ndarray) -> tuple[Callable[[], object], Callable[[], object], Callable[[], object]]:
    """Bare run, bare from scratch, and the road not taken: weights fed as graph inputs to one session."""
    import onnx
    import onnxruntime as ort

    from equivcheck.backends.onnxruntime import PROVIDER, session_options

    model = layer.model.SerializeToString()
    session = ort.InferenceSession(model, session_options(ort), providers=[PROVIDER])

    def scratch() -> object:
        return ort.InferenceSession(model, session_options(ort), providers=[PROVIDER]).run(None, {"x": x})

    fed = onnx.ModelProto.FromString(model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fed.graph.initializer}
    fed.graph.input.extend(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)) for n, t in
                           ((t.name, t) for t in fed.graph.initializer))
    del fed.graph.initializer[:]
    fed_session = ort.InferenceSession(fed.SerializeToString(), session_options(ort), providers=[PROVIDER])
    return (lambda: session.run(None, {"x": x})), scratch, (lambda: fed_session.run(None, {"x": x, **weights}))


def _bare_tflite(layer, x: np.ndarray) -> tuple[Callable[[], object], Callable[[], object], None]:
    from equivcheck.backends.tflite import interpreter

    model = layer.model(len(x))
    it = interpreter(model)
    native = layer.to_native(x)
    index, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def run(it=it) -> object:
        it.set_tensor(index, native)
        it.invoke()
        return it.get_tensor(out)

    def scratch() -> object:
        return run(interpreter(model))

    return run, scratch, None


def _clear_caches() -> None:
    """Forget the converted/checked models shared per spec, so that the next build is a cold one."""
    from equivcheck.backends import onnxruntime, tflite

    onnxruntime._checked_model.cache_clear()
    tflite._shared_template.cache_clear()


def rows(repeat: int = 20) -> list[tuple[str, str, float, float, float, float, float, float, float, float]]:
    out = []
    for name, preset in PRESET.items():
        backend = backends.get(name)
        if not backend.available():
            print(f"skipping {name}: not installed")
            continue
        for label, (layer_name, kwargs) in CASES.items():
            spec = ec.spec(f"{preset}:{layer_name}", **kwargs)
            if backend.unsupported(spec, "float32"):
                continue
            rng = np.random.default_rng(0)
            kernel = rng.standard_normal(spec.kernel_shape).astype(np.float32)
            bias = rng.standard_normal(spec.bias_shape).astype(np.float32)
            x = rng.standard_normal((4, *spec.input_shape)).astype(np.float32)

            def case(backend=backend, spec=spec, kernel=kernel, bias=bias, x=x) -> object:
                layer = backend.build(spec)
                layer.set_weights(kernel, bias)
                return layer(x)

            layer = backend.build(spec)
            layer.set_weights(kernel, bias)
            expected = layer(x)  # warm: import, first conversion
            bare, scratch, fed = (_bare_onnx if name == "onnxruntime" else _bare_tflite)(layer, x)
            got = bare()[0] if name == "onnxruntime" else layer.from_native(bare())
            assert np.allclose(got, expected), "the bare run is not the backend's model"

            def reuse(layer=layer, kernel=kernel, bias=bias, x=x) -> object:
                layer.set_weights(kernel, bias)
                return layer(x)

            def cold(case=case) -> object:
                _clear_caches()
                return case()

            t_bare, t_scratch = _time(bare, repeat), _time(scratch, repeat)
            t_cold = _time(cold, max(3, repeat // 4))
            t_case, t_reuse = _time(case, repeat), _time(reuse, repeat)
            t_fed = _time(fed, repeat) if fed else float("nan")
            out.append((name, label, t_bare, t_scratch, t_cold, t_case, t_reuse, t_fed, t_case / t_bare, t_case / t_scratch))
    return out


def render(table, markdown: bool = False) -> str:
    if markdown:
        head = ["| backend | layer | bare run (ms) | bare from scratch (ms) | backend cold case (ms) | backend case (ms) "
                "| backend reuse (ms) | weights as inputs, run (ms) | case / bare run × | case / from scratch × |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        return "\n".join(head + [f"| {b} | {n} | {1e3 * r:.3f} | {1e3 * s:.3f} | {1e3 * c0:.2f} | {1e3 * c:.3f} | "
                                 f"{1e3 * u:.3f} | {1e3 * f:.3f} | {x:.0f} | {y:.1f} |"
                                 for b, n, r, s, c0, c, u, f, x, y in table])
    return "\n".join(f"{b:11s} {n:28s} bare {1e3 * r:7.3f} ms  scratch {1e3 * s:7.3f} ms  cold {1e3 * c0:7.2f} ms  "
                     f"case {1e3 * c:7.3f} ms  reuse {1e3 * u:7.3f} ms  fed {1e3 * f:7.3f} ms  "
                     f"case/bare {x:4.0f}×  case/scratch {y:4.1f}×" for b, n, r, s, c0, c, u, f, x, y in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(render(rows(args.repeat), args.markdown))


if __name__ == "__main__":
    main()
