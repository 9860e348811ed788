"""A seeded corpus of random small ports, each converted by a converter written here (independent of equivcheck).

Torch models of 1-3-D convolutions (strides, padding, depthwise, transposed), batch and layer norm,
activations as modules and as functions, a flatten of a C×H×W map with H, W > 1 and dense layers,
ported to Keras 3 (channels last: kernels transposed, the first dense kernel re-ordered for an HWC
flatten, padding as ``'same'`` or as a ZeroPadding layer) and, in float16/bfloat16, to torch
variants of themselves (``F.pad`` before padding-free convs). Every right port must not fail (no
false alarm); each planted mistake must fail with the planted layer first and the mistake named,
in at least 95 % of cases. The table and the seed are printed (visible with ``pytest -s``).
"""

from __future__ import annotations

import collections
import math
import time

import numpy as np

SEED = 20261207
PORTS = 90
MISTAKES = ("flatten order", "dense not transposed", "spatial flip", "in/out exchanged", "bias permuted",
            "BN mean/var swapped", "BN eps", "depthwise channel order", "transposed-conv flip", "pad on the wrong side")
# what the check must call each planted mistake (any of the words, in the first divergence's mistake or diagnosis)
NAMED = {"flatten order": ("flatten order",), "dense not transposed": ("not transposed", "reshape only"),
         "spatial flip": ("flip",), "in/out exchanged": ("channels permuted", "in and out", "kernel axes permuted"),
         "bias permuted": ("bias",), "BN mean/var swapped": ("mean and variance swapped",), "BN eps": ("eps differs",),
         "depthwise channel order": ("depthwise channel order",), "transposed-conv flip": ("flip",),
         "pad on the wrong side": ("pad on the wrong side",)}


# -- random architectures ------------------------------------------------------------------------
def _architecture(rng: np.random.Generator) -> dict:
    """A small random CNN as a list of ops, and its input shape (N, C, *spatial); None where a map gets too small."""
    rank = int(rng.choice([1, 2, 2, 2, 3]))
    size = {1: (10, 14), 2: (6, 10), 3: (4, 6)}[rank]
    spatial = tuple(int(rng.integers(*size)) for _ in range(rank))
    channels = int(rng.integers(2, 4))
    shape = (2, channels, *spatial)
    ops, c = [], channels
    for b in range(int(rng.integers(1, 3))):
        roll = rng.random()
        kind = "depthwise" if rank < 3 and roll < 0.25 else "tconv" if rank == 2 and b == 0 and roll > 0.8 else "conv"
        k = int(rng.choice([2, 3])) if kind == "tconv" else int(rng.choice([1, 2, 3]))
        stride = int(rng.choice([1, 1, 2]))
        pad = 0 if kind == "tconv" else int(rng.integers(0, k // 2 + 1))
        out = c * int(rng.choice([1, 2])) if kind == "depthwise" else int(rng.choice([c, 3, 4]))
        new = tuple((n - 1) * stride + k if kind == "tconv" else (n + 2 * pad - k) // stride + 1 for n in spatial)
        if min(new) < 2:
            return None
        ops.append({"op": kind, "cin": c, "cout": out, "k": k, "stride": stride, "pad": pad, "rank": rank,
                    "pad_layer": bool(pad) and (stride > 1 or 2 * pad != k - 1 or rng.random() < 0.5)})
        c, spatial = out, new
        if rng.random() < 0.45:
            ops.append({"op": "bn", "c": c, "rank": rank})
        ops.append({"op": "relu", "functional": bool(rng.random() < 0.5)})
    ops.append({"op": "flatten", "c": c, "spatial": spatial})
    hidden = int(rng.integers(4, 9))
    ops.append({"op": "dense", "cin": c * math.prod(spatial), "cout": hidden, "first": True})
    if rng.random() < 0.35:
        ops.append({"op": "ln", "c": hidden})
    ops.append({"op": "relu", "functional": bool(rng.random() < 0.5)})
    ops.append({"op": "dense", "cin": hidden, "cout": int(rng.integers(2, 5)), "first": False})
    return {"ops": ops, "input": shape}


def _random_architecture(rng: np.random.Generator, *, half: bool = False) -> dict:
    while (arch := _architecture(rng)) is None or (half and (len(arch["input"]) > 4 or
                                                              any(o["op"] == "tconv" for o in arch["ops"]))):
        pass
    return arch


# -- torch models -----------------------------------------------------------------------------------
def _torch_model(torch, arch: dict, rng: np.random.Generator, *, pads: str = ""):
    """The torch model; ``pads="functional"`` pads with F.pad before a padding-free conv (``"wrong"``: on one side)."""
    nn = torch.nn
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    layers = nn.ModuleList()
    plan = []
    for o in arch["ops"]:
        if o["op"] in ("conv", "depthwise"):
            groups = o["cin"] if o["op"] == "depthwise" else 1
            pad = o["pad"] if not pads else 0
            if pads and o["pad"]:
                wrong = pads == "wrong" and o.get("site")
                plan.append(("pad", (0, 2 * o["pad"]) * o["rank"] if wrong else (o["pad"],) * (2 * o["rank"])))
            layers.append(conv[o["rank"]](o["cin"], o["cout"], o["k"], stride=o["stride"], padding=pad, groups=groups))
        elif o["op"] == "tconv":
            layers.append(tconv[o["rank"]](o["cin"], o["cout"], o["k"], stride=o["stride"]))
        elif o["op"] == "bn":
            m = bn[o["rank"]](o["c"])
            with torch.no_grad():
                m.running_mean.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, o["c"]).astype(np.float32)))
                m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, o["c"]).astype(np.float32)))
                m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, o["c"]).astype(np.float32)))
                m.bias.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, o["c"]).astype(np.float32)))
            layers.append(m)
        elif o["op"] == "dense":
            layers.append(nn.Linear(o["cin"], o["cout"]))
        elif o["op"] == "ln":
            layers.append(nn.LayerNorm(o["c"]))
        elif o["op"] == "relu" and not o["functional"]:
            layers.append(nn.ReLU())
        else:
            plan.append((o["op"], None))
            continue
        plan.append((o["op"], len(layers) - 1))
    with torch.no_grad():  # weights drawn from the corpus seed
        for m in layers:
            for p in m.parameters(recurse=False):
                if m.__class__.__name__.startswith(("Conv", "Linear")):
                    p.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, tuple(p.shape)).astype(np.float32)))

    class Port(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, x):
            for op, i in plan:
                if op == "pad":
                    x = torch.nn.functional.pad(x, i)
                elif i is not None:
                    x = self.layers[i](x)
                elif op == "relu":
                    x = torch.relu(x)
                elif op == "flatten":
                    x = torch.flatten(x, 1)
            return x

    model = Port().eval()
    return model, plan


