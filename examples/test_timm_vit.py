"""timm's JAX → torch ViT loader (``VisionTransformer.load_pretrained`` on an ``.npz``), checked with equivcheck.

The source is a tiny Flax linen ViT in the layout of Google's original ViT checkpoints
(``embedding``, ``cls``, ``Transformer/posembed_input``, ``Transformer/encoderblock_N/{LayerNorm_0,
MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}``, ``Transformer/encoder_norm``, ``head``),
with random weights. Its parameters are written as the ``.npz`` those checkpoints are, and timm's own
loader (``timm.models.vision_transformer._load_weights``) loads them into a tiny timm
``VisionTransformer``. equivcheck runs the Flax twin on JAX and the timm model on torch.

Checked pair by pair: the patch-embedding conv (HWIO → OIHW), every LayerNorm, both MLP dense layers
of each block and the head. Not paired: attention (Flax ``DenseGeneral`` query/key/value/out against
timm's fused ``qkv`` and ``proj`` Linear layers), the position embedding and the class token; they
are named in ``allow_unchecked`` and covered only by the end-to-end comparison of the outputs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import equivcheck as ec

torch = pytest.importorskip("torch", reason="torch is not installed")
jax = pytest.importorskip("jax", reason="jax is not installed")
pytest.importorskip("flax", reason="flax is not installed")


class _Unusable(type):
    """Stand-in classes of torchvision: any attribute is another stand-in, building one raises."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}")


def _stand_in(name: str) -> type:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"torchvision cannot load beside this torch ({name})")
    return _Unusable(name.rsplit(".", 1)[-1], (), {"__init__": unavailable, "__qualname__": name})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stand_in(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``torchvision`` and each of its submodules a :class:`_StandInModule`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _import_timm_vit() -> types.ModuleType:
    """``timm.models.vision_transformer``, imported beside a torchvision that cannot load.

    timm imports torchvision when it loads (``torchvision.ops.misc.FrozenBatchNorm2d``, transforms,
    datasets for its data pipeline). The torchvision built for torch 2.13 (0.28.0) is a CUDA build
    that cannot load beside the CPU torch wheel; where that is so, stand-ins whose classes raise when
    built serve for the import and are removed after it (the ViT and its npz loader never use them).
    """
    reason = "timm is not installed (.ci/examples-requirements.txt)"
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        pass
    except (ImportError, OSError, RuntimeError):
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    else:
        return pytest.importorskip("timm.models.vision_transformer", reason=reason)
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        return pytest.importorskip("timm.models.vision_transformer", reason=reason)
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]


vit = _import_timm_vit()
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

IMG, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 32, 8, 32, 2, 2, 5
INPUT = (2, IMG, IMG, 3)  # the Flax source's input, channels last

# ---- the source: a Flax ViT in the original checkpoints' layout (names as in google-research/vision_transformer)


class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x):  # type: ignore[no-untyped-def]
        x = nn.gelu(nn.Dense(4 * WIDTH, name="Dense_0")(x), approximate=False)  # timm's nn.GELU is the erf one
        return nn.Dense(WIDTH, name="Dense_1")(x)


class EncoderBlock(nn.Module):
    @nn.compact
    def __call__(self, x):  # type: ignore[no-untyped-def]
        y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="MultiHeadDotProductAttention_1")(y, y)
        return x + MlpBlock(name="MlpBlock_3")(nn.LayerNorm(epsilon=1e-6, name="LayerNorm_2")(x))


