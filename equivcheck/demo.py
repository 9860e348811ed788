"""``equivcheck demo``: the motivating case end to end.

1. The plan for a Flatten → Dense(4096) on a 512×7×7 map, from every preset's dense layer to
   every preset's full-map conv, with its numpy code — each checked on the numpy reference
   at a small shape (3×4×5 → 2), wrong conversions included.
2. VGG16 twice — ``keras.applications.VGG16(weights=None)`` and equivcheck's torch VGG16-style
   model — with random He-normal weights (nothing is downloaded), convolutionalized and
   verified at 224×224 and at 256×256, where the head slides to a 2×2 output map.
3. The report (JSON, Markdown, HTML) in ``report_dir``.

``quick=True`` replaces VGG16 by small unpadded VGG-style models (seconds instead of a minute),
where the crop check applies too: without padding, the output at each position equals the
original model on the input crop there.
He-normal weights keep the activations' scale through 16 layers; the frameworks' default
initialisations shrink them until the softmax is nearly uniform and a wrong conversion
changes the output by little more than rounding.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plan_cases", "run"]

FC6 = dict(channels=512, spatial=(7, 7), units=4096)
SMALL = dict(channels=3, spatial=(4, 5), units=2)
SMALL_CFG: tuple[int | str, ...] = (8, "M", 16, "M", 16, "M")  # a VGG in miniature, unpadded: 46×46 → 4×4 map


def plan_cases(seed: int = 0) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every preset's dense → every preset's conv: the fc6 plan's code, and a small-shape check each."""
    from equivcheck.planning import plan
    from equivcheck.presets import PRESETS, spec
    from equivcheck.verification import verify_pair

    rows, cases = [], []
    for a in PRESETS:
        for b in PRESETS:
            m = plan(spec(f"{a}:dense", **FC6), spec(f"{b}:conv", **FC6))
            case = verify_pair(spec(f"{a}:dense", **SMALL), spec(f"{b}:conv", **SMALL), seed=seed)
            cases.append(case)
            rows.append({"dense": f"{a}:dense", "conv": f"{b}:conv", "numpy": m.code("numpy"), "verdict": case.verdict,
                         "mutants": f"{sum(x.outcome == 'rejected' for x in case.mutations)}/{len(case.mutations)}"})
    return rows, cases



def _plans_table(rows: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title="Flatten → Dense(4096) on 512×7×7 as a 7×7 conv: the kernel mapping, checked at "
                        "3×4×5 → 2 on the numpy reference", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="check: the verdict, then how many plausible wrong conversions the same data rejected")
    table.add_column("dense", no_wrap=True)
    table.add_column("conv", no_wrap=True)
    table.add_column("numpy code (w: the dense kernel)", overflow="fold")
    table.add_column("check", no_wrap=True)
    for r in rows:
        colour = "green" if r["verdict"] == "pass" else "red"
        table.add_row(r["dense"].split(":")[0], r["conv"].split(":")[0], r["numpy"], f"[{colour}]{r['verdict']}[/] {r['mutants']}")
    return table


def _conventions_table() -> Any:
    from rich.table import Table

    from equivcheck.presets import PRESETS, spec

    table = Table(title="Conventions of each system (fc6: 512×7×7 → 4096)")
    for col in ("preset", "maps", "Flatten order", "dense kernel", "conv kernel", "op"):
        table.add_column(col)
    for p in PRESETS.values():
        d, c = spec(f"{p.name}:dense", **FC6), spec(f"{p.name}:conv", **FC6)
        table.add_row(p.name, "NCHW" if d.data_format == "channels_first" else "NHWC", d.flatten,
                      "(in, out)" if d.kernel_layout == "IO" else "(out, in)", c.kernel_layout, c.op)
    return table