# -- the independent converter: torch → Keras 3 (channels last) --------------------------------------
def _to_keras(keras, arch: dict, model, plan, mistake: str | None, rng: np.random.Generator):
    """Build the Keras model and copy every weight; ``mistake`` plants one error. Returns (model, planted layer)."""
    L = keras.layers
    ops = arch["ops"]
    shape = arch["input"]
    len(shape) - 2
    inp = keras.Input((*shape[2:], shape[1]))
    x = inp
    weights, planted = {}, None
    target = _mistake_site(ops, mistake, rng)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for n, (o, (op, index)) in enumerate(zip(ops, plan)):
        name = f"l{n}"
        key = f"layers.{index}." if index is not None else ""
        here = n == target
        if op in ("conv", "depthwise", "tconv"):
            r = o["rank"]
            w, b = state[key + "weight"], state[key + "bias"]
            spatial_axes = tuple(range(2, 2 + r))
            if here and mistake in ("spatial flip", "transposed-conv flip"):
                w = np.flip(w, spatial_axes).copy()
            if here and mistake == "bias permuted":
                b = b[::-1].copy()
            pad = o["pad"]
            if pad and (o["pad_layer"] or (here and mistake == "pad on the wrong side")):
                pads = ((0, 2 * pad),) * r if here and mistake == "pad on the wrong side" else ((pad, pad),) * r
                x = {1: L.ZeroPadding1D, 2: L.ZeroPadding2D, 3: L.ZeroPadding3D}[r](pads[0] if r == 1 else pads)(x)
                padding = "valid"
            elif pad:
                padding = "same"  # stride 1 and an odd kernel: 'same' pads (k - 1) / 2 on each side
            else:
                padding = "valid"
            if op == "conv":
                kernel = w.transpose(*spatial_axes, 1, 0)  # (O, I, *k) → (*k, I, O)
                if here and mistake == "in/out exchanged":
                    kernel = w.transpose(*spatial_axes, 0, 1)
                layer = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[r](o["cout"], o["k"], strides=o["stride"],
                                                                       padding=padding, name=name)
                x = layer(x)
                weights[name] = [kernel, b]
            elif op == "depthwise":
                c, mult = o["cin"], o["cout"] // o["cin"]
                k = w.reshape(c, mult, *w.shape[2:])  # (C·M, 1, *k): channel c·M + m
                if here and mistake == "depthwise channel order":
                    k = w.reshape(mult, c, *w.shape[2:]).swapaxes(0, 1)
                kernel = k.transpose(*spatial_axes, 0, 1)  # (*k, C, M)
                layer = {1: L.DepthwiseConv1D, 2: L.DepthwiseConv2D}[r](o["k"], strides=o["stride"], padding=padding,
                                                                        depth_multiplier=mult, name=name)
                x = layer(x)
                weights[name] = [kernel, b]
            else:  # transposed: torch (I, O, *k) → Keras (*k, O, I), no flip
                kernel = w.transpose(*spatial_axes, 1, 0)
                layer = {1: L.Conv1DTranspose, 2: L.Conv2DTranspose, 3: L.Conv3DTranspose}[r](
                    o["cout"], o["k"], strides=o["stride"], padding="valid", name=name)
                x = layer(x)
                weights[name] = [kernel, b]
        elif op == "bn":
            g, b, m, v = (state[key + s] for s in ("weight", "bias", "running_mean", "running_var"))
            if here and mistake == "BN mean/var swapped":
                m, v = v, m
            eps = 1e-3 if here and mistake == "BN eps" else 1e-5
            x = L.BatchNormalization(epsilon=eps, momentum=0.9, name=name)(x)
            weights[name] = [g, b, m, v]
        elif op == "relu":
            x = L.ReLU(name=name)(x)
        elif op == "flatten":
            x = L.Flatten(name=name)(x)
        elif op == "dense":
            w, b = state[key + "weight"], state[key + "bias"]
            if o["first"]:
                flat = ops[n - 1]
                c, spatial = flat["c"], flat["spatial"]
                if here and mistake == "flatten order":
                    kernel = w.T  # read as if Keras flattened CHW
                else:
                    kernel = w.reshape(-1, c, *spatial).transpose(*range(2, 2 + len(spatial)), 1, 0).reshape(-1, w.shape[0])
            else:
                kernel = w.reshape(w.shape[1], w.shape[0]) if here and mistake == "dense not transposed" else w.T
            if here and mistake == "bias permuted":
                b = b[::-1].copy()
            x = L.Dense(o["cout"], name=name)(x)
            weights[name] = [kernel, b]
        elif op == "ln":
            x = L.LayerNormalization(epsilon=1e-5, name=name)(x)
            weights[name] = [state[key + "weight"], state[key + "bias"]]
        if here:
            planted = name
    out = keras.Model(inp, x)
    for name, values in weights.items():
        out.get_layer(name).set_weights([np.asarray(v, np.float32) for v in values])
    return out, planted


