"""Optimizers and learning-rate schedules from config, composed from optax transforms.

The chain is always: clip (optional) -> coupled L2 decay (optional, masked) ->
the optimizer's scaling -> learning-rate schedule. Optimizers that define their
own decoupled decay (AdamW, LARS, LAMB) receive the decay and the mask instead.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from resnet_jax.models import check_choice

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lars", "lamb")
SCHEDULES = ("cosine", "constant", "linear")
DECOUPLED = ("adamw", "lars", "lamb")


def kernel_mask(params: Any) -> Any:
    """True for convolution and dense kernels: what weight decay applies to.

    BatchNorm scales and biases, and all biases, are left alone (Goyal et al. 2017).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def warmup_steps(config: Any, steps_per_epoch: int, total_steps: int) -> int:
    """Warmup in steps, clipped so that at least one step follows it."""
    return max(0, min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1))


def create_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    check_choice("lr_schedule", config.lr_schedule, SCHEDULES)
    peak = config.learning_rate
    warmup = warmup_steps(config, steps_per_epoch, total_steps)
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=0.0)
    after = {
        "constant": optax.constant_schedule(peak),
        "linear": optax.linear_schedule(peak, 0.0, total_steps - warmup),
    }[config.lr_schedule]
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _scale_by(name: str, lr: optax.Schedule, wd: float, config: Any) -> optax.GradientTransformation:
    momentum = config.get("momentum", 0.9)
    b1, b2, eps = config.get("b1", 0.9), config.get("b2", 0.999), config.get("eps", 1e-8)
    return {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum),
        "nesterov": lambda: optax.sgd(lr, momentum, nesterov=True),
        "adagrad": lambda: optax.adagrad(lr, eps=eps),
        "rmsprop": lambda: optax.rmsprop(lr, decay=config.get("rmsprop_decay", 0.9), eps=eps),
        "adam": lambda: optax.adam(lr, b1, b2, eps),
        "adamw": lambda: optax.adamw(lr, b1, b2, eps, weight_decay=wd, mask=kernel_mask),
        "lars": lambda: optax.lars(
            lr,
            weight_decay=wd,
            weight_decay_mask=kernel_mask,
            trust_coefficient=config.get("trust_coefficient", 0.001),
            trust_ratio_mask=kernel_mask,
            momentum=momentum,
        ),
        "lamb": lambda: optax.lamb(lr, b1, b2, eps, weight_decay=wd, mask=kernel_mask),
    }[name]()


def create(
    config: Any, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (returned too, for logging the learning rate)."""
    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    schedule = create_schedule(config, steps_per_epoch, total_steps)
    wd = config.weight_decay
    chain = []
    if config.get("grad_clip_norm", 0.0):
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if wd and config.optimizer not in DECOUPLED:
        chain.append(optax.add_decayed_weights(wd, mask=kernel_mask))
    chain.append(_scale_by(config.optimizer, schedule, wd, config))
    return optax.chain(*chain), schedule