def _matrix_line(cases: list[Any]) -> str | None:
    from equivcheck.report.conventions import matrix

    m = matrix([c.to_dict() for c in cases])
    counts: dict[str, int] = {}
    for row in m["rows"]:
        for cell in row["cells"].values():
            counts[cell["state"]] = counts.get(cell["state"], 0) + 1
    return (f"convention matrix: {len(m['rows'])} conversions × {len(m['columns'])} conventions — "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


# -- models -------------------------------------------------------------------------------
def he_init_keras(model: Any, seed: int) -> None:
    """He-normal kernels and small random biases, in place."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "kernel", None) is None:
            continue
        k = layer.kernel
        fan_in = math.prod(k.shape[:-1])
        k.assign((rng.standard_normal(tuple(k.shape), dtype=np.float32) * math.sqrt(2.0 / fan_in)).astype(np.float32))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign((0.1 * rng.standard_normal(tuple(layer.bias.shape))).astype(np.float32))


def he_init_torch(model: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if w is None or w.ndim < 2:
                continue
            fan_in = math.prod(w.shape[1:])
            w.copy_(torch.randn(w.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _keras_model(quick: bool, seed: int) -> Any:
    import keras

    if quick:
        L = keras.layers
        from equivcheck.fcn.vgg import valid_input_size

        size = valid_input_size(SMALL_CFG, 4)
        layers: list[Any] = [keras.Input((size, size, 3))]
        for v in SMALL_CFG:
            layers.append(L.MaxPooling2D(2) if v == "M" else L.Conv2D(int(v), 3, padding="valid", activation="relu"))
        layers += [L.Flatten(name="flatten"), L.Dense(32, activation="relu", name="fc1"), L.Dropout(0.5),
                   L.Dense(32, activation="relu", name="fc2"), L.Dense(10, activation="softmax", name="predictions")]
        model = keras.Sequential(layers, name="small_vgg")
    else:
        model = keras.applications.VGG16(weights=None)
    he_init_keras(model, seed)
    return model


def _torch_model(quick: bool, seed: int) -> Any:
    from equivcheck.fcn import vgg

    model = vgg.VGG(SMALL_CFG, hidden=32, num_classes=10, map_size=4, padding=0) if quick else vgg.vgg16(seed=seed)
    he_init_torch(model, seed)
    return model.eval()


def _models(quick: bool, seed: int, progress: Any, console: Any) -> list[Any]:
    from equivcheck.fcn import convolutionalize, verify_model
    from equivcheck.fcn.commands import print_verification

    results = []
    frameworks: list[tuple[str, Callable[[bool, int], Any]]] = [("torch", _torch_model), ("keras", _keras_model)]
    label = "small VGG-style" if quick else "VGG16"
    for name, build in frameworks:
        try:
            __import__(name)
        except ImportError:
            console.print(f"[yellow]{name} is not installed: its {label} part is skipped[/]")
            continue
        task = progress.add_task(f"{name}: {label}", total=3)
        progress.update(task, description=f"{name}: build {label} (random He-normal weights)")
        model = build(quick, seed)
        progress.update(task, advance=1, description=f"{name}: convolutionalize")
        converted = convolutionalize(model)
        progress.update(task, advance=1, description=f"{name}: verify at the training size and larger")
        result = verify_model(model, converted, crops=2 if not quick else 4, seed=seed)
        progress.update(task, advance=1, description=f"{name}: {label} {result.verdict} ({result.seconds:.1f} s)")
        results.append(result)
        _print_model(result, progress.console)
        print_verification(result, progress.console)
        del model, converted
    return results


def _print_model(result: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{result.framework} {result.model}: the head as convolutions (total stride "
                        f"{'×'.join(map(str, result.total_stride or ()))}, "
                        f"{'×'.join(map(str, result.larger_shape))} → {'×'.join(map(str, result.output_positions))} outputs)")
    for col in ("layer", "kernel", "becomes", "numpy code"):
        table.add_column(col, overflow="fold")
    for row in result.layers:
        (a, b) = row["kernel"]
        table.add_row(row["layer"], "×".join(map(str, a)), "×".join(map(str, b)), row["numpy"])
    console.print(table)


def _model_conversions(progress: Any, console: Any) -> list[tuple[str, Any]]:
    """A torch VGG-style classifier converted to Keras, right and with the classifier's flatten order wrong."""
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("keras") is None:
        console.print("[yellow]whole-model conversion skipped: it needs torch and keras[/]")
        return []
    from equivcheck.modelcheck import check_models
    from equivcheck.modelcheck.examples import SHAPE, to_keras, torch_vgg

    task = progress.add_task("whole models: torch → Keras, layer by layer", total=2)
    out = []
    for want, flatten in (("pass", "right"), ("fail", "wrong")):
        source = torch_vgg(seed=0)
        check = check_models(source, to_keras(source, flatten=flatten), input_shape=SHAPE)
        out.append((want, check))
        first = check.first_divergence
        where = "" if first is None else f": first wrong layer {first.source} ↔ {first.converted}: {first.diagnosis}"
        mark = "green" if check.verdict == want else "red"
        progress.console.print(f"[{mark}]{flatten} converter → {check.verdict} (expected {want}){where}[/]")
        progress.update(task, advance=1)
    return out


# -- the demo -----------------------------------------------------------------------------
def run(report_dir: str | os.PathLike[str] | None = "reports", quick: bool = False, seed: int = 0) -> int:
    """Run the demo; 0 when every check passes, 1 otherwise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console()
    start = time.perf_counter()
    console.rule("[bold]equivcheck demo: Flatten → Dense as a convolution")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("plans: every preset's dense → every preset's conv", total=1)
        rows, cases = plan_cases(seed)
        progress.update(task, advance=1, description=f"plans: {len(rows)} conversions checked")
        progress.console.print(_plans_table(rows))
        progress.console.print(_conventions_table())
        line = _matrix_line(cases)
        if line:
            progress.console.print(line)
        results = _models(quick, seed, progress, console)
        conversions = _model_conversions(progress, console)
    expected = all(check.verdict == want for want, check in conversions)
    ok = all(c.verdict == "pass" for c in cases) and all(r.passed for r in results) and expected
    if report_dir is not None:
        from equivcheck.fcn.commands import write_model_report

        paths = write_model_report(report_dir, results, cases=cases, command="demo" + (" --quick" if quick else ""), seed=seed,
                                   extra={"model conversions": [check.to_dict() for _, check in conversions]})
        if paths:
            console.print("wrote " + ", ".join(str(Path(p)) for p in paths))
    verdict = "[green]all checks pass[/]" if ok else "[red]some checks fail[/]"
    console.rule(f"{verdict} in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1