def _mistake_site(ops: list, mistake: str | None, rng: np.random.Generator) -> int | None:
    """The index of the op the mistake is planted in (None: the port is right)."""
    if mistake is None:
        return None
    fits = {
        "flatten order": lambda o: o["op"] == "dense" and o["first"],
        "dense not transposed": lambda o: o["op"] == "dense" and not o["first"] and o["cin"] != o["cout"],
        "spatial flip": lambda o: o["op"] == "conv" and o["k"] > 1,
        "in/out exchanged": lambda o: o["op"] == "conv" and o["cin"] == o["cout"] and o["cin"] > 1,
        "bias permuted": lambda o: o["op"] in ("conv", "dense"),
        "BN mean/var swapped": lambda o: o["op"] == "bn",
        "BN eps": lambda o: o["op"] == "bn",
        "depthwise channel order": lambda o: o["op"] == "depthwise" and o["cout"] > o["cin"],
        "transposed-conv flip": lambda o: o["op"] == "tconv",
        "pad on the wrong side": lambda o: o["op"] in ("conv", "depthwise") and o["pad"] > 0,
    }[mistake]
    sites = [i for i, o in enumerate(ops) if fits(o)]
    return int(rng.choice(sites)) if sites else -1


# -- the independent converter: torch → torch in float16/bfloat16 (F.pad before padding-free convs) --------
HALF = (("float16", 6), ("bfloat16", 6))
HALF_MISTAKES = ("spatial flip", "bias permuted", "BN mean/var swapped", "pad on the wrong side", "in/out exchanged",
                 "depthwise channel order")


def _layer_index(ops: list, n: int) -> int:
    """The index in ``layers`` of op ``n``'s module."""
    return sum(1 for o in ops[:n] if o["op"] not in ("flatten", "relu") or (o["op"] == "relu" and not o["functional"]))


def _to_torch(torch, arch: dict, model, mistake: str | None, rng: np.random.Generator):
    target = _mistake_site(arch["ops"], mistake, rng)
    ops = [dict(o, site=i == target) for i, o in enumerate(arch["ops"])]
    port, _ = _torch_model(torch, {"ops": ops, "input": arch["input"]}, rng,
                           pads="wrong" if mistake == "pad on the wrong side" else "functional")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    planted = None
    if target is not None:
        o, key = ops[target], f"layers.{_layer_index(ops, target)}."
        planted = key[:-1]
        w = state.get(key + "weight")
        if mistake == "spatial flip":
            state[key + "weight"] = np.flip(w, tuple(range(2, w.ndim))).copy()
        elif mistake == "bias permuted":
            state[key + "bias"] = state[key + "bias"][::-1].copy()
        elif mistake == "BN mean/var swapped":
            state[key + "running_mean"], state[key + "running_var"] = state[key + "running_var"], state[key + "running_mean"]
        elif mistake == "in/out exchanged":
            state[key + "weight"] = w.swapaxes(0, 1).copy()
        elif mistake == "depthwise channel order":
            c, mult = o["cin"], o["cout"] // o["cin"]
            state[key + "weight"] = w.reshape(c, mult, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape).copy()
    port.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return port.eval(), planted


