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
              "`backward/`, ONNX stacks both directions on the first axis, TFLite prefixes `fw_` and `bw_`.", "",
              "TFLite: the names are the inputs of its fused `UNIDIRECTIONAL_SEQUENCE_LSTM` and",
              "`UNIDIRECTIONAL_SEQUENCE_RNN` ops (what the converter writes for a Keras 2 LSTM; the layer is written",
              "straight from TFLite's schema and run on its interpreter, float32 only: the kernels refuse float16 and",
              "bfloat16). There is no `tflite:gru`: TFLite's runtime has no fused GRU op, the converter lowers a GRU to a",
              "`WHILE` loop of builtin ops whose weights are unnamed constants.", "", "```bash",
              "equivcheck plan --from torch:lstm --to onnx:lstm --input-size 32 --units 64", "```", "", "```text"]
    lines += plan(spec("torch:lstm", input_size=32, units=64), spec("onnx:lstm", input_size=32, units=64)).code().splitlines()
    lines += ["```", *USAGE.splitlines()]
    return lines


#: The subsection after the plan example: verify_pair, check_converter and explore on these layers (run by tests/test_docs.py).
USAGE = """
### Verify, check and explore these layers

`ec.verify_pair`, `ec.check_converter` and `ec.explore` take recurrent and attention layers as they
take dense and conv ones. Each layer runs on the framework in the table's last column, and a `pass`
also needs every plausible mistake (gate order, reset placement, biases, kernel orientation, q/k/v
order, stacked vs interleaved heads, heads vs head_dim) rejected on the same data:

```python
>>> import equivcheck as ec
>>> torch_mha, gpt2_mha = ec.spec("torch:mha", embed_dim=8, heads=2), ec.spec("gpt2:mha", embed_dim=8, heads=2)
>>> case = ec.verify_pair(torch_mha, gpt2_mha, source_backend="torch", target_backend="numpy")
>>> case.verdict, all(m.outcome == "rejected" for m in case.mutations)
('pass', True)
```

`check_converter` runs your own converter, which takes and returns dicts of named tensors. It names
the mistake behind a wrong one:

```python
>>> def to_gpt2(w):
...     return {"c_attn.weight": w["in_proj_weight"].T, "c_attn.bias": w["in_proj_bias"],
...             "c_proj.weight": w["out_proj.weight"].T, "c_proj.bias": w["out_proj.bias"]}
>>> [c.verdict for c in ec.check_converter(to_gpt2, "torch:mha", "gpt2:mha", embed_dim=8, heads=2)]
['pass']
>>> def forgot_a_transpose(w):
...     return {**to_gpt2(w), "c_proj.weight": w["out_proj.weight"]}
>>> try:
...     ec.check_converter(forgot_a_transpose, "torch:mha", "gpt2:mha", embed_dim=8, heads=2)
... except ec.ConversionCheckFailed as exc:
...     print(exc.case.diagnosis["description"])
output projection not transposed: its (E, heads·head_dim) memory read as (heads·head_dim, E)
```

`explore` probes a layer it is handed and needs one forward call per side. For a recurrent layer it
finds the gate order (and where a GRU applies its reset gate). For an attention layer it finds the
q/k/v order, stacked vs per-head interleaved rows, the heads vs head_dim split, the heads count and
the output kernel's orientation. Either side can be a torch module, a built Keras layer, a
`RecurrentBlackBox`/`AttentionBlackBox` (a function taking the weights under a spec's names) or a
preset name, which takes the other side's sizes. `None` as the target converts to the source's
own preset:

```python
>>> import torch
>>> print(ec.explore(torch.nn.MultiheadAttention(8, 2, batch_first=True), "gpt2:mha").render())
source  torch MultiheadAttention: attention, 2 heads of 4: in_proj_weight rows (q;k;v, heads, head_dim), out_proj.weight (out, in) (the layout of torch:mha)
target  gpt2:mha: attention, 2 heads of 4: c_attn.weight columns (q;k;v, heads, head_dim), c_proj.weight (in, out) (the layout of gpt2:mha)
mapping (numpy):
  out['c_attn.weight'] = w['in_proj_weight'].T
  out['c_proj.weight'] = w['out_proj.weight'].T
  out['c_attn.bias'] = w['in_proj_bias']
  out['c_proj.bias'] = w['out_proj.bias']
2 forward calls
>>> from equivcheck.sequence.backends import run
>>> from equivcheck.sequence.head_layout import AttentionBlackBox
>>> neox_names = {"in_proj_weight": "query_key_value.weight", "in_proj_bias": "query_key_value.bias",
...               "out_proj.weight": "dense.weight", "out_proj.bias": "dense.bias"}
>>> def mystery(w, q, k, v):  # torch's names, read with GPT-NeoX's rows (heads, q;k;v, head_dim)
...     neox = {neox_names[name]: value for name, value in w.items()}
...     return run("numpy", ec.spec("neox:mha", embed_dim=8, heads=2), neox, (q, k, v))
>>> print(ec.explore(AttentionBlackBox(mystery, torch_mha), None).render())
source  torch:mha: attention, 2 heads of 4: in_proj_weight rows (heads, q;k;v, head_dim), out_proj.weight (out, in) (the layout of neox:mha...)
target  torch:mha: attention, 2 heads of 4: in_proj_weight rows (q;k;v, heads, head_dim), out_proj.weight (out, in) (the layout of torch:mha)
mapping (numpy):
  out['in_proj_weight'] = w['in_proj_weight'].reshape(2, 3, 4, 8).transpose(1, 0, 2, 3).reshape(24, 8)
  out['out_proj.weight'] = w['out_proj.weight']
  out['in_proj_bias'] = w['in_proj_bias'].reshape(2, 3, 4).transpose(1, 0, 2).reshape(24)
  out['out_proj.bias'] = w['out_proj.bias']
1 forward calls
>>> print(ec.explore(torch.nn.GRU(3, 4, batch_first=True), None).render().splitlines()[0])
source  torch GRU: GRU gate order r,z,n, reset gate after the recurrent matmul
```
"""
