"""The docs/presets.md section on recurrent and attention layers, generated from the specs themselves."""

from __future__ import annotations

from equivcheck.sequence.named import plan, tensor_shapes
from equivcheck.sequence.presets import ATTENTION, BACKENDS, RECURRENT, spec
from equivcheck.sequence.specs import SequenceSpec

__all__ = ["markdown"]


def markdown() -> list[str]:
    """The section's lines (layouts from the specs themselves)."""
    def shapes(s: SequenceSpec) -> str:
        return ", ".join(f"`{k}` {tuple(v)}" for k, v in tensor_shapes(s).items())

    lines = [
        "", "## Recurrent and attention layers", "",
        "Weights are named tensors: a dict keyed by the framework's own parameter names (Keras: the variable",
        "path's last parts). Shapes below for `input_size=3, units=4` and `embed_dim=8, heads=2`; gate letters",
        "as each framework names them. `equivcheck.plan` gives one mapping per target tensor. The conventions",
        "are pinned by `tests/sequence/test_layers.py` on torch, Keras 3, Flax linen and ONNX Runtime; the GPT-2",
        "and GPT-NeoX checkpoint layouts run on the numpy reference, checked against transcriptions of their",
        "models' attention code.", "",
        "| preset | parameters | gates | reset gate | bias | runs on |", "|---|---|---|---|---|---|",
    ]
    for storage, cell in RECURRENT:
        s = spec(f"{storage}:{cell}", input_size=3, units=4)
        reset = ("after" if s.reset_after else "before") + (" (`reset_after=`)" if storage == "keras" else
                                                            " (`linear_before_reset=`)" if storage == "onnx" else "")
        lines.append(f"| `{s.name}` | {shapes(s)} | {s.gate_labels()} | {reset if cell == 'gru' else '—'} | "
                     f"{'summed' if s.summed_bias else 'input + recurrent'} | {BACKENDS[storage]} |")
    for storage in ATTENTION:
        s = spec(f"{storage}:mha", embed_dim=8, heads=2)
        lines.append(f"| `{s.name}` | {shapes(s)} | — | — | — | {BACKENDS[storage]} |")
    lines += ["", "Bidirectional layers (`bidirectional=True`): torch adds `*_reverse`, Keras prefixes `forward/` and",
              "`backward/`, ONNX stacks both directions on the first axis.", "", "```bash",
              "equivcheck plan --from torch:lstm --to onnx:lstm --input-size 32 --units 64", "```", "", "```text"]
    lines += plan(spec("torch:lstm", input_size=32, units=64), spec("onnx:lstm", input_size=32, units=64)).code().splitlines()
    lines += ["```"]
    return lines
