"""Every network `models.create` builds, by name: stage sizes, block class, stem, widths and
shortcut, written out one line per name so that `grep -n '"resnet50d"'` finds its definition."""

from __future__ import annotations

from typing import Any

from resnet_jax.layers import PRE_ACTIVATION, BasicBlock, BottleneckBlock, PreActBasicBlock

_IMAGENET_STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
    200: ((3, 24, 36, 3), BottleneckBlock),
}
SE_RATIO = 1 / 16  # Hu et al. (2018) and timm's seresnet


def _cifar(depth: int, block: type = BasicBlock, shortcut: str | None = "pad") -> dict[str, Any]:
    """He et al. 2016, Sec. 4.2: 6n+2 layers, 16/32/64 filters; option A ("pad") shortcuts."""
    n = (depth - 2) // 6
    return dict(stage_sizes=(n, n, n), block_cls=block, stem="cifar", width=16, shortcut=shortcut)


def _imagenet(
    depth: int, *, pre_activation: bool = False, shortcut: str | None = "projection", **arch: Any
) -> dict[str, Any]:
    """The ImageNet stages of `depth` (v1.5: the stride on the 3x3), changed by `arch`."""
    stages, block = _IMAGENET_STAGES[depth]
    block = PRE_ACTIVATION[block] if pre_activation else block
    return dict(stage_sizes=stages, block_cls=block, stem="imagenet", width=64, shortcut=shortcut) | arch


def _wide_cifar(depth: int, k: int) -> dict[str, Any]:
    """Zagoruyko & Komodakis (2016): WRN-d-k, (d-4)/6 pre-activation basic blocks per stage, widths
    16k/32k/64k after a 16-channel 3x3 stem, projection shortcuts where the shape changes."""
    n = (depth - 4) // 6
    return dict(
        stage_sizes=(n, n, n),
        block_cls=PreActBasicBlock,
        stem="cifar",
        width=16 * k,
        stem_width=16,
        shortcut="projection",
    )


# Every network by name, literally.
MODELS: dict[str, dict[str, Any]] = {
    # CIFAR ResNets (v1, option A shortcuts).
    "resnet20": _cifar(20),
    "resnet32": _cifar(32),
    "resnet44": _cifar(44),
    "resnet56": _cifar(56),
    "resnet110": _cifar(110),
    # ImageNet ResNets, v1.5 (torchvision's): the stride on the 3x3 of a bottleneck.
    "resnet18": _imagenet(18),
    "resnet34": _imagenet(34),
    "resnet50": _imagenet(50),
    "resnet101": _imagenet(101),
    "resnet152": _imagenet(152),
    "resnet200": _imagenet(200),
    # v1 (He et al. 2016): the stride on the first 1x1.
    "resnet50_v1": _imagenet(50, stride_on="1x1"),
    "resnet101_v1": _imagenet(101, stride_on="1x1"),
    "resnet152_v1": _imagenet(152, stride_on="1x1"),
    # Bag of Tricks (He et al. 2019), timm's resnet*d: deep stem, average-pool shortcuts.
    "resnet18d": _imagenet(18, stem="deep", shortcut="avg"),
    "resnet34d": _imagenet(34, stem="deep", shortcut="avg"),
    "resnet50d": _imagenet(50, stem="deep", shortcut="avg"),
    "resnet101d": _imagenet(101, stem="deep", shortcut="avg"),
    "resnet152d": _imagenet(152, stem="deep", shortcut="avg"),
    "resnet200d": _imagenet(200, stem="deep", shortcut="avg"),
    # Squeeze-and-excitation (Hu et al. 2018).
    "seresnet18": _imagenet(18, se_ratio=SE_RATIO),
    "seresnet34": _imagenet(34, se_ratio=SE_RATIO),
    "seresnet50": _imagenet(50, se_ratio=SE_RATIO),
    "seresnet101": _imagenet(101, se_ratio=SE_RATIO),
    "seresnet152": _imagenet(152, se_ratio=SE_RATIO),
    # torchvision's wide and grouped bottleneck nets.
    "wide_resnet50_2": _imagenet(50, groups=1, base_width=128),
    "wide_resnet101_2": _imagenet(101, groups=1, base_width=128),
    "resnext50_32x4d": _imagenet(50, groups=32, base_width=4),
    "resnext101_32x8d": _imagenet(101, groups=32, base_width=8),
    "resnext101_64x4d": _imagenet(101, groups=64, base_width=4),
    # Wide ResNets for CIFAR.
    "wrn16_4": _wide_cifar(16, 4),
    "wrn16_8": _wide_cifar(16, 8),
    "wrn28_10": _wide_cifar(28, 10),
    "wrn40_4": _wide_cifar(40, 4),
    # The ResNet-18 stages behind a CIFAR stem (no max-pool): the common CIFAR-10 "ResNet-18".
    "cifar_resnet18": _imagenet(18, stem="cifar"),
    # Pre-activation (v2, He et al. 2016b); option A on CIFAR as in v1: the two differ in the block only.
    "preact_resnet20": _cifar(20, PreActBasicBlock),
    "preact_resnet32": _cifar(32, PreActBasicBlock),
    "preact_resnet44": _cifar(44, PreActBasicBlock),
    "preact_resnet56": _cifar(56, PreActBasicBlock),
    "preact_resnet110": _cifar(110, PreActBasicBlock),
    "preact_resnet18": _imagenet(18, pre_activation=True),
    "preact_resnet34": _imagenet(34, pre_activation=True),
    "preact_resnet50": _imagenet(50, pre_activation=True),
    "preact_resnet101": _imagenet(101, pre_activation=True),
    "preact_resnet152": _imagenet(152, pre_activation=True),
    "preact_resnet200": _imagenet(200, pre_activation=True),
    # Plain nets: the same layers without shortcuts, for comparison.
    "plain20": _cifar(20, shortcut=None),
    "plain32": _cifar(32, shortcut=None),
    "plain44": _cifar(44, shortcut=None),
    "plain56": _cifar(56, shortcut=None),
    "plain110": _cifar(110, shortcut=None),
    "plain18": _imagenet(18, shortcut=None),
    "plain34": _imagenet(34, shortcut=None),
    "plain50": _imagenet(50, shortcut=None),
    "plain101": _imagenet(101, shortcut=None),
    "plain152": _imagenet(152, shortcut=None),
    "plain200": _imagenet(200, shortcut=None),
}


def names() -> list[str]:
    """Every name `create` accepts."""
    return list(MODELS)


def is_cifar(name: str) -> bool:
    """Networks built for 32x32 inputs (3x3 stem without pooling)."""
    return MODELS[name]["stem"] == "cifar"