class AddPositionEmbs(nn.Module):
    @nn.compact
    def __call__(self, x):  # type: ignore[no-untyped-def]
        return x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):  # type: ignore[no-untyped-def]
        x = AddPositionEmbs(name="posembed_input")(x)
        for i in range(DEPTH):
            x = EncoderBlock(name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


class ViT(nn.Module):
    @nn.compact
    def __call__(self, x):  # type: ignore[no-untyped-def]
        x = nn.Conv(WIDTH, (PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID", name="embedding")(x)
        n, h, w, c = x.shape
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x.reshape(n, h * w, c)], axis=1)
        return nn.Dense(CLASSES, name="head")(Encoder(name="Transformer")(x)[:, 0])


def flax_vit() -> tuple[nn.Module, dict[str, Any]]:
    """The twin with random weights everywhere (biases, LayerNorm scales, class token included).

    The shapes come from ``jax.eval_shape`` and the values from numpy: ``module.init`` compiles each
    initializer on its own, about 10 s on 2 cores.
    """
    module = ViT()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, IMG, IMG, 3)))["params"]
    rng = np.random.default_rng(0)

    def value(keys: tuple[Any, ...], leaf: Any) -> np.ndarray:
        name, shape = keys[-1].key, leaf.shape
        if name == "kernel":  # fan-in scaled
            return rng.normal(0, 1 / np.sqrt(np.prod(shape) // shape[-1]), shape).astype(np.float32)
        return ((name == "scale") + rng.normal(0, 0.1, shape)).astype(np.float32)

    return module, {"params": jax.tree_util.tree_map_with_path(value, shapes)}


@pytest.fixture(scope="module")
def twin() -> tuple[nn.Module, dict[str, Any]]:
    return flax_vit()


def write_npz(variables: dict[str, Any], path: Path) -> Path:
    """The parameters as a JAX ViT checkpoint stores them: one array per ``/``-joined path."""
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    np.savez(path, **{"/".join(k.key for k in keys): np.asarray(v) for keys, v in flat})
    return path


def timm_vit() -> torch.nn.Module:
    return vit.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                 num_classes=CLASSES)


def loader(folder: Path, bug: Callable[[torch.nn.Module], None] | None = None) -> Callable[[Any], torch.nn.Module]:
    """The converter under test: the twin saved as an ``.npz``, loaded by timm (then ``bug`` planted, if given)."""
    def convert(source: tuple[nn.Module, dict[str, Any]]) -> torch.nn.Module:
        model = timm_vit()
        model.load_pretrained(str(write_npz(source[1], folder / "vit.npz")))  # timm's _load_weights
        if bug is not None:
            with torch.no_grad():
                bug(model)
        return model.eval()
    return convert


# Attention (Flax DenseGeneral q/k/v/out against timm's fused qkv and proj), the position embedding and
# the class token pair with nothing: the end-to-end comparison of the outputs is their only check.
UNPAIRED = ("source:Transformer/encoderblock_*/MultiHeadDotProductAttention_1/*", "converted:blocks.*.attn.qkv",
            "converted:blocks.*.attn.proj", "source:Transformer/posembed_input", "source:ViT",
            "converted:VisionTransformer")


def test_npz_loader_passes(equivcheck, tmp_path, twin):
    result = equivcheck.check_model_converter(loader(tmp_path), source=twin, input_shape=INPUT,
                                              allow_unchecked=UNPAIRED)
    blocks = [(f"Transformer/encoderblock_{i}/{s}", f"blocks.{i}.{c}") for i in range(DEPTH)
              for s, c in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2"), ("MlpBlock_3/Dense_0", "mlp.fc1"),
                           ("MlpBlock_3/Dense_1", "mlp.fc2"))]
    expected = [("embedding", "patch_embed.proj"), *blocks, ("Transformer/encoder_norm", "norm"), ("head", "head")]
    assert [(row.source, row.converted) for row in result.layers] == expected, result.render()
    assert all(row.verdict == "pass" for row in result.layers), result.render()
    assert result.layers[0].kind == "conv" and result.layers[0].boundary == "HWC → CHW", result.render()
    assert result.end_to_end["float32"]["passed"], result.render()  # attention, cls and pos_embed included
    unchecked = {(u.model, u.name) for u in result.unchecked}
    assert len(unchecked) == 4 * DEPTH + 2 * DEPTH + 3, result.render()  # q/k/v/out, qkv/proj per block; 3 holders


def test_attention_left_unchecked_fails_the_test_unless_allowed(equivcheck, tmp_path, twin):
    with pytest.raises(ec.errors.ConversionCheckFailed, match=r"blocks\.0\.attn\.qkv"):
        equivcheck.check_model_converter(loader(tmp_path), source=twin, input_shape=INPUT)


def _swap_norm_scale_and_bias(model: torch.nn.Module) -> None:
    norm = model.blocks[0].norm2
    scale = norm.weight.clone()
    norm.weight.copy_(norm.bias)
    norm.bias.copy_(scale)


def _swap_query_and_key(model: torch.nn.Module) -> None:
    qkv = model.blocks[1].attn.qkv.weight  # rows: query, key, value
    query = qkv[:WIDTH].clone()
    qkv[:WIDTH] = qkv[WIDTH:2 * WIDTH]
    qkv[WIDTH:2 * WIDTH] = query


def _exchange_patch_kernel_h_and_w(model: torch.nn.Module) -> None:
    """``_n2p``'s ``transpose([3, 2, 0, 1])`` written as ``[3, 2, 1, 0]`` for the patch embedding."""
    weight = model.patch_embed.proj.weight
    weight.copy_(weight.transpose(2, 3).clone())


def _reshape_mlp_kernel(model: torch.nn.Module) -> None:
    """The (in, out) Dense kernel reshaped to (out, in) instead of transposed."""
    weight = model.blocks[1].mlp.fc1.weight
    weight.copy_(weight.T.reshape(weight.shape).clone())


PLANTED = {
    "patch kernel H/W exchanged": (_exchange_patch_kernel_h_and_w, "embedding", "H and W of the kernel exchanged"),
    "LayerNorm scale and bias swapped": (_swap_norm_scale_and_bias, "Transformer/encoderblock_0/LayerNorm_2",
                                         "gamma and beta swapped"),
    "MLP kernel reshaped": (_reshape_mlp_kernel, "Transformer/encoderblock_1/MlpBlock_3/Dense_0", "reshape only"),
}


@pytest.mark.parametrize("mistake", list(PLANTED))
def test_planted_mistake_named_at_its_layer(tmp_path, twin, mistake):
    bug, layer, named = PLANTED[mistake]
    result = ec.check_models(twin, loader(tmp_path, bug)(twin), input_shape=INPUT)
    assert result.verdict == "fail", result.render()
    first = result.first_divergence
    assert first is not None and first.source == layer, result.render()
    assert named in f"{first.mistake}: {first.diagnosis}", result.render()
    assert [row.source for row in result.layers if row.verdict == "fail"] == [layer], result.render()


def test_planted_attention_mistake_names_the_unchecked_attention(tmp_path, twin):
    """query and key exchanged in block 1's fused qkv: the LayerNorm after it is right but fed another input."""
    result = ec.check_models(twin, loader(tmp_path, _swap_query_and_key)(twin), input_shape=INPUT)
    assert result.verdict == "fail", result.render()
    first = result.first_divergence
    assert (first.source, first.mistake) == ("Transformer/encoderblock_1/LayerNorm_2", "graph"), result.render()
    assert "converted blocks.1.attn.qkv" in result.likely_cause, result.render()
    assert not result.end_to_end["float32"]["passed"], result.render()
