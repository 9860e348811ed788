"""Find the gate order (and a GRU's reset placement) of a black-box recurrent layer.

The black box is a function ``layer(weights, x) -> outputs`` taking weights under a spec's
parameter names and shapes. One forward call on drawn weights and inputs is compared with the
reference under every candidate convention (every order of the gates; for a GRU whose storage
allows it, both reset placements): the one that agrees within the bound, alone, is the answer.
Attention layers: :mod:`equivcheck.sequence.head_layout`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.errors import NoMapping, SpecError
from equivcheck.sequence import reference
from equivcheck.sequence.backends import backend_of
from equivcheck.sequence.named import tensor_shapes
from equivcheck.sequence.specs import GATES, RecurrentSpec
from equivcheck.sequence.verify import draw, tolerance

__all__ = ["RecurrentBlackBox", "SequenceExploration", "explore_recurrent", "find_gate_order", "is_recurrent_object"]


def find_gate_order(layer: Callable[[dict[str, np.ndarray], np.ndarray], Any], spec: RecurrentSpec, *,
                    dtype: str = "float32", seed: int = 0) -> RecurrentSpec:
    """``spec`` with the gate order (and reset placement) that ``layer`` computes; one forward call.

    Raises :class:`NoMapping` when no candidate, or more than one, explains the outputs.
    """
    if not isinstance(spec, RecurrentSpec):
        raise SpecError(f"spec={spec!r} is not a RecurrentSpec: only recurrent layers have gates")
    weights, x = draw(spec, seed=seed, steps=5)
    weights = {k: v.astype(dtype).astype(np.float64) for k, v in weights.items()}
    x = x.astype(dtype).astype(np.float64)
    got = np.asarray(layer({k: v.astype(dtype) for k, v in weights.items()}, x.astype(dtype)), dtype=np.float64)
    candidates = [spec.replace(gate_order="".join(p)) for p in itertools.permutations(GATES[spec.cell])]
    if spec.cell == "gru" and not spec.summed_bias:
        flipped = [c.replace(reset_after=not c.reset_after) for c in candidates]
        candidates += [c for c in flipped if tensor_shapes(c) == tensor_shapes(spec)]
    bound = 2 * tolerance(spec, weights, x, dtype)
    errors = sorted((float(np.abs(reference.forward(c, weights, x) - got).max()), i) for i, c in enumerate(candidates))
    (best, i), (second, _) = errors[0], errors[1] if len(errors) > 1 else (np.inf, -1)
    if best > bound:
        raise NoMapping(f"no gate order of {spec.describe()} explains the layer: the closest is {best:.3g} away (bound {bound:.3g})")
    if second <= 4 * bound:
        raise NoMapping(f"the drawn data cannot tell gate orders of {spec.describe()} apart ({best:.3g} vs {second:.3g})")
    return candidates[i]


# -- black boxes and explore ------------------------------------------------------------------
@dataclass(frozen=True)
class RecurrentBlackBox:
    """A recurrent layer known only by calling it: ``layer(weights, x) -> outputs`` with ``weights`` keyed and
    shaped as ``spec``'s (its gate order, the unknown, is ignored) and ``x`` (batch, time, input_size)."""

    layer: Callable[[dict[str, np.ndarray], np.ndarray], Any]
    spec: RecurrentSpec


_TORCH_CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
_KERAS_CELLS = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "rnn"}


def is_recurrent_object(obj: Any) -> bool:
    """Whether ``obj`` is something :func:`explore_recurrent` takes: a recurrent spec, preset name, torch
    ``nn.LSTM``/``GRU``/``RNN``, Keras ``LSTM``/``GRU``/``SimpleRNN`` layer or a :class:`RecurrentBlackBox`."""
    from equivcheck.sequence.presets import is_sequence_name

    if isinstance(obj, (RecurrentSpec, RecurrentBlackBox)):
        return True
    if isinstance(obj, str):
        return is_sequence_name(obj) and not obj.endswith(":mha")
    kind = type(obj)
    if kind.__module__.startswith("torch.nn") and kind.__name__ in _TORCH_CELLS:
        return True
    return kind.__module__.startswith("keras") and kind.__name__ in _KERAS_CELLS


def _torch_box(module: Any) -> RecurrentBlackBox:
    import torch
    from torch.func import functional_call

    from equivcheck.sequence.presets import spec as preset

    if module.num_layers != 1 or getattr(module, "proj_size", 0) or not module.bias:
        raise SpecError(f"torch {type(module).__name__} with num_layers={module.num_layers}: explore takes one layer "
                        "with biases and no projection (num_layers=1, bias=True, proj_size=0)")
    if type(module).__name__ == "RNN" and module.nonlinearity != "tanh":
        raise SpecError(f"torch RNN nonlinearity={module.nonlinearity!r}: expected 'tanh'")
    cell = _TORCH_CELLS[type(module).__name__]
    spec = preset(f"torch:{cell}", input_size=module.input_size, units=module.hidden_size,
                  bidirectional=module.bidirectional)
    dtype = next(module.parameters()).dtype

    def layer(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        params = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)).to(dtype) for k, v in weights.items()}
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(dtype)
        with torch.no_grad():
            out = functional_call(module, params, (xt if module.batch_first else xt.transpose(0, 1),))[0]
        out = out if module.batch_first else out.transpose(0, 1)
        return out.double().numpy()

    return RecurrentBlackBox(layer, spec.replace(name=f"torch {type(module).__name__}"))


