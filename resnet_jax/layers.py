"""The building blocks of `models.ResNet`: blocks, shortcuts, squeeze-and-excitation, drop-path.

Blocks receive their conv and norm layers already configured (dtype, padding, BatchNorm mode), so
one block class serves every variant: v1 or v1.5 stride placement (`stride_on`), grouped and wide
bottlenecks (`groups`, `base_width`), squeeze-and-excitation (`se_ratio`), stochastic depth
(`drop_path`), and identity / projection / option-A / average-pool (ResNet-D) shortcuts. Module
names follow torchvision's and timm's (`conv1`, `bn1`, `se/fc1`) so that `weights` maps their
state dicts one to one. The BatchNorms themselves live in `norms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any
# torchvision's ResNet init: Kaiming normal, fan-out, gain sqrt(2) (He et al. 2015).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
SHORTCUTS = ("projection", "pad", "avg")  # or None: a plain block without the skip path
STRIDE_PLACEMENTS = ("3x3", "1x1")  # v1.5 (torchvision, timm) or v1 (He et al. 2015, Caffe)


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """k//2 pixels on each side, like PyTorch; XLA's 'SAME' pads strided layers asymmetrically."""
    return ((kernel_size // 2,) * 2,) * 2


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding for the squeeze-and-excitation bottleneck (nearest multiple, at least one)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
    """PyTorch's AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False): odd sizes keep their edge.

    Written as window sums over window counts (what `nn.avg_pool` computes) so that ONNX export
    sees plain reduce-window sums rather than a pooling call with explicit padding.
    """
    outputs = [-(-(size - 2) // stride) + 1 for size in x.shape[1:3]]
    pad = (
        (0, 0),
        *((0, (out - 1) * stride + 2 - size) for out, size in zip(outputs, x.shape[1:3], strict=True)),
        (0, 0),
    )
    window, strides = (1, 2, 2, 1), (1, stride, stride, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


def max_pool_torch(x: jax.Array, explicit_padding: bool = False) -> jax.Array:
    """The ImageNet stem's 3x3/2 max-pool with PyTorch's symmetric padding of 1.

    The padding belongs to the pooling window, so XLA writes no padded copy of the stem's largest
    activation (the figure is in docs/benchmarks.md). `explicit_padding` pads with -inf first and
    pools VALID instead: the same numbers, for ONNX converters that drop a pool's own padding.
    """
    if not explicit_padding:
        return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


class Identity(nn.Module):
    """Stands in for BatchNorm when `norm='none'` (accepts and ignores its options)."""

    scale_init: Callable | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class Conv1x1Kernel(nn.Module):
    """The kernel of a bias-free 1x1 `nn.Conv`, created where that module keeps it (`<name>/kernel`),
    so a folded convolution reads and writes the same parameter tree as the unfolded one."""

    in_features: int
    out_features: int

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (1, 1, self.in_features, self.out_features)
        return self.param("kernel", conv_kernel_init, shape, jnp.float32)


def conv1x1_norm(
    y: jax.Array,
    features: int,
    conv: ModuleDef,
    norm: ModuleDef,
    fold_norm: ModuleDef | None,
    names: tuple[str, str],
    strides: int = 1,
    scale_init: Callable = nn.initializers.ones,
) -> jax.Array:
    """norm(conv_1x1(y)) under the two module names, folded into one convolution where that is
    exact and cheaper: `fold_norm` given (plain BatchNorm) and stride 1. Called inside a parent's
    compact method, so the modules are the parent's children either way."""
    conv_name, norm_name = names
    if fold_norm is not None and strides == 1:
        kernel = Conv1x1Kernel(y.shape[-1], features, name=conv_name)()
        return fold_norm(scale_init=scale_init, name=norm_name)(y, kernel)
    y = conv(features, (1, 1), (strides, strides), name=conv_name)(y)
    return norm(scale_init=scale_init, name=norm_name)(y)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole branch of some examples, scale the rest.

    Identity in eval mode and at rate 0; otherwise uses the 'dropout' rng. No parameters.
    """

    rate: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
    """Hu et al. (2018): channel gates from the global average through a bottleneck (timm's SEModule)."""

    reduced: int
    conv: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(self.conv(self.reduced, (1, 1), use_bias=True, name="fc1")(s))
        s = self.conv(x.shape[-1], (1, 1), use_bias=True, name="fc2")(s)
        return x * nn.sigmoid(s)


class Shortcut(nn.Module):
    """The skip path: identity, projection (1x1 conv + norm), option A (subsample + zero-pad), or
    ResNet-D's 2x2 average pool before a stride-1 projection ('avg'). A stride-1 projection's norm
    is folded into it when `fold_norm` is given (a strided one is not: the statistics would read
    the whole input, and the slice's gradient writes it)."""

    filters: int
    strides: int
    kind: str
    conv: ModuleDef
    norm: ModuleDef
    fold_norm: ModuleDef | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] == self.filters and self.strides == 1:
            return x
        if self.kind == "pad":
            x = x[:, :: self.strides, :: self.strides, :]
            extra = self.filters - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        strides = self.strides
        if self.kind == "avg" and strides > 1:
            x, strides = avg_pool_ceil(x, strides), 1
        names = ("downsample_conv", "downsample_bn")
        return conv1x1_norm(x, self.filters, self.conv, self.norm, self.fold_norm, names, strides)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR family)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str | None = "projection"
    zero_init_residual: bool = True
    groups: int = 1  # bottlenecks only: grouped 3x3 (ResNeXt cardinality)
    base_width: int = 64  # bottlenecks only: 3x3 width = filters * base_width / 64 * groups
    stride_on: str = "3x3"  # bottlenecks only: "1x1" is v1
    se_ratio: float = 0.0  # squeeze-and-excitation on the branch output; 0 = none
    drop_path: float = 0.0  # stochastic depth rate of this block
    deterministic: bool = True  # eval mode for drop-path
    fold_norm: ModuleDef | None = None  # FoldedBatchNorm, configured like norm: fold 1x1 conv + norm pairs
    # Return the residual branch F(x) alone, where the skip path would join it (before the sum and
    # any activation after it): the Jacobian study's x -> F(x). Same parameters.
    branch_only: bool = False

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        return self._merge(x, y, "bn2")

    @property
    def out_filters(self) -> int:
        return self.filters * self.expansion

    def _branch_end(self, y: jax.Array) -> jax.Array:
        """Squeeze-and-excitation and stochastic depth, on the branch just before the sum."""
        if self.se_ratio:
            y = SqueezeExcite(make_divisible(self.out_filters * self.se_ratio), self.conv, name="se")(y)
        return DropPath(self.drop_path, self.deterministic)(y)

    def _merge(self, x: jax.Array, y: jax.Array, last_norm: str, last_conv: str | None = None) -> jax.Array:
        """The branch's last norm (after its last 1x1 conv `last_conv`, if that is still to apply),
        the skip path, the sum and the activation."""
        zero_init = self.shortcut is not None and self.zero_init_residual
        scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
        if last_conv is None:
            y = self.norm(scale_init=scale_init, name=last_norm)(y)
        else:
            names = (last_conv, last_norm)
            y = conv1x1_norm(
                y, self.out_filters, self.conv, self.norm, self.fold_norm, names, scale_init=scale_init
            )
        if self.shortcut is None:
            return y if self.branch_only else self.act(y)
        y = self._branch_end(y)
        if self.branch_only:
            return y
        skip = Shortcut(
            self.out_filters,
            self.strides,
            self.shortcut,
            self.conv,
            self.norm,
            self.fold_norm,
            name="shortcut",
        )
        return self.act(skip(x) + y)

    def _bottleneck_convs(self, x: jax.Array, norm_names: tuple[str, str], pre: Callable) -> jax.Array:
        """1x1 reduce, 3x3 (grouped), 1x1 expand by 4; the stride on the 3x3 (v1.5) or the 1x1 (v1)."""
        width = int(self.filters * self.base_width / 64) * self.groups
        s = (self.strides, self.strides)
        first, middle = (s, (1, 1)) if self.stride_on == "1x1" else ((1, 1), s)
        y = self.conv(width, (1, 1), first, name="conv1")(x)
        y = pre(y, norm_names[0])
        y = self.conv(width, (3, 3), middle, feature_group_count=self.groups, name="conv2")(y)
        return pre(y, norm_names[1])


class BottleneckBlock(BasicBlock):
    """1x1 reduce, 3x3 (carries the stride: v1.5, unless stride_on='1x1'), 1x1 expand by 4."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._bottleneck_convs(x, ("bn1", "bn2"), lambda y, name: self.act(self.norm(name=name)(y)))
        return self._merge(x, y, "bn3", last_conv="conv3")


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
        y = self._branch_end(y)
        if self.branch_only:
            return y
        filters = self.out_filters
        projects = self.shortcut != "pad" and (x.shape[-1] != filters or self.strides != 1)
        skip = Shortcut(filters, self.strides, self.shortcut, self.conv, Identity, name="shortcut")
        return skip(pre if projects else x) + y


class PreActBottleneckBlock(PreActBasicBlock):
    """Pre-activation bottleneck: norm-act before each of 1x1 reduce, 3x3 (strided), 1x1 expand."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pre = self.act(self.norm(name="bn1")(x))
        y = self._bottleneck_convs(pre, ("bn2", "bn3"), lambda y, name: self.act(self.norm(name=name)(y)))
        y = self.conv(self.out_filters, (1, 1), name="conv3", **self._last_conv_options())(y)
        return self._add_skip(x, pre, y)


PRE_ACTIVATION = {BasicBlock: PreActBasicBlock, BottleneckBlock: PreActBottleneckBlock}
