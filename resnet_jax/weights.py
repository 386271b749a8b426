"""Pretrained weights: PyTorch state dicts (torchvision, timm) -> Flax variables.

    variables = weights.from_torchvision(state_dict, "resnet50")   # {'params': ..., 'batch_stats': ...}
    logits = models.create("resnet50", 1000).apply(variables, images)   # NHWC, ImageNet-normalised

The mapping walks the Flax model's own variable tree and names, for every leaf, the PyTorch key it
comes from, so a missing, unexpected or misshapen key is reported with its name (PyTorch's
`num_batches_tracked` buffers are ignored). Convolution kernels go OIHW -> HWIO, the classifier
(out, in) -> (in, out), BatchNorm's weight/bias to scale/bias and its running mean/var to
`batch_stats`. Nothing is downloaded: files are read with `load_state_dict`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax import models, sources
from resnet_jax.errors import UserError, check_choice

# Architectures each source publishes with the same layer layout as ours.
TORCHVISION = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
# timm's names where they differ from ours: its pre-activation ResNetV2 family.
TIMM_NAMES = {f"preact_resnet{d}": f"resnetv2_{d}" for d in (18, 34, 50, 101, 152)}
TIMM = (
    TORCHVISION
    + tuple(name for name in models.names() if re.fullmatch(r"resnet\d+d|seresnet\d+|resnet200", name))
    + tuple(TIMM_NAMES)
)
SOURCES = {"torchvision": TORCHVISION, "timm": TIMM}
FILE_TYPES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
IGNORED_SUFFIXES = ("num_batches_tracked",)
# ImageNet normalisation of torchvision and timm (0.485/0.229, ... x 255; DatasetInfo's uint8 units).
IMAGENET_MEAN, IMAGENET_STD = sources.IMAGENET_STATS


class WeightsError(UserError, ValueError):
    """A state dict or weights file that does not fit the model; the message lists what is wrong."""


# ---------------------------------------------------------------- names


def torch_module_name(path: tuple[str, ...], arch: Mapping[str, Any]) -> str:
    """A Flax module path -> the PyTorch module name holding the same weights (torchvision's and
    timm's ResNet layout; timm's ResNetV2 layout for pre-activation nets)."""
    if getattr(arch["block_cls"], "pre_activation", False):
        return _resnetv2_module_name(path)
    deep = arch.get("stem") == "deep"
    downsample = (1, 2) if arch.get("shortcut") == "avg" else (0, 1)  # timm's avg-pool sits at index 0
    stem = {"stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3", "stem_bn2": "conv1.4"}
    parts = []
    for part in path:
        if match := re.fullmatch(r"layer(\d+)_(\d+)", part):
            parts.append(f"layer{match[1]}.{match[2]}")
        elif part == "shortcut":
            continue
        elif part == "downsample_conv":
            parts.append(f"downsample.{downsample[0]}")
        elif part == "downsample_bn":
            parts.append(f"downsample.{downsample[1]}")
        elif part in stem:
            parts.append(stem[part])
        elif part == "conv1" and deep and len(path) == 1:
            parts.append("conv1.6")
        else:
            parts.append(part)
    return ".".join(parts)


def _resnetv2_module_name(path: tuple[str, ...]) -> str:
    """timm's ResNetV2 (resnetv2_50, ...): stem.conv, stages.S.blocks.B.normN/convN, norm, head.fc."""
    top = {"conv1": "stem.conv", "final_bn": "norm", "fc": "head.fc"}
    if len(path) == 1:
        return top[path[0]]
    block = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
    prefix = f"stages.{int(block[1]) - 1}.blocks.{block[2]}"
    if path[1:] == ("shortcut", "downsample_conv"):
        return f"{prefix}.downsample.conv"
    return ".".join([prefix, *(re.sub(r"^bn(\d)$", r"norm\1", part) for part in path[1:])])


LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def to_flax_layout(value: np.ndarray, flax_ndim: int) -> np.ndarray:
    """PyTorch weight layout -> Flax: conv OIHW -> HWIO, linear (out, in) -> (in, out); a 1x1
    convolution classifier (timm's ResNetV2 head) -> (in, out)."""
    if flax_ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if flax_ndim == 2:
        return value.reshape(value.shape[:2]).T
    return value


