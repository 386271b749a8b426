"""The ImageNet stem's 7x7 stride-2 convolution computed on 2x2 blocks of the image (space-to-depth).

A 7x7 stride-2 convolution of an H x W x C image equals a 4x4 stride-1 convolution of the
H/2 x W/2 x 4C image of its 2x2 blocks, with the kernel padded to 8x8 and cut the same way (Google's
MLPerf ResNet in JAX). Three input channels use a matrix unit poorly; twelve use it four times
better. The parameter stays the 7x7 kernel, so checkpoints and imported torchvision weights load
unchanged, and the outputs are the same up to float rounding (tested in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def space_to_depth(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, W/2, 4C): each 2x2 block's pixels as channels, (row, column, channel)."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"the space-to-depth stem needs even image sides, not {h}x{w}")
    return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)


def blocked_kernel(kernel: jax.Array) -> jax.Array:
    """A (7, 7, C, O) stride-2 kernel as the (4, 4, 4C, O) stride-1 kernel of the blocked image.

    Output pixel i of the 7x7 convolution (PyTorch's padding of 3) reads input 2i + k - 3, k = 0..6.
    With one zero tap in front (j = k + 1 = 2a + r) that is block i + a - 2 at offset r, a = 0..3.
    """
    padded = jnp.pad(kernel, ((1, 0), (1, 0), (0, 0), (0, 0)))
    c, o = kernel.shape[2:]
    return padded.reshape(4, 2, 4, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, o)


class SpaceToDepthConv(nn.Module):
    """Drop-in for the stem's `nn.Conv(features, (7, 7), (2, 2), padding=3)`: same parameters."""

    features: int
    use_bias: bool
    kernel_init: Callable[..., jax.Array]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (7, 7, channels, self.features), jnp.float32)
        y = jax.lax.conv_general_dilated(
            space_to_depth(x).astype(self.dtype),
            blocked_kernel(kernel).astype(self.dtype),
            window_strides=(1, 1),
            padding=((2, 1), (2, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
                self.dtype
            )
        return y
