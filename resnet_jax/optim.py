"""Optimizers and learning-rate schedules from config, composed from optax transforms.

Every optimizer is the same chain, with the pieces it needs switched on:

    clip by global norm -> coupled L2 decay -> preconditioner (momentum, Adagrad, RMSprop, Adam)
    -> decoupled decay -> trust ratio (LARS, LAMB) -> learning-rate schedule -> momentum after
    the learning rate (LARS)

so that, say, AdamW is Adam with the decay moved after the preconditioner, and LAMB is AdamW with
a trust ratio. Weight decay and the trust ratio apply to convolution and dense kernels only
(BatchNorm and biases are left alone, as in Goyal et al. 2017 and the MLPerf LARS recipe).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lars", "lamb")
SCHEDULES = ("constant", "step", "cosine", "linear", "polynomial", "onecycle")
WEIGHT_DECAY_MODES = ("auto", "coupled", "decoupled")
WEIGHT_DECAY_MASKS = ("kernels", "all")
WARMUP_STYLES = ("linear", "constant")

# Used when config.learning_rate / config.weight_decay are left unset (None). Learning rates are
# for the global batch: SGD's 0.1 is He et al.'s for batch 128-256; LARS and LAMB multiply theirs
# by a per-layer trust ratio, so their nominal rates are larger.
DEFAULT_LEARNING_RATES = {
    "sgd": 0.1,
    "momentum": 0.1,
    "nesterov": 0.1,
    "adagrad": 0.01,
    "rmsprop": 1e-3,
    "adam": 1e-3,
    "adamw": 1e-3,
    "lars": 2.0,
    "lamb": 4e-3,
}
DEFAULT_WEIGHT_DECAYS = {
    "sgd": 1e-4,
    "momentum": 1e-4,
    "nesterov": 1e-4,
    "adagrad": 0.0,
    "rmsprop": 1e-5,
    "adam": 0.0,
    "adamw": 0.05,
    "lars": 5e-5,
    "lamb": 0.02,
}
# Each optimizer's own epsilon (optax's defaults; LAMB's from You et al. 2020).
DEFAULT_EPS = {"adagrad": 1e-7, "rmsprop": 1e-8, "adam": 1e-8, "adamw": 1e-8, "lamb": 1e-6}
# LARS's eta (You et al. 2017); LAMB uses the plain ratio ||w|| / ||update||.
DEFAULT_TRUST_COEFFICIENTS = {"lars": 1e-3, "lamb": 1.0}
DECOUPLED_BY_DEFAULT = ("adamw", "lars", "lamb")
TRUST_RATIO = ("lars", "lamb")


def kernel_mask(params: Any) -> Any:
    """True for convolution and dense kernels: what weight decay and trust ratios apply to."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def setting(config: Any, key: str, defaults: dict[str, float]) -> float | None:
    """`config[key]`, or the optimizer's own default when it is unset (None)."""
    value = config[key]
    return defaults.get(config.optimizer) if value is None else float(value)


def learning_rate(config: Any) -> float:
    """The peak learning rate: `config.learning_rate`, or the optimizer's default when unset."""
    return setting(config, "learning_rate", DEFAULT_LEARNING_RATES)


def weight_decay(config: Any) -> float:
    return setting(config, "weight_decay", DEFAULT_WEIGHT_DECAYS)


def weight_decay_mode(config: Any) -> str:
    """'coupled' (L2 added to the gradient) or 'decoupled' (Loshchilov & Hutter: beside the step)."""
    mode = config.weight_decay_mode
    if mode == "auto":
        return "decoupled" if config.optimizer in DECOUPLED_BY_DEFAULT else "coupled"
    return mode


def warmup_steps(config: Any, steps_per_epoch: int, total_steps: int) -> int:
    """Warmup in steps, clipped so that at least one step follows it."""
    return max(0, min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1))


def create_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Warmup (linear from `warmup_factor` x peak, or constant at it), then the decay.

    Decays end at `lr_end_factor` x peak at the last step; `step` multiplies by `lr_decay_factor`
    at each epoch of `lr_step_epochs`. `onecycle` is Smith's cosine one-cycle: it rises over the
    warmup (30 % of the run when `warmup_epochs` is 0) from peak/25 and falls to peak/25e4.
    """
    name = config.lr_schedule
    peak = learning_rate(config)
    warmup = warmup_steps(config, steps_per_epoch, total_steps)
    if name == "onecycle":
        rise = warmup / total_steps if warmup else 0.3
        return optax.cosine_onecycle_schedule(total_steps, peak, pct_start=rise)
    decay_steps = total_steps - warmup
    end = peak * config.lr_end_factor
    if name == "constant":
        after = optax.constant_schedule(peak)
    elif name == "step":
        boundaries = [round(e * steps_per_epoch) - warmup for e in config.lr_step_epochs]
        factor = config.lr_decay_factor
        # A boundary past the run's end never fires; kept, a far one would overflow the int32 step.
        fired = {max(0, b): factor for b in boundaries if b <= decay_steps}
        after = optax.piecewise_constant_schedule(peak, fired)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif name == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.polynomial_schedule(peak, end, config.lr_power, decay_steps)
    if not warmup:
        return after
    start = peak * config.warmup_factor
    if config.warmup_style == "linear":
        rise = optax.linear_schedule(start, peak, warmup)
    else:
        rise = optax.constant_schedule(start)
    return optax.join_schedules([rise, after], [warmup])


def preconditioner(config: Any) -> optax.GradientTransformation:
    """The optimizer's own scaling of the gradient, before the learning rate."""
    name, momentum = config.optimizer, config.momentum
    eps = setting(config, "eps", DEFAULT_EPS)
    b1, b2 = config.b1, config.b2
    if name in ("momentum", "nesterov"):
        return optax.trace(momentum, nesterov=name == "nesterov")
    if name == "adagrad":
        return optax.scale_by_rss(config.adagrad_initial_accumulator, eps)
    if name == "rmsprop":
        return optax.scale_by_rms(config.rmsprop_decay, eps)
    if name in ("adam", "adamw", "lamb"):
        return optax.scale_by_adam(b1, b2, eps)
    return optax.identity()  # sgd; lars takes its momentum after the learning rate


def create(
    config: Any, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (returned too, for logging the learning rate)."""
    name = config.optimizer
    schedule = create_schedule(config, steps_per_epoch, total_steps)
    wd, mode = weight_decay(config), weight_decay_mode(config)
    decay = optax.add_decayed_weights(wd, mask=kernel_mask if config.weight_decay_mask == "kernels" else None)
    chain = []
    if config.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if wd and mode == "coupled":
        chain.append(decay)
    chain.append(preconditioner(config))
    if wd and mode == "decoupled":
        chain.append(decay)
    if name in TRUST_RATIO:
        coefficient = setting(config, "trust_coefficient", DEFAULT_TRUST_COEFFICIENTS)
        trust = optax.scale_by_trust_ratio(trust_coefficient=coefficient)
        chain.append(optax.masked(trust, kernel_mask))
    chain.append(optax.scale_by_learning_rate(schedule))
    if name == "lars":
        chain.append(optax.trace(config.momentum))
    return optax.chain(*chain), schedule
