"""The ResNet family as one composable Flax Linen module.

Every network is `ResNet` with a stem, a block class, stage sizes and a shortcut
kind; conv and norm layers are injected so that dtype, normalisation and
initialisation change in one place. Layer names follow torchvision
(`conv1`, `bn1`, `layer1_0/conv1`, `downsample_conv`, `fc`) so that weights can
be mapped one to one.

Padding follows PyTorch (k//2 on each side) rather than XLA's 'SAME', which pads
strided layers asymmetrically; it is what makes imported weights reproduce
PyTorch's outputs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
}
NORMS = ("batch", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# float64 is for gradient checks under jax.enable_x64; it is not a training choice.

# torchvision's ResNet init: Kaiming normal, fan-out, gain sqrt(2).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((kernel_size // 2,) * 2,) * 2


class Identity(nn.Module):
    """Stands in for BatchNorm when `norm='none'` (accepts and ignores its options)."""

    scale_init: Callable | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class GhostBatchNorm(nn.Module):
    """BatchNorm whose training statistics come from groups of `group_size` consecutive examples.

    Hoffer et al. (2017)'s "ghost" BatchNorm, and what pmap codes and the MLPerf ResNet recipe get
    from per-device statistics. The variables are `nn.BatchNorm`'s (params `scale`, `bias`;
    batch_stats `mean`, `var`), so checkpoints and imported weights carry over; the running
    statistics move towards the average of the groups' statistics. Reshaping the batch into
    groups keeps a batch sharded over devices local as long as each device holds whole groups:
    no `shard_map` and no communication beyond the running averages.
    """

    group_size: int
    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", self.bias_init, features, jnp.float32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var, groups = ra_mean.value, ra_var.value, x32
        else:
            if x.shape[0] % self.group_size:
                raise ValueError(
                    f"bn_group_size={self.group_size} does not divide the batch of {x.shape[0]} examples "
                    f"reaching {self.name}"
                )
            groups = x32.reshape(x.shape[0] // self.group_size, self.group_size, *x.shape[1:])
            axes = tuple(range(1, groups.ndim - 1))
            mean = groups.mean(axes, keepdims=True)
            var = jnp.maximum(0.0, jnp.square(groups).mean(axes, keepdims=True) - jnp.square(mean))
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0).reshape(features)
                ra_var.value = m * ra_var.value + (1 - m) * var.mean(0).reshape(features)
        y = (groups - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.reshape(x.shape).astype(self.dtype)


class Shortcut(nn.Module):
    """The skip path: identity, projection (1x1 conv + norm), or option A (subsample + zero-pad)."""

    filters: int
    strides: int
    kind: str  # "projection" or "pad"
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] == self.filters and self.strides == 1:
            return x
        if self.kind == "pad":
            x = x[:, :: self.strides, :: self.strides, :]
            extra = self.filters - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        x = self.conv(self.filters, (1, 1), (self.strides, self.strides), name="downsample_conv")(x)
        return self.norm(name="downsample_bn")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR family)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str | None = "projection"  # None: a plain block without the skip path
    zero_init_residual: bool = True

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        return self._merge(x, y, "bn2")

    def _merge(self, x: jax.Array, y: jax.Array, last_norm: str) -> jax.Array:
        if self.shortcut is None:
            return self.act(self.norm(name=last_norm)(y))
        zero = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=zero, name=last_norm)(y)
        filters = self.filters * self.expansion
        skip = Shortcut(filters, self.strides, self.shortcut, self.conv, self.norm, name="shortcut")(x)
        return self.act(skip + y)


class BottleneckBlock(BasicBlock):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        return self._merge(x, y, "bn3")


class PreActBasicBlock(BasicBlock):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): y = x + F(x), nothing after.

    F is norm-act-conv twice. With an identity shortcut dy/dx = I + dF/dx exactly, which is what
    carries the gradient through deep stacks; v1's activation after the sum multiplies it by act'
    in every block. A projection shortcut reads the pre-activated input; option A reads x itself.
    `zero_init_residual` zeroes the last conv kernel (there is no norm after it to zero).
    """

    pre_activation = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pre = self.act(self.norm(name="bn1")(x))
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(pre)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters, (3, 3), name="conv2", **self._last_conv_options())(y)
        return self._add_skip(x, pre, y)

    def _last_conv_options(self) -> dict[str, Any]:
        zero = self.zero_init_residual and self.shortcut is not None
        return {"kernel_init": nn.initializers.zeros} if zero else {}

    def _add_skip(self, x: jax.Array, pre: jax.Array, y: jax.Array) -> jax.Array:
        if self.shortcut is None:
            return y
        filters = self.filters * self.expansion
        projects = self.shortcut == "projection" and (x.shape[-1] != filters or self.strides != 1)
        skip = Shortcut(filters, self.strides, self.shortcut, self.conv, Identity, name="shortcut")
        return skip(pre if projects else x) + y


