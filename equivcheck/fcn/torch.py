"""PyTorch models: trace the layers, rebuild the Flatten → Linear head as convolutions.

A forward pass on zeros records every leaf module in call order with its input and output
shapes. A flatten is either an ``nn.Flatten`` or seen where a leaf reads ``(n, C·H·W)``
right after one wrote ``(n, C, H, W)`` (``torch.flatten(x, 1)`` in a ``forward``, as in
torchvision's VGG). The result is nested ``nn.Sequential`` containers mirroring the
original's module names, so its state dict has the same keys: Linear weights become ConvNd
weights (the first covering the feature map, the others 1×1) through
:func:`equivcheck.plan` from ``torch:dense`` to ``torch:conv``. An ``AdaptiveAvgPool`` that
is the identity at the training size is dropped (``nn.Identity``); one that pools evenly
becomes the fixed pool it is there; a global one (output 1) is kept.

Functional operations inside a ``forward`` that do not change shapes are invisible to the
trace; :func:`equivcheck.fcn.verify_model` is what proves the rebuilt model right.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from equivcheck.fcn.head import Activation, Affine, Dense, Head, HeadError, leaky_relu
from equivcheck.specs import CHANNELS_FIRST

__all__ = ["TorchSplit", "analyze", "convolutionalize", "is_torch_model", "split"]

_R = ("1d", "2d", "3d")
ELEMENTWISE = {"ReLU": "relu", "ReLU6": "relu6", "Tanh": "tanh", "Sigmoid": "sigmoid", "GELU": "gelu", "SiLU": "silu",
               "ELU": "elu", "LeakyReLU": None}
PASS = {"Dropout", "Identity", "AlphaDropout"}
BODY = (set(ELEMENTWISE) | PASS | {"LocalResponseNorm", "Softmax2d", "Hardtanh", "PReLU"}
        | {f"{k}{r}" for r in _R for k in ("Conv", "MaxPool", "AvgPool", "BatchNorm", "InstanceNorm", "Dropout",
                                            "AdaptiveAvgPool", "AdaptiveMaxPool", "ZeroPad", "ConstantPad",
                                            "ReflectionPad", "ReplicationPad")})
HEAD = set(ELEMENTWISE) | PASS | {"Linear", "Softmax", "BatchNorm1d"}


def is_torch_model(model: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _inference(model: Any, x: np.ndarray) -> Any:
    """``model(x)`` in eval mode without gradients, in the model's own dtype and device; training flags restored."""
    import torch

    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters(), None)
    dtype, device = (first.dtype, first.device) if first is not None else (torch.float32, "cpu")
    try:
        model.eval()
        with torch.no_grad():
            return model(torch.as_tensor(x, dtype=dtype, device=device))
    finally:
        for m, mode in modes.items():
            m.training = mode


def _kind(module: Any) -> str:
    return type(module).__name__


@dataclass
class Call:
    path: str  # dotted name in the original ("classifier.0"), "" for an inserted flatten
    module: Any
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class Analysis:
    model: Any
    input_shape: tuple[int, ...]  # per sample (C, H, W)
    body: list[Call]
    flatten_path: str  # where the Flatten sits in the rebuilt tree (dotted)
    head: list[Call]
    map_shape: tuple[int, ...]  # (C, *spatial) read by the head
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.map_shape) - 1


