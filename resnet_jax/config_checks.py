"""Up-front checks of a training config: every bad value fails here, before any data or compile."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from resnet_jax import augment, data, models, optim, progress
from resnet_jax.errors import ConfigError, check_choice

# key, low (inclusive), high (exclusive); None values (the optimizer's defaults) are not checked.
RANGES = (
    ("label_smoothing", 0.0, 1.0),
    ("learning_rate", 1e-12, float("inf")),
    ("weight_decay", 0.0, float("inf")),
    ("momentum", 0.0, 1.0),
    ("warmup_factor", 0.0, 1.0 + 1e-9),
    ("lr_end_factor", 0.0, 1.0 + 1e-9),
    ("lr_decay_factor", 0.0, 1.0 + 1e-9),
    ("grad_clip_norm", 0.0, float("inf")),
    ("mixup_alpha", 0.0, float("inf")),
    ("cutmix_alpha", 0.0, float("inf")),
    ("mixup_switch_prob", 0.0, 1.0 + 1e-9),
    ("mixup_prob", 0.0, 1.0 + 1e-9),
    ("ema_decay", 0.0, 1.0),
    ("drop_path_rate", 0.0, 1.0),
    ("dropout_rate", 0.0, 1.0),
    ("loss_scale_init", 1.0, float("inf")),
)


def _positive_int(config: Any, key: str) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.{key}={value!r} must be a positive integer")


def check_workdir(workdir: str) -> None:
    """Create the workdir and prove it is writable (read-only or full disks fail here)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} cannot be written: {e.strerror or e}") from None


def check_config(config: Any, workdir: str | None = None) -> None:
    """Raise `ConfigError` for the first bad value of `config` (and the workdir, if given)."""
    try:
        check_choice("config.model", config.model, models.names())
        check_choice("config.dtype", config.dtype, tuple(models.DTYPES))
        check_choice("config.activation", config.get("activation", "relu"), tuple(models.ACTIVATIONS))
        check_choice("config.optimizer", config.optimizer, optim.OPTIMIZERS)
        check_choice("config.lr_schedule", config.lr_schedule, optim.SCHEDULES)
        check_choice(
            "config.weight_decay_mode", config.get("weight_decay_mode", "auto"), optim.WEIGHT_DECAY_MODES
        )
        check_choice(
            "config.weight_decay_mask", config.get("weight_decay_mask", "kernels"), optim.WEIGHT_DECAY_MASKS
        )
        check_choice("config.warmup_style", config.get("warmup_style", "linear"), optim.WARMUP_STYLES)
        optim.weight_decay_mode(config)  # adamw with coupled decay is a contradiction
        check_choice("config.augment", config.get("augment", "auto"), augment.AUGMENTATIONS)
        check_choice("config.progress", config.get("progress", "auto"), progress.PROGRESS_MODES)
        progress.parse_profile_steps(config.get("profile_steps", ""))
        try:
            data.parse_spec(config.dataset)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("batch_size", "image_size"):
        _positive_int(config, key)
    if config.get("eval_batch_size", 0):
        _positive_int(config, "eval_batch_size")
    if "grad_accum_steps" in config:
        _positive_int(config, "grad_accum_steps")
    if config.get("bn_group_size", 0):
        _positive_int(config, "bn_group_size")
    eval_images = config.get("eval_images", 0)
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 0:
        raise ConfigError(f"config.eval_images={eval_images!r} must be 0 (none) or a positive integer")
    workers = config.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(
            f"config.num_workers={workers!r} must be -1 (auto), 0 (no worker processes) or more"
        )
    if not 0.0 < config.get("folder_eval_fraction", 0.1) < 1.0:
        raise ConfigError(f"config.folder_eval_fraction={config.folder_eval_fraction!r} must be in (0, 1)")
    for key, low, high in RANGES:
        value = config.get(key)
        if value is not None and not low <= value < high:
            raise ConfigError(f"config.{key}={value!r} must be in [{low}, {high})")
    if config.get("loss_scale_period", 1) < 1:
        _positive_int(config, "loss_scale_period")
    epochs = list(config.get("lr_step_epochs", ()))
    if config.lr_schedule == "step" and (not epochs or epochs != sorted(epochs) or min(epochs) < 0):
        raise ConfigError(
            f"config.lr_step_epochs={config.lr_step_epochs!r} must be increasing epochs, e.g. (30, 60, 80)"
        )
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError(
            f"config.num_epochs={config.num_epochs!r} and config.num_train_steps={config.num_train_steps!r}: "
            "set one of them to a positive number"
        )
    if workdir is not None:
        check_workdir(workdir)
