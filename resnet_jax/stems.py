"""The convolution that reads the image, computed in a form that suits the hardware better, with
the parameters of the `nn.Conv` it replaces.

Space-to-depth (Google's MLPerf ResNet in JAX): a 7x7 stride-2 convolution of an H x W x C image
equals a 4x4 stride-1 convolution of the H/2 x W/2 x 4C image of its 2x2 blocks, with the kernel
padded to 8x8 and cut the same way. Three input channels use a matrix unit poorly; twelve use it
four times better.

Channel padding (NVIDIA's MLPerf ResNet pads 3 to 4): zero channels added to the image and zero
input channels to the kernel change no output, and cuDNN's first-layer NHWC kernels want C = 4;
XLA's CUDA backend passes a 3-channel image to cuDNN as it is.

Both pad or cut the kernel inside the forward pass: the parameter stays the kernel of the image's
channels, so checkpoints and imported torchvision weights load unchanged, and the outputs and
gradients are the same up to float rounding (tested in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.errors import ConfigError
from resnet_jax.layers import torch_padding


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


def pad_channels(x: jax.Array, kernel: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
    """The (N, H, W, C) image and its (k, k, C, O) kernel with zero channels up to `channels`."""
    extra = channels - x.shape[-1]
    if extra < 0:
        raise ConfigError(
            f"pad_input_channels={channels} is fewer than the image's {x.shape[-1]} channels: "
            f"use 0 (off) or at least {x.shape[-1]}"
        )
    return (
        jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))),
        jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0))),
    )


class StemConv(nn.Module):
    """Drop-in for the stem's `nn.Conv(features, (k, k), (s, s), padding=k // 2)`: same parameters.

    `pad_input_channels` (> 0) pads the image and the kernel with zero channels up to that many;
    `space_to_depth` computes a 7x7 stride-2 convolution on 2x2 blocks of the (padded) image.
    """

    features: int
    kernel_size: int
    strides: int
    use_bias: bool
    kernel_init: Callable[..., jax.Array]
    space_to_depth: bool = False
    pad_input_channels: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        if self.pad_input_channels:
            x, kernel = pad_channels(x, kernel, self.pad_input_channels)
        strides, padding = (self.strides,) * 2, torch_padding(k)
        if self.space_to_depth:
            if (k, self.strides) != (7, 2):
                raise ValueError(
                    f"space-to-depth needs a 7x7 stride-2 convolution, not {k}x{k}/{self.strides}"
                )
            x, kernel, strides, padding = space_to_depth(x), blocked_kernel(kernel), (1, 1), ((2, 1), (2, 1))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=strides,
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
                self.dtype
            )
        return y