def _input_shape(model: Any, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise HeadError(
            f"input_shape is missing for torch model {type(model).__name__}: a torch module does not record its input size; "
            "pass input_shape=(C, H, W), e.g. (3, 224, 224)"
        )
    shape = tuple(int(s) for s in shape)
    if not 2 <= len(shape) <= 4:
        raise HeadError(f"input_shape={shape} is not (channels, *spatial) with 1 to 3 spatial axes")
    return shape


def trace(model: Any, input_shape: tuple[int, ...]) -> list[Call]:
    """Leaf modules in call order, with shapes, from one forward pass on zeros (eval mode)."""
    import torch

    for name, module in model.named_modules():
        if list(module.children()) and list(module.parameters(recurse=False)):
            raise HeadError(f"module {name or 'model'!r} ({_kind(module)}) holds parameters and submodules: "
                            "equivcheck rebuilds models from leaf modules only")
    calls: list[Call] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def hook(module: Any, args: tuple, output: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise HeadError(f"module {names[id(module)]!r} ({_kind(module)}) does not map one tensor to one tensor")
        calls.append(Call(names[id(module)], module, tuple(args[0].shape), tuple(output.shape)))

    for _, module in model.named_modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(hook))
    try:
        _inference(model, np.zeros((1, *input_shape)))
    except HeadError:
        raise
    except Exception as exc:
        raise HeadError(f"model {type(model).__name__} fails on input_shape={input_shape}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        for h in hooks:
            h.remove()
    seen: dict[str, int] = {}
    for c in calls:
        seen[c.path] = seen.get(c.path, 0) + 1
        if seen[c.path] > 1:
            raise HeadError(f"module {c.path!r} ({_kind(c.module)}) is called more than once in forward: "
                            "give each use its own module so the rebuilt model can keep the order")
    return calls


def analyze(model: Any, input_shape: tuple[int, ...] | None = None) -> Analysis:
    """Trace ``model`` and locate its flatten, checking every layer can be kept or converted."""
    import torch

    shape = _input_shape(model, input_shape)
    calls = trace(model, shape)
    if not calls:
        raise HeadError(f"model {type(model).__name__} has no layers")
    at = None
    for i, c in enumerate(calls):
        if _kind(c.module) == "Flatten":
            if at is not None:
                raise HeadError("the model flattens twice: equivcheck converts a single Flatten → Linear head")
            if (c.module.start_dim, c.module.end_dim) not in ((1, -1),):
                raise HeadError(f"Flatten {c.path!r} has start_dim={c.module.start_dim}, end_dim={c.module.end_dim}: expected 1 and -1")
            at = (i, i + 1, c.path)
        elif i and calls[i - 1].out_shape != c.in_shape:
            prev = calls[i - 1]
            if len(prev.out_shape) >= 3 and c.in_shape == (prev.out_shape[0], math.prod(prev.out_shape[1:])) and at is None:
                at = (i, i, _inserted_flatten_path(prev.path, c.path, model))
            else:
                raise HeadError(f"between {prev.path!r} and {c.path!r} the forward changes shape {prev.out_shape} → {c.in_shape} "
                                "outside any module: equivcheck can only rebuild a chain of modules (plus one flatten)")
    if at is None:
        raise HeadError(f"model {type(model).__name__} has no flatten followed by a Linear: nothing to convolutionalize")
    body, head = calls[: at[0]], calls[at[1] :]
    for c in body:
        if _kind(c.module) not in BODY:
            raise HeadError(f"module {c.path!r} ({_kind(c.module)}) before the flatten is not convolutional: a sliding window "
                            "needs a body of convolutions, pooling, activations and normalisation (no recurrent or reshaping layers)")
    for c in head:
        if _kind(c.module) not in HEAD:
            raise HeadError(f"module {c.path!r} ({_kind(c.module)}) after the flatten cannot become a convolution: expected "
                            "Linear, Dropout, Identity, an elementwise activation, Softmax or BatchNorm1d")
    if not any(_kind(c.module) == "Linear" for c in head):
        raise HeadError("the layers after the flatten hold no Linear: nothing to convolutionalize")
    map_shape = body[-1].out_shape[1:] if body else (1, *shape)
    if not body:
        raise HeadError("the model flattens its input directly: there is no convolutional body to slide")
    dtype = str(next((p.dtype for p in model.parameters()), torch.float32)).replace("torch.", "")
    return Analysis(model, shape, body, at[2], head, tuple(map_shape), dtype)


def _inserted_flatten_path(prev: str, nxt: str, model: Any) -> str:
    a, b = prev.split("."), nxt.split(".")
    common = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        common.append(x)
    names = {n for n, _ in model.named_modules()}
    leaf = "flatten"
    while ".".join([*common, leaf]) in names:
        leaf += "_"
    return ".".join([*common, leaf])


# -- the head ----------------------------------------------------------------------------
def head_of(a: Analysis) -> Head:
    from equivcheck.presets import spec

    steps: list[Any] = []
    features = a.map_shape
    seen_linear = False
    for c in a.head:
        m, kind = c.module, _kind(c.module)
        if kind in PASS:
            continue
        if kind == "Linear":
            if seen_linear:
                s = spec("torch:dense", channels=m.in_features, units=m.out_features, bias=m.bias is not None)
            else:
                s = spec("torch:dense", channels=features[0], spatial=features[1:], units=m.out_features, bias=m.bias is not None)
            if s.kernel_shape != tuple(m.weight.shape):
                raise HeadError(f"Linear {c.path!r} has weight shape={tuple(m.weight.shape)}: expected {s.kernel_shape} for the map {features}")
            bias = None if m.bias is None else m.bias.detach().cpu().numpy()
            steps.append(Dense(c.path, s, m.weight.detach().cpu().numpy(), bias))
            features, seen_linear = (m.out_features,), True
            continue
        if not seen_linear and kind in ("Softmax", "BatchNorm1d"):
            raise HeadError(f"module {c.path!r} ({kind}) between the flatten and the first Linear mixes flattened features: "
                            "a convolution cannot slide it; move it after the Linear")
        steps.append(_step(c.path, m, kind))
    return Head(a.map_shape, steps, a.dtype)


def _step(path: str, m: Any, kind: str) -> Any:
    if kind == "Softmax":
        if m.dim not in (1, -1):
            raise HeadError(f"dim={m.dim} of Softmax {path!r}: expected the units axis (1 or -1)")
        return Activation(path, "softmax")
    if kind == "BatchNorm1d":
        mean = m.running_mean.detach().double().cpu().numpy() if m.running_mean is not None else None
        if mean is None:
            raise HeadError(f"BatchNorm1d {path!r} has no running statistics: expected track_running_stats=True")
        var = m.running_var.detach().double().cpu().numpy()
        gamma = m.weight.detach().double().cpu().numpy() if m.weight is not None else np.ones_like(mean)
        beta = m.bias.detach().double().cpu().numpy() if m.bias is not None else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + m.eps)
        return Affine(path, scale, beta - mean * scale)
    if kind == "LeakyReLU":
        return Activation(path, leaky_relu(float(m.negative_slope)))
    if kind == "ELU" and float(m.alpha) != 1.0:
        raise HeadError(f"alpha={m.alpha} of ELU {path!r} is not supported: expected 1.0")
    if kind == "GELU" and m.approximate != "none":
        raise HeadError(f"approximate={m.approximate!r} of GELU {path!r} is not supported: expected 'none'")
    return Activation(path, ELEMENTWISE[kind])


# -- building ----------------------------------------------------------------------------
def _body_module(c: Call) -> Any:
    """A copy of a body module, with adaptive pools replaced by what they do at the training size."""
    from torch import nn

    kind = _kind(c.module)
    if kind.startswith("Adaptive"):
        size_in, size_out = c.in_shape[2:], c.out_shape[2:]
        if all(o == 1 for o in size_out):
            return copy.deepcopy(c.module)  # global pooling: already any-size
        if size_in == size_out:
            return nn.Identity()
        if all(i % o == 0 for i, o in zip(size_in, size_out)):
            k = tuple(i // o for i, o in zip(size_in, size_out))
            pool = getattr(nn, kind.replace("Adaptive", ""))
            return pool(k, stride=k)
        raise HeadError(f"{kind} {c.path!r} maps {size_in} to {size_out} with uneven windows at the training size: "
                        "no fixed pool slides the same way")
    return copy.deepcopy(c.module)


def _head_modules(a: Analysis, head: Head) -> list[tuple[str, Any]]:
    import torch
    from torch import nn

    from equivcheck.planning import plan
    from equivcheck.presets import spec

    conv_class = getattr(nn, f"Conv{a.rank}d")
    denses = {d.name: d for d in head.denses}
    out = []
    for c in a.head:
        kind = _kind(c.module)
        if kind == "Linear":
            d = denses[c.path]
            sp = d.spec.spatial or (1,) * a.rank
            target = spec("torch:conv", channels=d.spec.channels, kernel_size=sp, units=d.spec.units, bias=d.spec.bias)
            conv = conv_class(d.spec.channels, d.spec.units, sp, bias=d.spec.bias, device="meta")
            conv = conv.to_empty(device=c.module.weight.device).to(c.module.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(plan(d.spec, target).apply(c.module.weight.detach()))
                if d.spec.bias:
                    conv.bias.copy_(c.module.bias.detach())
            out.append((c.path, conv))
        elif kind == "Softmax":
            out.append((c.path, nn.Softmax(dim=1)))
        elif kind == "BatchNorm1d":
            m = c.module
            bn = getattr(nn, f"BatchNorm{a.rank}d")(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                                     track_running_stats=m.track_running_stats)
            bn.load_state_dict(m.state_dict())
            out.append((c.path, bn.to(device=m.running_mean.device, dtype=m.running_mean.dtype)))
        else:
            out.append((c.path, copy.deepcopy(c.module)))
    return out


def _nest(items: list[tuple[str, Any]]) -> Any:
    """Nested nn.Sequential from dotted paths in order; each container's members must be contiguous."""
    from collections import OrderedDict

    from torch import nn

    root: OrderedDict = OrderedDict()
    closed: set[tuple[str, ...]] = set()
    last: tuple[str, ...] = ()
    for path, module in items:
        parts = tuple(path.split("."))
        parents = {parts[:i] for i in range(1, len(parts))}
        for i in range(1, len(last)):
            if last[:i] not in parents:
                closed.add(last[:i])
        if parents & closed:
            raise HeadError(f"module {path!r} runs after a sibling container has finished: the call order does not follow "
                            "the module tree, so no nested Sequential reproduces it")
        node = root
        for name in parts[:-1]:
            node = node.setdefault(name, OrderedDict())
        node[parts[-1]] = module
        last = parts

    def build(node: OrderedDict) -> Any:
        return nn.Sequential(OrderedDict((k, build(v) if isinstance(v, OrderedDict) else v) for k, v in node.items()))

    return build(root)


def flexible_body(a: Analysis) -> Any:
    """The body as nested ``nn.Sequential`` taking any spatial size (eval mode)."""
    return _nest([(c.path, _body_module(c)) for c in a.body]).eval()


def convolutionalize(model: Any, input_shape: tuple[int, ...] | None = None) -> Any:
    """A new model whose flatten → Linear head is convolutions; ``model`` is left as it was.

    ``input_shape`` is one sample's (C, H, W) at the training size; it defaults to
    ``model.input_shape`` (set by :mod:`equivcheck.fcn.vgg`).
    """
    from torch import nn

    a = analyze(model, input_shape)
    head = head_of(a)
    items = [(c.path, _body_module(c)) for c in a.body]
    items.append((a.flatten_path, nn.Identity()))
    items += _head_modules(a, head)
    new = _nest(items)
    new.train(model.training)
    new.input_shape = a.input_shape
    return new


# -- verification support -----------------------------------------------------------------
@dataclass
class TorchSplit:
    analysis: Analysis
    head: Head
    framework: str = "torch"
    data_format: str = CHANNELS_FIRST

    def __post_init__(self) -> None:
        self._body = flexible_body(self.analysis)
        self._last = self.analysis.body[-1].module

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.analysis.input_shape

    @property
    def dtype(self) -> str:
        return self.analysis.dtype

    @property
    def name(self) -> str:
        return type(self.analysis.model).__name__

    def _run(self, model: Any, x: np.ndarray, capture: Any = None) -> tuple[np.ndarray, np.ndarray | None]:

        got: list[Any] = []
        hook = capture.register_forward_hook(lambda m, i, o: got.append(o.detach().clone())) if capture is not None else None
        try:
            y = _inference(model, x)
        finally:
            if hook is not None:
                hook.remove()
        return y.cpu().numpy(), (got[-1].cpu().numpy() if got else None)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._run(self.analysis.model, x)[0]

    def run_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The original's output and the feature map its head reads, from one forward pass."""
        return self._run(self.analysis.model, x, self._last)

    def body_features(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._body, x)[0]

    def run_converted(self, converted: Any, x: np.ndarray) -> np.ndarray:
        if not is_torch_model(converted):
            raise HeadError(f"converted={type(converted).__name__} is not a torch module: compare like with like")
        return self._run(converted, x)[0]

    def stride_product(self) -> tuple[int, ...]:
        total = [1] * self.analysis.rank
        for c in self.analysis.body:
            stride = getattr(c.module, "stride", None)
            if stride is None:
                continue
            stride = (stride,) * len(total) if isinstance(stride, int) else stride
            total = [t * int(s) for t, s in zip(total, stride)]
        return tuple(total)

    def padding_free(self) -> bool:
        for c in self.analysis.body:
            kind = _kind(c.module)
            if "Pad" in kind:
                return False
            pad = getattr(c.module, "padding", 0)
            if pad == "same" or (pad != "valid" and any(int(p) for p in ((pad,) if isinstance(pad, int) else pad))):
                return False
            if getattr(c.module, "ceil_mode", False):
                return False
        return True

    def describe_conversion(self) -> list[dict[str, Any]]:
        return self.head.describe("torch", self.analysis.rank)

    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(range(2, len(self.input_shape) + 1))


def split(model: Any, input_shape: tuple[int, ...] | None = None) -> TorchSplit:
    a = analyze(model, input_shape)
    return TorchSplit(a, head_of(a))