# -- the corpus ---------------------------------------------------------------------------------------
def _named(result, layer: str, mistake: str) -> bool:
    first = result.first_divergence
    if result.verdict != "fail" or first is None:
        return False
    said = f"{first.mistake} {first.diagnosis}".lower()
    return first.converted == layer and any(w.lower() in said for w in NAMED[mistake])


def test_corpus_of_random_ports(torch, keras, capsys):
    import equivcheck as ec

    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    rows = collections.defaultdict(lambda: [0, 0, 0])  # mistake -> [planted, named, fail elsewhere/other]
    false_alarms, inconclusive, misnamed = [], [], []
    ports = 0
    queue = [m for _ in range(3) for m in MISTAKES]
    while ports < PORTS:
        arch = _random_architecture(rng)
        model, plan = _torch_model(torch, arch, rng)
        right, _ = _to_keras(keras, arch, model, plan, None, rng)
        result = ec.check_models(model, right, input_shape=arch["input"])
        ports += 1
        if result.verdict == "fail":
            false_alarms.append((ports, result.render()))
        elif result.verdict == "inconclusive":
            inconclusive.append((ports, result.reason))
        # plant the next mistake of the queue this architecture has a site for
        for i, mistake in enumerate(queue):
            if _mistake_site(arch["ops"], mistake, np.random.default_rng(0)) in (None, -1):
                continue
            wrong, layer = _to_keras(keras, arch, model, plan, mistake, rng)
            found = ec.check_models(model, wrong, input_shape=arch["input"])
            rows[mistake][0] += 1
            if _named(found, layer, mistake):
                rows[mistake][1] += 1
            else:
                misnamed.append((mistake, layer, found.reason[:300]))
            del queue[i]
            break
    half_rows = []
    for dtype, count in HALF:
        for j in range(count):
            arch = _random_architecture(rng, half=True)
            model, _ = _torch_model(torch, arch, rng)
            right, _ = _to_torch(torch, arch, model, None, rng)
            result = ec.check_models(model, right, input_shape=arch["input"], dtypes=(dtype,))
            ports += 1
            if result.verdict == "fail":
                false_alarms.append((ports, result.render()))
            elif result.verdict == "inconclusive":
                inconclusive.append((ports, result.reason))
            for mistake in HALF_MISTAKES[j % len(HALF_MISTAKES):] + HALF_MISTAKES[:j % len(HALF_MISTAKES)]:
                if _mistake_site(arch["ops"], mistake, np.random.default_rng(0)) in (None, -1):
                    continue
                wrong, layer = _to_torch(torch, arch, model, mistake, rng)
                found = ec.check_models(model, wrong, input_shape=arch["input"], dtypes=(dtype,))
                rows[mistake][0] += 1
                rows[mistake][1] += _named(found, layer, mistake)
                half_rows.append((dtype, mistake, _named(found, layer, mistake)))
                if not _named(found, layer, mistake):
                    misnamed.append((dtype, mistake, layer, found.reason[:300]))
                break
    planted = sum(r[0] for r in rows.values())
    named = sum(r[1] for r in rows.values())
    took = time.perf_counter() - started
    with capsys.disabled():
        print(f"\ncorpus seed {SEED}: {ports} right ports ({PORTS} torch → Keras 3 in float32, "
              f"{sum(n for _, n in HALF)} torch → torch in float16/bfloat16), {len(false_alarms)} false alarms, "
              f"{len(inconclusive)} inconclusive; {planted} planted mistakes, {named} named at their layer "
              f"({100 * named / max(planted, 1):.1f}%) in {took:.1f} s")
        print(f"{'planted mistake':26} {'planted':>8} {'named':>6}")
        for mistake in MISTAKES:
            p, n, _ = rows[mistake]
            print(f"{mistake:26} {p:8d} {n:6d}")
        for m in misnamed:
            print("  not named:", m)
        for i, why in inconclusive[:5]:
            print(f"  inconclusive port {i}: {why[:200]}")
    assert not false_alarms, false_alarms[0][1]
    assert planted >= 2 * len(MISTAKES) and all(rows[m][0] for m in MISTAKES), dict(rows)
    assert named >= 0.95 * planted, misnamed
