"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), on the device inside the train step.

Each batch is mixed with itself reversed, with one lambda for the whole batch (timm's "batch"
mode): no second batch to load, and under a sharded batch the reversal is one collective
permute. The targets become the matching mixture of one-hot labels, so the label mass of every
example stays 1. Evaluation never mixes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mixing:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5  # with both alphas: the probability of cutmix
    prob: float = 1.0  # the probability that a batch is mixed at all

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @classmethod
    def from_config(cls, config: Any) -> Mixing:
        """The config keys `mixup_alpha`, `cutmix_alpha`, `mixup_switch_prob` and `mixup_prob`."""
        return cls(
            mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha,
            switch_prob=config.mixup_switch_prob,
            prob=config.mixup_prob,
        )


def cutmix_mask(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """A box of about (1 - lam) of the image, centred uniformly (clipped at the borders).

    Returns the (H, W) mask (True: take the partner image) and lambda corrected to the box's
    actual area, which clipping can shrink.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(key)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return mask, 1.0 - mask.mean()


def mix_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, mixing: Mixing
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(images, targets, lam): NHWC images mixed with the reversed batch, soft (B, C) targets."""
    one_hot = jax.nn.one_hot(labels, num_classes)
    if not mixing.enabled:
        return images, one_hot, jnp.ones(())
    key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(key, 5)
    partner = images[::-1]
    mixed = []  # (images, lam) for each method that is on
    if mixing.mixup_alpha > 0:
        lam = jax.random.beta(key_mixup, mixing.mixup_alpha, mixing.mixup_alpha)
        mixed.append((lam * images + (1 - lam) * partner, lam))
    if mixing.cutmix_alpha > 0:
        lam = jax.random.beta(key_cutmix, mixing.cutmix_alpha, mixing.cutmix_alpha)
        mask, lam = cutmix_mask(key_box, lam, images.shape[1], images.shape[2])
        mixed.append((jnp.where(mask[None, :, :, None], partner, images), lam))
    out, lam = mixed[0]
    if len(mixed) == 2:
        use_cutmix = jax.random.bernoulli(key_switch, mixing.switch_prob)
        out, lam = jnp.where(use_cutmix, mixed[1][0], out), jnp.where(use_cutmix, mixed[1][1], lam)
    if mixing.prob < 1:
        apply = jax.random.bernoulli(key_apply, mixing.prob)
        out, lam = jnp.where(apply, out, images), jnp.where(apply, lam, 1.0)
    targets = lam * one_hot + (1 - lam) * one_hot[::-1]
    return out.astype(images.dtype), targets, lam
