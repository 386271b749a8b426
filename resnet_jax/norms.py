"""BatchNorm as the models compute it: the same variables as `nn.BatchNorm` (params `scale`,
`bias`; batch_stats `mean`, `var`) in every form, so checkpoints and imported weights carry over.

`BatchNorm` writes the normalisation as one multiply-add per element (`BN_FORMS`, for the GPU's
backward pass), `GhostBatchNorm` takes statistics over groups of examples, `PooledStemNorm`
normalises the ImageNet stem after its max-pool and `FoldedBatchNorm` computes a stride-1 1x1
convolution and the BatchNorm after it as one convolution (see their docstrings;
docs/benchmarks.md has the HBM traffic they save).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.layers import max_pool_torch

# How the normalisation is written, the same function either way: "centered" is nn.BatchNorm's
# (x - mean) * a + bias, "affine" is x * a + (bias - mean * a), with a = scale / std.
BN_FORMS = ("centered", "affine")


class BatchNormVariables(nn.Module):
    """`nn.BatchNorm`'s options and variables (params `scale`, `bias`; batch_stats `mean`, `var`, all
    float32), shared by the BatchNorms written here so checkpoints and imported weights carry over."""

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    form: str = "centered"  # one of BN_FORMS

    def norm_variables(self, features: int) -> tuple[Any, Any, jax.Array, jax.Array]:
        """(running mean, running var, scale, bias), created on first use."""
        shape = (features,)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
        scale = self.param("scale", self.scale_init, shape, jnp.float32)
        bias = self.param("bias", self.bias_init, shape, jnp.float32)
        return ra_mean, ra_var, scale, bias

    def update_running(self, ra_mean: Any, ra_var: Any, mean: jax.Array, var: jax.Array) -> None:
        """Move the running statistics towards this batch's (not while initialising)."""
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var

    def normalize(
        self, x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array
    ) -> jax.Array:
        """(x - mean) / std * scale + bias, written in `self.form` (`BN_FORMS`)."""
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
        if self.form == "affine":
            return x * multiplier + (bias - mean * multiplier)
        return (x - mean) * multiplier + bias


class BatchNorm(BatchNormVariables):
    """`nn.BatchNorm` over all axes but the last, in either of `BN_FORMS`.

    The forms differ in what autodiff makes of them. Differentiating the affine form gives the
    two per-channel reductions of the backward pass, sum(g) and sum(g * x), the same inputs, and
    XLA's CUDA backend then computes them in one reduction: fewer kernels and bytes per step
    (docs/benchmarks.md). The models use `nn.BatchNorm` itself for the centered form, the one the
    published timings ran.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ra_mean, ra_var, scale, bias = self.norm_variables(x.shape[-1])
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = _moments(x32, tuple(range(x.ndim - 1)))
            self.update_running(ra_mean, ra_var, mean, var)
        return self.normalize(x32, mean, var, scale, bias).astype(self.dtype)


class GhostBatchNorm(BatchNormVariables):
    """BatchNorm whose training statistics come from groups of `group_size` consecutive examples.

    Hoffer et al. (2017)'s "ghost" BatchNorm, and what pmap codes and the MLPerf ResNet recipe get
    from per-device statistics. The variables are `nn.BatchNorm`'s (params `scale`, `bias`;
    batch_stats `mean`, `var`), so checkpoints and imported weights carry over; the running
    statistics move towards the average of the groups' statistics. Reshaping the batch into
    groups keeps a batch sharded over devices local as long as each device holds whole groups:
    no `shard_map` and no communication beyond the running averages.
    """

    group_size: int = 1
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean, ra_var, scale, bias = self.norm_variables(x.shape[-1])
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
            mean, var = _moments(groups, tuple(range(1, groups.ndim - 1)), keepdims=True)
            self.update_running(
                ra_mean, ra_var, mean.mean(0).reshape(features), var.mean(0).reshape(features)
            )
        y = self.normalize(groups, mean, var, scale, bias)
        return y.reshape(x.shape).astype(self.dtype)


def _moments(x: jax.Array, axes: tuple[int, ...], keepdims: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance as `nn.BatchNorm` computes them (E[x^2] - E[x]^2, clipped at 0)."""
    mean = x.mean(axes, keepdims=keepdims)
    return mean, jnp.maximum(0.0, jnp.square(x).mean(axes, keepdims=keepdims) - jnp.square(mean))