def _keras_box(keras_layer: Any) -> RecurrentBlackBox:
    from equivcheck.sequence.presets import spec as preset

    cell = _KERAS_CELLS[type(keras_layer).__name__]
    if not keras_layer.built:
        raise SpecError(f"Keras {type(keras_layer).__name__} is not built: call it once on an input (batch, time, features)")
    kernel = next(v for v in keras_layer.weights if v.path.split("/")[-1] == "kernel")
    extra = {"reset_after": bool(keras_layer.reset_after)} if cell == "gru" else {}
    spec = preset(f"keras:{cell}", input_size=int(kernel.shape[0]), units=int(keras_layer.units), **extra)
    if not keras_layer.return_sequences:
        raise SpecError(f"Keras {type(keras_layer).__name__} has return_sequences=False: explore reads every step's output")

    def layer(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        named = {v.path.split("/")[-1]: v for v in keras_layer.weights}
        saved = {k: np.asarray(v.numpy()) for k, v in named.items()}
        try:
            for k, value in weights.items():
                named[k].assign(np.asarray(value, dtype=np.float32))
            return np.asarray(keras_layer(np.asarray(x, dtype=np.float32)), dtype=np.float64)
        finally:
            for k, value in saved.items():
                named[k].assign(value)

    return RecurrentBlackBox(layer, spec.replace(name=f"Keras {type(keras_layer).__name__}"))


def _box(obj: Any, other: RecurrentSpec | None) -> RecurrentBlackBox:
    """A black box of ``obj``; a preset name borrows the other side's sizes and runs on its framework."""
    from equivcheck.sequence.backends import run
    from equivcheck.sequence.presets import spec as preset

    if isinstance(obj, RecurrentBlackBox):
        return obj
    if isinstance(obj, str):
        if other is None:
            raise SpecError(f"{obj!r} has no sizes: pass a layer on the other side, or a spec")
        extra = {"reset_after": other.reset_after} if obj in ("keras:gru", "onnx:gru") else {}
        obj = preset(obj, input_size=other.input_size, units=other.units, bidirectional=other.bidirectional, **extra)
    if isinstance(obj, RecurrentSpec):
        layer_spec = obj
        return RecurrentBlackBox(lambda w, x: run(backend_of(layer_spec), layer_spec, w, x), layer_spec)
    if type(obj).__module__.startswith("torch"):
        return _torch_box(obj)
    return _keras_box(obj)


@dataclass
class SequenceExploration:
    """What probing found: each side's gate order (and GRU reset placement), and the plan between them."""

    found: bool
    reason: str
    source: RecurrentSpec | None
    target: RecurrentSpec | None
    code: dict[str, str]
    forward_calls: int
    seconds: float = 0.0
    imports: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def side(s: RecurrentSpec | None) -> dict[str, Any] | None:
            return None if s is None else {"layer": s.describe(), "kind": f"{s.cell}, gates {s.gate_labels()}", "cell": s.cell,
                                           "storage": s.storage, "gate_order": s.gate_labels(), "reset_after": s.reset_after}

        return {"found": self.found, "reason": self.reason, "source": side(self.source), "target": side(self.target),
                "code": dict(self.code), "forward_calls": self.forward_calls, "seconds": self.seconds}

    def render(self) -> str:
        lines = []
        for role, s in (("source", self.source), ("target", self.target)):
            if s is not None:
                reset = f", reset gate {'after' if s.reset_after else 'before'} the recurrent matmul" if s.cell == "gru" else ""
                lines.append(f"{role:7s} {s.name}: {s.cell.upper()} gate order {s.gate_labels()}{reset}")
        if self.found:
            lines += ["mapping (numpy):", *(f"  {line}" for line in self.code.get("numpy", "").splitlines())]
        else:
            lines.append(f"not found: {self.reason}")
        lines.append(f"{self.forward_calls} forward calls")
        return "\n".join(lines)


def explore_recurrent(source: Any, target: Any = None, *, seed: int = 0) -> SequenceExploration:
    """The gate order of each recurrent black box, found by probing, and the plan from ``source`` to ``target``.

    Each side: a torch ``nn.LSTM``/``GRU``/``RNN``, a built Keras ``LSTM``/``GRU``/``SimpleRNN`` (return_sequences),
    a :class:`RecurrentBlackBox`, a spec or a preset name (sized like the other side). ``target=None``: the
    source's own framework's layer. One forward call per side.
    """
    from equivcheck.errors import NoMapping
    from equivcheck.sequence.named import plan

    calls = [0]

    def counted(box: RecurrentBlackBox) -> Callable[[dict[str, np.ndarray], np.ndarray], Any]:
        def layer(w: dict[str, np.ndarray], x: np.ndarray) -> Any:
            calls[0] += 1
            return box.layer(w, x)

        return layer

    named_first = isinstance(source, str)
    first = _box(target if named_first else source, None)
    second = _box(source if named_first else target, first.spec) if target is not None else None
    boxes = (second, first) if named_first else (first, second)
    found: list[RecurrentSpec | None] = []
    try:
        for box in boxes:
            found.append(None if box is None else find_gate_order(counted(box), box.spec, seed=seed).replace(name=box.spec.name))
    except NoMapping as exc:
        return SequenceExploration(False, str(exc), *[*found, None, None][:2], {}, calls[0])
    src, dst = found
    if dst is None:
        from equivcheck.sequence.presets import spec as preset

        extra = {"reset_after": src.reset_after} if src.cell == "gru" and src.storage in ("keras", "onnx") else {}
        dst = preset(f"{src.storage}:{src.cell}", input_size=src.input_size, units=src.units,
                     bidirectional=src.bidirectional, **extra)
    try:
        mapping = plan(src, dst)
    except NoMapping as exc:
        return SequenceExploration(False, str(exc), src, dst, {}, calls[0])
    return SequenceExploration(True, "", src, dst, {lang: mapping.code(lang) for lang in ("numpy", "torch")}, calls[0])
