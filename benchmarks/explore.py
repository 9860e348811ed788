"""Explorer cost: forward calls and seconds per backend pair, against a brute-force search.

Brute force is what people do by hand: try each named convention — 6 flatten orders × 2 dense
kernel orientations on the source, 24 kernel layouts × 4 flips on the target (1152 in 2-D) —
run the target once per guess, and stop at the first that agrees.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time

import numpy as np

import equivcheck as ec
from equivcheck import backends
from equivcheck.backends.numpy import forward as np_forward
from equivcheck.specs import ConvSpec, DenseSpec

PAIRS = [("onnx", "numpy", "caffe", "numpy"), ("keras", "keras", "torch", "torch"), ("torch", "torch", "keras", "keras"),
         ("keras", "keras", "theano", "scipy")]


def brute_force(src: DenseSpec, dst: ConvSpec, backend: str, seed: int = 0,
                limit: int | None = None) -> tuple[float, int, int, float]:
    """(expected forward calls to the first right guess in a random order, right guesses, all guesses,
    seconds for all of them — what the full conventions table costs by brute force)."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(src.kernel_shape)
    x = rng.standard_normal((2, src.channels, *src.spatial))
    xs = np.moveaxis(x, 1, -1) if src.data_format == "channels_last" else x
    xt = np.moveaxis(x, 1, -1) if dst.data_format == "channels_last" else x
    want = np_forward(src, kernel, None, xs).reshape(2, -1)
    layer = backends.get(backend).build(dst.replace(bias=False), "float64" if backend != "keras" else "float32")
    letters = dst.letters
    guesses = [
        (DenseSpec(src.channels, src.spatial, src.units, data_format=src.data_format, flatten="".join(f), kernel_layout=k),
         ec.ConvSpec(dst.in_channels, dst.out_channels, dst.kernel_size, kernel_layout="".join(lay),
                     data_format=dst.data_format), flips)
        for f in itertools.permutations(src.map_letters)
        for k in ("IO", "OI")
        for lay in itertools.permutations(dst.kernel_layout)
        for flips in itertools.chain.from_iterable(itertools.combinations(letters, n) for n in range(len(letters) + 1))
    ]
    start = time.perf_counter()
    hits = 0
    for guess_src, guess_dst, flips in guesses[:limit]:
        # a guess with the other dense orientation reads the stored array at that shape
        m = ec.Mapping.identity(src.kernel_shape).reshape(*guess_src.kernel_shape).then(ec.plan(guess_src, guess_dst))
        m = m.flip(*(guess_dst.kernel_layout.index(a) for a in flips))
        if m.out_shape != dst.kernel_shape:
            continue
        layer.set_weights(m.apply(kernel).astype(np.float32 if backend == "keras" else np.float64), None)
        got = np.asarray(layer(xt)).reshape(2, -1)
        hits += bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))
    n = len(guesses)
    seconds = time.perf_counter() - start
    if limit is not None:  # timed on the first `limit` guesses, extrapolated to all
        seconds *= n / min(limit, n)
        hits = 1
    return (n + 1) / (hits + 1), hits, n, seconds


def rows(quick: bool = False) -> list[tuple]:
    shape = dict(channels=8, spatial=(5, 6), units=3) if quick else dict(channels=32, spatial=(7, 7), units=64)
    out = []
    for a, ba, b, bb in PAIRS:
        if not (backends.get(ba).available() and backends.get(bb).available()):
            continue
        src, dst = ec.spec(f"{a}:dense", **shape), ec.spec(f"{b}:conv", **shape)
        ec.explore(src, dst)  # warm-up: framework imports
        start = time.perf_counter()
        result = ec.explore(src, dst)
        t_explore = time.perf_counter() - start
        expected, hits, total, t_brute = brute_force(src, dst, bb)
        out.append((f"{a}:dense ({ba}) → {b}:conv ({bb})", result.forward_calls, t_explore, expected, hits, total,
                    t_brute, t_brute / t_explore))
    if not quick and backends.get("keras").available() and backends.get("torch").available():
        fc6 = dict(channels=512, spatial=(7, 7), units=4096)
        src, dst = ec.spec("keras:dense", **fc6), ec.spec("torch:conv", **fc6)
        cold, imports = first_call_in_fresh_process(fc6)
        start = time.perf_counter()
        result = ec.explore(src, dst)
        t_explore = time.perf_counter() - start
        expected, hits, total, t_brute = brute_force(src, dst, "torch", limit=6)
        out.append((f"VGG16 fc6 keras:dense (keras) → torch:conv (torch): first call in a fresh process {cold:.2f} s "
                    f"after {imports:.2f} s of imports; brute force extrapolated from 6 guesses",
                    result.forward_calls, t_explore, expected, hits, total, t_brute, t_brute / t_explore))
    return out


def first_call_in_fresh_process(shape: dict) -> tuple[float, float]:
    """(seconds, import seconds) of ``explore`` as a new Python process sees it: no memory yet, no framework."""
    code = ("import json, equivcheck as ec; "
            f"r = ec.explore(ec.spec('keras:dense', **{shape!r}), ec.spec('torch:conv', **{shape!r})); "
            "print(json.dumps([r.found, r.seconds, sum(r.imports.values())]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found, seconds, imports = json.loads(done.stdout.strip().splitlines()[-1])
    assert found, "the fc6 exploration found no mapping"
    return seconds, imports


def render(table, markdown: bool = False) -> str:
    head = ("pair", "explore: forward calls", "explore s", "brute force: expected calls to a hit", "right guesses",
            "calls for the full table", "brute force s (full table)", "brute / explore (time)")
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|"] +
                         [f"| {p} | {c} | {t:.3f} | {e:.0f} | {h} | {n} | {bt:.2f} | {r:.0f}× |"
                          for p, c, t, e, h, n, bt, r in table])
    return "\n".join(f"{p:45s} explore {c:2d} calls {t:6.3f} s | brute ~{e:4.0f} calls to a hit ({h} right), "
                     f"{n} for the table, {bt:6.2f} s | {r:5.0f}×" for p, c, t, e, h, n, bt, r in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(render(rows(args.quick), args.markdown))


if __name__ == "__main__":
    main()