class PooledStemNorm(BatchNormVariables):
    """The ImageNet stem's BatchNorm, activation and 3x3/2 max-pool, normalised after the pooling.

    Per channel, act(a * y + b) with a = scale / std is monotone in y: non-decreasing where a >= 0,
    non-increasing where a < 0. Flipping the sign of those channels (y' = sign(scale) * y) makes
    every channel non-decreasing, and a max-pool commutes with a non-decreasing function:
    max-pool(act(a * y + b)) = act(|a| * max-pool(y') + b). So the normalisation and activation
    run on the pooled activation, a quarter of the convolution's output, and nothing of that size
    but the convolution's output itself is written. The statistics still come from the whole y
    (the running mean is sign(scale) * mean(y')); forward values are BatchNorm-then-pool's, and so
    are the gradients except where a pooling window holds ties. Variables are `nn.BatchNorm`'s.
    """

    explicit_padding: bool = False  # max_pool_torch's option, for ONNX export

    @nn.compact
    def __call__(self, y: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
        ra_mean, ra_var, scale, bias = self.norm_variables(y.shape[-1])
        sign = jnp.where(scale < 0, -1.0, 1.0)
        flipped = y * sign.astype(y.dtype)
        if self.use_running_average:
            flipped_mean, var = ra_mean.value * sign, ra_var.value
        else:
            flipped_mean, var = _moments(flipped.astype(jnp.promote_types(y.dtype, jnp.float32)), (0, 1, 2))
            self.update_running(ra_mean, ra_var, flipped_mean * sign, var)
        pooled = max_pool_torch(flipped, self.explicit_padding)
        magnitude = jax.lax.rsqrt(var + self.epsilon) * jnp.abs(scale)
        return act(((pooled - flipped_mean) * magnitude + bias).astype(self.dtype))


class FoldedBatchNorm(BatchNormVariables):
    """`nn.BatchNorm` applied to a stride-1 1x1 convolution of `x`, computed as one convolution.

    y = x @ w is linear, so its batch statistics follow from the input's: mean(y) = mean(x) @ w and
    var(y) = diag(w^T cov(x) w), where cov(x) is a c_in x c_in matrix. The normalisation then folds
    into the kernel and a bias, so y itself is never written: the convolution's output is already
    normalised (and, in a bottleneck, XLA fuses the residual add and ReLU into it). On the backward
    pass autodiff reads x and the cotangent instead of re-reading y three times. The mathematics is
    BatchNorm's, including the gradient through the statistics; only float rounding differs.

    The covariance is centred before the quadratic form: E[y^2] - mean(y)^2 would cancel badly when
    |mean(y)| >> std(y), which a 1x1 convolution of ReLU outputs often gives. Variables are
    `nn.BatchNorm`'s (`scale`, `bias`; `mean`, `var` in batch_stats), and the kernel is passed in
    (`Conv1x1Kernel`), so checkpoints and imported weights are unchanged.
    """

    @nn.compact
    def __call__(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        ra_mean, ra_var, scale, bias = self.norm_variables(kernel.shape[-1])
        x = x.astype(self.dtype)
        w = kernel.reshape(kernel.shape[-2:]).astype(jnp.promote_types(self.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = _conv_statistics(x, w)
            self.update_running(ra_mean, ra_var, mean, var)
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
        folded = (kernel * multiplier).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x, folded, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return (y + (bias - mean * multiplier)).astype(self.dtype)


def _conv_statistics(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Batch mean and (biased) variance of x @ w over N, H, W, in w's dtype (float32 or wider),
    without computing x @ w.

    The Gram matrix accumulates at full precision (exact products for bfloat16 inputs, and no
    bfloat16 passes for float32 ones on TPU); it and the quadratic form are c_in-sized.
    """
    count = x.size // x.shape[-1]
    highest = jax.lax.Precision.HIGHEST
    mean_in = jnp.sum(x, axis=(0, 1, 2), dtype=w.dtype) / count
    gram = jnp.einsum("nhwi,nhwj->ij", x, x, precision=highest, preferred_element_type=w.dtype)
    cov = gram / count - jnp.outer(mean_in, mean_in)
    mean = jnp.dot(mean_in, w, precision=highest)
    var = jnp.sum(w * jnp.dot(cov, w, precision=highest), axis=0)
    return mean, jnp.maximum(var, 0.0)
