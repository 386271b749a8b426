"""Up-front checks of a training config: every bad value fails here, before any data or compile."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from resnet_jax import augment, data, models, optim


class ConfigError(ValueError):
    """A config value or workdir that cannot work; the message names the key, value and choices."""


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
        models.check_choice("config.model", config.model, models.names())
        models.check_choice("config.dtype", config.dtype, tuple(models.DTYPES))
        models.check_choice("config.activation", config.get("activation", "relu"), tuple(models.ACTIVATIONS))
        models.check_choice("config.optimizer", config.optimizer, optim.OPTIMIZERS)
        models.check_choice("config.lr_schedule", config.lr_schedule, optim.SCHEDULES)
        models.check_choice("config.augment", config.get("augment", "auto"), augment.AUGMENTATIONS)
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
    workers = config.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(
            f"config.num_workers={workers!r} must be -1 (auto), 0 (no worker processes) or more"
        )
    if not 0.0 < config.get("folder_eval_fraction", 0.1) < 1.0:
        raise ConfigError(f"config.folder_eval_fraction={config.folder_eval_fraction!r} must be in (0, 1)")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"config.label_smoothing={config.label_smoothing!r} must be in [0, 1)")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError(
            f"config.num_epochs={config.num_epochs!r} and config.num_train_steps={config.num_train_steps!r}: "
            "set one of them to a positive number"
        )
    if workdir is not None:
        check_workdir(workdir)
