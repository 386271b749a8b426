"""The ResNet family as one composable Flax Linen module, built by name from `registry.MODELS`.

Every network is `ResNet` with a stem, a block class, stage sizes and a shortcut kind; conv and
norm layers are injected so that dtype, normalisation and initialisation change in one place.
Layer names follow torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `shortcut/downsample_conv`,
`fc`) so that `resnet_jax.weights` maps PyTorch state dicts one to one.

Padding follows PyTorch (k//2 on each side) rather than XLA's 'SAME', which pads strided layers
asymmetrically; it is what makes imported weights reproduce PyTorch's outputs.

    python -m resnet_jax.models [--image_size 224] [--names resnet50 wrn28_10 ...]

prints every name with its parameter count and forward GFLOPs (XLA's cost analysis).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from flax import linen as nn

from resnet_jax import cli, costs
from resnet_jax.errors import check_choice
from resnet_jax.layers import (  # noqa: F401  (re-exported: the blocks are part of the models API)
    PRE_ACTIVATION,
    SHORTCUTS,
    STRIDE_PLACEMENTS,
    BasicBlock,
    BottleneckBlock,
    Identity,
    PreActBasicBlock,
    PreActBottleneckBlock,
    Shortcut,
    conv_kernel_init,
    max_pool_torch,
    torch_padding,
)
from resnet_jax.norms import (  # noqa: F401  (re-exported, as the blocks)
    BN_FORMS,
    BatchNorm,
    FoldedBatchNorm,
    GhostBatchNorm,
    PooledStemNorm,
)
from resnet_jax.registry import MODELS, SE_RATIO, is_cifar, names  # noqa: F401  (re-exported)
from resnet_jax.stems import StemConv

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
}
NORMS = ("batch", "none")
FOLD_BN = ("auto", "on", "off")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# float64 is for gradient checks under jax.enable_x64; it is not a training choice.


class ResNet(nn.Module):
    """A ResNet: stem, stages of blocks, global average pool, (dropout,) linear classifier.

    With pre-activation blocks the stem has no final norm-act (the first block's pre-activation
    does it) and a final norm-act comes before the pool, since the last block's output is a bare sum.
    Stochastic depth rises linearly from 0 at the first block to `drop_path_rate` at the last (timm's
    rule); it and the classifier dropout draw from the 'dropout' rng in training and add no parameters.
    """

    stage_sizes: Sequence[int]
    block_cls: type[BasicBlock]
    num_classes: int
    # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": one 3x3 conv; "deep": ResNet-C/D's three
    # 3x3 convs (stem_width/2, stem_width/2, stem_width, the first with stride 2) + 3x3/2 max-pool
    stem: str = "imagenet"
    width: int = 64  # filters of the first stage (x2 per stage; bottlenecks output 4x)
    stem_width: int = 0  # channels out of the stem; 0 = width
    shortcut: str | None = "projection"
    groups: int = 1
    base_width: int = 64
    stride_on: str = "3x3"
    se_ratio: float = 0.0
    zero_init_residual: bool = True
    norm: str = "batch"
    bn_group_size: int = 0  # 0: statistics over the whole batch; k: over groups of k examples
    frozen_norm: bool = False  # BatchNorm uses (and keeps) its running statistics in training too
    fold_bn: bool = True  # norms.FoldedBatchNorm after stride-1 1x1 convs, norms.PooledStemNorm
    bn_form: str = "centered"  # norms.BN_FORMS: how the other BatchNorms write their normalisation
    explicit_pool_padding: bool = False  # for ONNX export: jax2onnx drops a pooling window's padding
    space_to_depth: bool = False  # the ImageNet stem's 7x7/2 conv on 2x2 blocks (`stems`), same params
    pad_input_channels: int = 0  # > 0: the first conv on the image padded to this many channels, same params
    activation: str = "relu"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_norm = self.norm == "batch"
        conv = functools.partial(
            nn.Conv,
            use_bias=not use_norm,
            dtype=self.dtype,
            kernel_init=conv_kernel_init,
        )

        def padded_conv(filters, kernel, strides=(1, 1), **kw):
            return conv(filters, kernel, strides, padding=torch_padding(kernel[0]), **kw)

        if self.bn_group_size:
            batch_norm = functools.partial(GhostBatchNorm, group_size=self.bn_group_size, form=self.bn_form)
        elif self.bn_form != "centered":
            batch_norm = functools.partial(BatchNorm, form=self.bn_form)
        else:  # the form every published timing ran: flax's own module
            batch_norm = nn.BatchNorm
        norm_options = dict(
            use_running_average=not train or self.frozen_norm, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )
        norm = functools.partial(batch_norm, **norm_options) if use_norm else Identity
        folds = self.fold_bn and use_norm and not self.bn_group_size
        fold_norm = functools.partial(FoldedBatchNorm, **norm_options) if folds else None
        act = ACTIVATIONS[self.activation]
        pre_activation = getattr(self.block_cls, "pre_activation", False)
        stem_width = self.stem_width or self.width

        def image_conv(filters, kernel, strides, name, space_to_depth=False):
            """The convolution that reads the image: `stems.StemConv` (same parameters) where an
            option changes how it is computed, else the plain convolution."""
            if not (space_to_depth or self.pad_input_channels):
                return padded_conv(filters, (kernel, kernel), (strides, strides), name=name)
            return StemConv(
                filters,
                kernel,
                strides,
                use_bias=not use_norm,
                kernel_init=conv_kernel_init,
                space_to_depth=space_to_depth,
                pad_input_channels=self.pad_input_channels,
                dtype=self.dtype,
                name=name,
            )

        x = x.astype(self.dtype)
        if self.stem == "deep":
            x = act(norm(name="stem_bn1")(image_conv(stem_width // 2, 3, 2, "stem_conv1")(x)))
            x = act(norm(name="stem_bn2")(padded_conv(stem_width // 2, (3, 3), name="stem_conv2")(x)))
            x = padded_conv(stem_width, (3, 3), name="conv1")(x)
        else:
            kernel, strides = {"imagenet": (7, 2), "cifar": (3, 1)}[self.stem]
            blocked = self.space_to_depth and self.stem == "imagenet"
            x = image_conv(stem_width, kernel, strides, "conv1", blocked)(x)
        if folds and not pre_activation and self.stem != "cifar":
            x = PooledStemNorm(**norm_options, explicit_padding=self.explicit_pool_padding, name="bn1")(
                x, act
            )
        else:
            if not pre_activation:
                x = act(norm(name="bn1")(x))
            if self.stem != "cifar":
                x = max_pool_torch(x, self.explicit_pool_padding)

        num_blocks, index = sum(self.stage_sizes), 0
        for i, stage_size in enumerate(self.stage_sizes):
            for j in range(stage_size):
                x = self.block_cls(
                    filters=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=padded_conv,
                    norm=norm,
                    act=act,
                    shortcut=self.shortcut,
                    zero_init_residual=self.zero_init_residual,
                    groups=self.groups,
                    base_width=self.base_width,
                    stride_on=self.stride_on,
                    se_ratio=self.se_ratio,
                    drop_path=self.drop_path_rate * index / max(1, num_blocks - 1),
                    deterministic=not train,
                    fold_norm=fold_norm,
                    name=f"layer{i + 1}_{j}",
                )(x)
                index += 1

        if pre_activation:
            x = act(norm(name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0.0)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def _check_rate(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r} must be a number in [0, 1)")


def create(
    name: str,
    num_classes: int,
    *,
    dtype: str | Any = "float32",
    zero_init_residual: bool = True,
    norm: str = "batch",
    bn_group_size: int = 0,
    activation: str = "relu",
    drop_path_rate: float = 0.0,
    dropout_rate: float = 0.0,
    se_ratio: float | None = None,
    stride_on: str | None = None,
    frozen_norm: bool = False,
    fold_bn: bool = True,
    bn_form: str = "centered",
    space_to_depth: bool = False,
    pad_input_channels: int = 0,
) -> ResNet:
    """Build a registry model; the module is a pure function of params and batch_stats.

    `se_ratio` adds squeeze-and-excitation to any network (None: the registry's choice);
    `stride_on` '1x1' moves a bottleneck's stride to its first convolution (v1). `drop_path_rate`
    and `dropout_rate` act in training only (pass `rngs={'dropout': key}` to `apply`) and leave the
    parameter tree as it is. `frozen_norm` keeps BatchNorm in inference mode in training too
    (linear probing). `fold_bn` computes each BatchNorm that follows a stride-1 1x1 convolution
    (the bottlenecks' last, stride-1 projections) as one convolution with statistics from the
    input's covariance (`norms.FoldedBatchNorm`), and the ImageNet stem's BatchNorm and activation
    after its max-pool (`norms.PooledStemNorm`): the same model, fewer bytes moved. `bn_form`
    writes the other BatchNorms' normalisation as nn.BatchNorm does ("centered") or as one
    multiply-add ("affine", `norms.BatchNorm`): the same function, a different backward program.
    `space_to_depth` computes an ImageNet stem's 7x7 stride-2 convolution on 2x2 blocks of the
    image (`stems.StemConv`): the same parameters and outputs, twelve input channels.
    `pad_input_channels` (> 0) pads the image and the first convolution's kernel with zero channels
    up to that many (4: cuDNN's first-layer kernels) in the forward pass: the same parameters and outputs.
    """
    check_choice("model", name, names())
    check_choice("norm", norm, NORMS)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("bn_form", bn_form, BN_FORMS)
    if isinstance(dtype, str):
        check_choice("dtype", dtype, tuple(DTYPES))
        dtype = DTYPES[dtype]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if isinstance(bn_group_size, bool) or not isinstance(bn_group_size, int) or bn_group_size < 0:
        raise ValueError(f"bn_group_size={bn_group_size!r} must be 0 (whole batch) or a positive integer")
    if bn_group_size and norm != "batch":
        raise ValueError(f"bn_group_size={bn_group_size} needs norm='batch', not norm={norm!r}")
    if type(pad_input_channels) is not int or pad_input_channels < 0:
        raise ValueError(f"pad_input_channels={pad_input_channels!r} must be 0 (off) or a positive integer")
    _check_rate("drop_path_rate", drop_path_rate)
    _check_rate("dropout_rate", dropout_rate)
    arch = dict(MODELS[name])
    if se_ratio is not None:
        _check_rate("se_ratio", se_ratio)
        arch["se_ratio"] = se_ratio
    if stride_on is not None:
        check_choice("stride_on", stride_on, STRIDE_PLACEMENTS)
        arch["stride_on"] = stride_on
    if space_to_depth and arch["stem"] != "imagenet":
        raise ValueError(
            f"space_to_depth computes the ImageNet stem's 7x7 convolution, and {name} has the "
            f"{arch['stem']!r} stem"
        )
    return ResNet(
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
        norm=norm,
        bn_group_size=bn_group_size,
        frozen_norm=frozen_norm,
        fold_bn=fold_bn,
        bn_form=bn_form,
        space_to_depth=space_to_depth,
        pad_input_channels=pad_input_channels,
        activation=activation,
        drop_path_rate=drop_path_rate,
        dropout_rate=dropout_rate,
        dtype=dtype,
        **arch,
    )


def folds_bn(setting: str, platform: str) -> bool:
    """Whether `config.fold_bn` folds BatchNorm into 1x1 convolutions (and normalises the stem
    after its max-pool) on devices of `platform`.

    "auto" folds on TPUs, where XLA's cost analysis counts fewer HBM bytes per ResNet-50 image
    (docs/benchmarks.md); XLA's CUDA backend plans more memory for the folded step, and no GPU
    timing says it pays.
    """
    check_choice("config.fold_bn", setting, FOLD_BN)
    return setting == "on" or (setting == "auto" and platform == "tpu")


def create_model(config: Any, num_classes: int, platform: str | None = None) -> ResNet:
    """The model a checked training config describes (see `config_checks.check_config`), for
    devices of `platform` (default: JAX's default backend)."""
    return create(
        config.model,
        num_classes,
        dtype=config.dtype,
        zero_init_residual=config.zero_init_residual,
        bn_group_size=config.bn_group_size,
        activation=config.activation,
        drop_path_rate=config.drop_path_rate,
        dropout_rate=config.dropout_rate,
        frozen_norm=config.freeze_backbone,  # linear probing: BatchNorm stays as loaded
        fold_bn=folds_bn(config.fold_bn, platform or jax.default_backend()),
        bn_form=config.bn_form,
        space_to_depth=config.space_to_depth_stem,
        pad_input_channels=config.pad_input_channels,
    )


def count_params(module: nn.Module, image_size: int, channels: int = 3) -> int:
    """Number of trainable parameters, from shapes only (nothing is computed)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)))
    return param_count(shapes["params"])


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or shapes)."""
    return sum(x.size for x in jax.tree.leaves(params))


def main(argv: list[str] | None = None) -> int:
    """`python -m resnet_jax.models`: parameters and forward GFLOPs of the registry."""
    flag_values = flags.FlagValues()
    flags.DEFINE_integer("image_size", 224, "ImageNet-style nets (CIFAR nets: 32).", flag_values=flag_values)
    flags.DEFINE_integer("cifar_image_size", 32, "CIFAR-style nets.", flag_values=flag_values)
    flags.DEFINE_integer(
        "num_classes", 1000, "ImageNet-style nets (CIFAR nets: 10).", flag_values=flag_values
    )
    flags.DEFINE_list(
        "names", None, "Only these (default: all); comma- or space-separated.", flag_values=flag_values
    )
    flags.DEFINE_bool("no_flops", False, "Parameter counts only (no compiling).", flag_values=flag_values)
    more = cli.parse(
        flag_values, argv, prog="python -m resnet_jax.models", doc=main.__doc__, positional="[NAME ...]"
    )
    selected = [*(flag_values.names or []), *more] or names()

    def work() -> None:
        for name in selected:
            check_choice("model", name, names())
        print(f"{'model':<20} {'size':>5} {'params':>12} {'GFLOPs':>8}")
        start = time.perf_counter()
        for name in selected:
            cifar = is_cifar(name)
            size, classes = (
                (flag_values.cifar_image_size, 10)
                if cifar
                else (flag_values.image_size, flag_values.num_classes)
            )
            module = create(name, classes)
            flops = "" if flag_values.no_flops else costs.gflops_column(costs.forward_flops(module, size))
            print(f"{name:<20} {size:>5} {count_params(module, size) / 1e6:>11.2f}M {flops:>8}", flush=True)
        print(f"{len(selected)} models in {time.perf_counter() - start:.0f}s", file=sys.stderr)

    return cli.run(work, listing=True)


if __name__ == "__main__":
    sys.exit(main())
