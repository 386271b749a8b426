"""One entry for every config: complete it from the defaults, then fail on the first bad value.

Checks run here, before any data is read or anything compiles; the rest of the package reads a
checked config's attributes and trusts them.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ml_collections

from resnet_jax import augment, autoaugment, data, defaults, models, optim, progress
from resnet_jax.errors import ConfigError, check_choice, did_you_mean

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
    ("random_erase_prob", 0.0, 1.0 + 1e-9),
    ("eval_crop_pct", 0.0, 1.0 + 1e-9),
    ("bce_target_threshold", 0.0, 1.0),
)
LOSSES = ("softmax", "bce")


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


def complete_config(config: Any) -> ml_collections.ConfigDict:
    """`config`'s values over `defaults.get_config()`, as a new locked ConfigDict.

    Keys that `config` lacks take their default (a config built from scratch in a notebook works);
    a key that is not a default is a typo, and silently ignoring it would train the wrong recipe.
    """
    complete = defaults.get_config()
    for key, value in config.items():
        if key not in complete:
            raise ConfigError(
                f"config.{key} is not a config key{did_you_mean(key, complete)}; "
                "every key is listed with its default in resnet_jax/defaults.py"
            )
        try:
            complete[key] = value
        except (TypeError, ValueError) as e:
            default = complete[key]
            raise ConfigError(
                f"config.{key}={value!r} has the wrong type: expected {type(default).__name__}, like the "
                f"default {default!r} ({e})"
            ) from None
    complete.lock()
    return complete


def check_config(config: Any, workdir: str | None = None) -> ml_collections.ConfigDict:
    """`config` completed from the defaults (see `complete_config`) and checked.

    Raises `ConfigError` for the first unknown key or bad value (or an unwritable workdir, if given).
    """
    config = complete_config(config)
    try:
        check_choice("config.model", config.model, models.names())
        check_choice("config.dtype", config.dtype, tuple(models.DTYPES))
        check_choice("config.activation", config.activation, tuple(models.ACTIVATIONS))
        check_choice("config.fold_bn", config.fold_bn, models.FOLD_BN)
        check_choice("config.optimizer", config.optimizer, optim.OPTIMIZERS)
        check_choice("config.lr_schedule", config.lr_schedule, optim.SCHEDULES)
        check_choice("config.weight_decay_mode", config.weight_decay_mode, optim.WEIGHT_DECAY_MODES)
        check_choice("config.weight_decay_mask", config.weight_decay_mask, optim.WEIGHT_DECAY_MASKS)
        check_choice("config.warmup_style", config.warmup_style, optim.WARMUP_STYLES)
        if config.optimizer == "adamw" and config.weight_decay_mode == "coupled":
            raise ConfigError(
                "weight_decay_mode='coupled' with optimizer='adamw': AdamW is Adam with decoupled decay; "
                "use optimizer='adam' for Adam with L2 decay"
            )
        check_choice("config.augment", config.augment, augment.AUGMENTATIONS)
        autoaugment.create_policy(config.auto_augment, fill=(0, 0, 0))  # raises on a bad policy
        check_choice("config.loss", config.loss, LOSSES)
        if config.bce_target_threshold is not None and config.loss != "bce":
            raise ConfigError(
                f"config.bce_target_threshold={config.bce_target_threshold!r} applies to loss='bce' only "
                f"(config.loss={config.loss!r})"
            )
        check_choice("config.progress", config.progress, progress.PROGRESS_MODES)
        progress.parse_profile_steps(config.profile_steps)
        try:
            data.parse_spec(config.dataset)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("batch_size", "image_size"):
        _positive_int(config, key)
    if config.eval_batch_size:
        _positive_int(config, "eval_batch_size")
    _positive_int(config, "grad_accum_steps")
    _positive_int(config, "repeated_aug")
    for key, zero_means in (("eval_image_size", "image_size"), ("device_prefetch", "off")):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.{key}={value!r} must be 0 ({zero_means}) or a positive integer")
    if config.bn_group_size:
        _positive_int(config, "bn_group_size")
    eval_images = config.eval_images
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 0:
        raise ConfigError(f"config.eval_images={eval_images!r} must be 0 (none) or a positive integer")
    workers = config.num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(
            f"config.num_workers={workers!r} must be -1 (auto), 0 (no worker processes) or more"
        )
    if not 0.0 < config.folder_eval_fraction < 1.0:
        raise ConfigError(f"config.folder_eval_fraction={config.folder_eval_fraction!r} must be in (0, 1)")
    for key, low, high in RANGES:
        value = config[key]
        if value is not None and not low <= value < high:
            closed = 0 < high - round(high, 6) < 1e-6  # the ranges' "+ 1e-9" marks an inclusive bound
            interval = f"[{low:g}, {round(high, 6):g}]" if closed else f"[{low:g}, {high:g})"
            raise ConfigError(f"config.{key}={value!r} must be in {interval}")
    _positive_int(config, "loss_scale_period")
    epochs = list(config.lr_step_epochs)
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
    return config