class PreActBottleneckBlock(PreActBasicBlock):
    """Pre-activation bottleneck: norm-act before each of 1x1 reduce, 3x3 (strided), 1x1 expand."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pre = self.act(self.norm(name="bn1")(x))
        y = self.conv(self.filters, (1, 1), name="conv1")(pre)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv2")(y)
        y = self.act(self.norm(name="bn3")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3", **self._last_conv_options())(y)
        return self._add_skip(x, pre, y)


PRE_ACTIVATION = {BasicBlock: PreActBasicBlock, BottleneckBlock: PreActBottleneckBlock}


class ResNet(nn.Module):
    """A ResNet: stem, stages of blocks, global average pool, linear classifier.

    With pre-activation blocks the stem has no norm-act (the first block's pre-activation does it)
    and a final norm-act comes before the pool, since the last block's output is a bare sum.
    """

    stage_sizes: Sequence[int]
    block_cls: type[BasicBlock]
    num_classes: int
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": one 3x3 conv
    width: int = 64
    shortcut: str | None = "projection"
    zero_init_residual: bool = True
    norm: str = "batch"
    bn_group_size: int = 0  # 0: statistics over the whole batch; k: over groups of k examples
    activation: str = "relu"
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

        batch_norm = (
            functools.partial(GhostBatchNorm, group_size=self.bn_group_size)
            if self.bn_group_size
            else nn.BatchNorm
        )
        norm = (
            functools.partial(
                batch_norm,
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
            )
            if use_norm
            else Identity
        )
        act = ACTIVATIONS[self.activation]
        pre_activation = getattr(self.block_cls, "pre_activation", False)

        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = padded_conv(self.width, (7, 7), (2, 2), name="conv1")(x)
            if not pre_activation:
                x = act(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=torch_padding(3))
        else:
            x = padded_conv(self.width, (3, 3), name="conv1")(x)
            if not pre_activation:
                x = act(norm(name="bn1")(x))

        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    filters=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=padded_conv,
                    norm=norm,
                    act=act,
                    shortcut=self.shortcut,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                )(x)

        if pre_activation:
            x = act(norm(name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


# Registry name prefixes, in the order `names()` lists them.
FAMILIES = ("resnet", "preact_resnet", "plain")
# name -> (stage sizes, block, stem, width, shortcut kind)
_IMAGENET_STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
    200: ((3, 24, 36, 3), BottleneckBlock),
}
# He et al. 2016, Sec. 4.2: 6n+2 layers, 16/32/64 filters, option-A shortcuts.
_CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def _registry() -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for depth, (stages, block) in _IMAGENET_STAGES.items():
        arch = dict(stage_sizes=stages, block_cls=block, stem="imagenet", width=64)
        entries[f"resnet{depth}"] = dict(arch, shortcut="projection")
        entries[f"plain{depth}"] = dict(arch, shortcut=None)
        entries[f"preact_resnet{depth}"] = dict(arch, block_cls=PRE_ACTIVATION[block], shortcut="projection")
    for depth in _CIFAR_DEPTHS:
        n = (depth - 2) // 6
        arch = dict(stage_sizes=(n, n, n), block_cls=BasicBlock, stem="cifar", width=16)
        entries[f"resnet{depth}"] = dict(arch, shortcut="pad")
        entries[f"plain{depth}"] = dict(arch, shortcut=None)
        # Option A like the v1 CIFAR nets, so that the two differ only in the block.
        entries[f"preact_resnet{depth}"] = dict(arch, block_cls=PreActBasicBlock, shortcut="pad")

    def family_then_depth(name: str) -> tuple[str, int]:
        family, depth = re.fullmatch(r"([a-z_]+)(\d+)", name).groups()
        return FAMILIES.index(family), int(depth)

    return {name: entries[name] for name in sorted(entries, key=family_then_depth)}


MODELS = _registry()


def names() -> list[str]:
    """Every name `create` accepts."""
    return list(MODELS)


def check_choice(key: str, value: Any, valid: Sequence[str]) -> None:
    """Raise a ValueError naming the key, the bad value and the valid choices."""
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def create(
    name: str,
    num_classes: int,
    *,
    dtype: str | Any = "float32",
    zero_init_residual: bool = True,
    norm: str = "batch",
    bn_group_size: int = 0,
    activation: str = "relu",
) -> ResNet:
    """Build a registry model; the module is a pure function of params and batch_stats."""
    check_choice("model", name, names())
    check_choice("norm", norm, NORMS)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    if isinstance(dtype, str):
        check_choice("dtype", dtype, tuple(DTYPES))
        dtype = DTYPES[dtype]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if isinstance(bn_group_size, bool) or not isinstance(bn_group_size, int) or bn_group_size < 0:
        raise ValueError(f"bn_group_size={bn_group_size!r} must be 0 (whole batch) or a positive integer")
    if bn_group_size and norm != "batch":
        raise ValueError(f"bn_group_size={bn_group_size} needs norm='batch', not norm={norm!r}")
    return ResNet(
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
        norm=norm,
        bn_group_size=bn_group_size,
        activation=activation,
        dtype=dtype,
        **MODELS[name],
    )


def count_params(module: nn.Module, image_size: int, channels: int = 3) -> int:
    """Number of trainable parameters, from shapes only (nothing is computed)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))