def torch_shape(flax_shape: tuple[int, ...], conv_head: bool = False) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0], 1, 1) if conv_head else (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


@functools.lru_cache(maxsize=32)
def flax_shapes(name: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax variable path -> shape for registry model `name` (traced once per name and size)."""
    module = models.create(name, num_classes)
    x = jnp.zeros((1, 64, 64, 3))
    shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0), x))
    return {path: tuple(leaf.shape) for path, leaf in shapes.items()}


def key_map(name: str, num_classes: int = 1000) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (Flax variable path, PyTorch shape) for registry model `name`."""
    shapes = flax_shapes(name, num_classes)
    arch = models.MODELS[name]
    mapping = {}
    for path, shape in shapes.items():
        collection, *modules, leaf_name = path
        torch_name = torch_module_name(tuple(modules), arch)
        key = f"{torch_name}.{LEAF_NAMES[(collection, leaf_name)]}"
        mapping[key] = (path, torch_shape(shape, conv_head=torch_name == "head.fc"))
    return mapping


# ---------------------------------------------------------------- conversion


def to_numpy(value: Any) -> np.ndarray:
    """numpy arrays and torch tensors (any device, bfloat16 included) -> float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.float().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value, dtype=np.float32)


def _describe(problems: dict[str, list[str]], name: str, source: str) -> str:
    lines = [f"the {source} state dict does not fit {name}:"]
    for label, items in problems.items():
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            lines.append(f"  {len(items)} {label}: {shown}")
    return "\n".join(lines)


def convert(state_dict: Mapping[str, Any], name: str, source: str = "torchvision") -> dict[str, Any]:
    """A PyTorch state dict -> `{'params', 'batch_stats'}` for `models.create(name, num_classes)`.

    The number of classes is read from the classifier (`fc.weight`; timm's ResNetV2: `head.fc.weight`).
    Raises `WeightsError` listing every missing, unexpected and misshapen key.
    """
    check_choice("source", source, tuple(SOURCES))
    if name not in SOURCES[source]:
        raise WeightsError(
            f"model={name!r} has no {source} counterpart; {source} weights exist for: "
            f"{', '.join(SOURCES[source])}"
        )
    state = {k.removeprefix("module."): v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    fc = state.get("fc.weight", state.get("head.fc.weight"))
    num_classes = int(fc.shape[0]) if fc is not None and len(fc.shape) in (2, 4) else 1000
    mapping = key_map(name, num_classes)
    path_shapes = flax_shapes(name, num_classes)
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    misshapen = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, (_, shape) in mapping.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": misshapen}
    if any(problems.values()):
        raise WeightsError(_describe(problems, name, source))
    flat = {
        path: jnp.asarray(to_flax_layout(to_numpy(state[k]), len(path_shapes[path])))
        for k, (path, _) in mapping.items()
    }
    return traverse_util.unflatten_dict(flat)


def from_torchvision(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    """torchvision's `models.<name>(weights=...).state_dict()` -> Flax variables for `models.create(name)`."""
    return convert(state_dict, name, "torchvision")


def from_timm(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    """timm's `create_model(...).state_dict()` -> Flax variables: torchvision's architectures plus
    ResNet-D (`resnet50d`), SE-ResNets (`seresnet50`) and, from timm's `resnetv2_50` etc., the
    pre-activation nets (`preact_resnet50`; see `TIMM_NAMES`)."""
    return convert(state_dict, name, "timm")


def load_state_dict(path: str) -> dict[str, Any]:
    """Read a `.pth`/`.pt`/`.bin` (needs torch), `.safetensors` (needs safetensors) or `.npz` file.

    Pickled files are read with `torch.load(..., weights_only=True)`: a pickle can run code, and
    this refuses anything but tensors. A checkpoint that wraps the weights in 'state_dict' or
    'model' is unwrapped.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_TYPES:
        raise WeightsError(
            f"{path!r}: unsupported file type {ext or '(none)'!r}; use one of {', '.join(FILE_TYPES)}"
        )
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise WeightsError(
                f"reading {path!r} needs the safetensors package: pip install safetensors"
            ) from None
        return load_file(path)
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"reading {path!r} needs PyTorch: pip install torch (the CPU build is enough), "
            "or convert the file to .safetensors or .npz where torch is installed"
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or a pickle holding more than tensors
        raise WeightsError(f"cannot read {path!r} with torch.load(weights_only=True): {e}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    return dict(loaded)
