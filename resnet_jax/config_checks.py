"""One entry for every config: complete it from the defaults, then fail on the first bad value.

Checks run here, before any data is read or anything compiles; the rest of the package reads a
checked config's attributes and trusts them. `DOMAINS` says, key by key, which values are valid
(type, range or choices, what None and 0 mean); a few rules between keys follow in `check_config`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import ml_collections
import numpy as np

from resnet_jax import augment, autoaugment, dali, data, defaults, models, optim, progress, step
from resnet_jax.errors import ConfigError, check_choice, did_you_mean

INT32_MAX = 2**31 - 1  # the step and loss-scale counters are int32 on the device
INT64_MAX = 2**63 - 1  # jax.random.key takes a seed up to this
FLOAT32_MAX = float(np.finfo(np.float32).max)  # float settings reach the device as float32
# Bounds no real run comes near: above them a value is a typo (a zero too many) that would otherwise
# surface minutes later as an out-of-memory error or a hang rather than as a message.
MAX_IMAGE_SIZE = 8192  # pixels per side; one such RGB image is 200 MB
MAX_BATCH_SIZE = 2**20  # 16 x the largest published ImageNet batches (65,536)
MAX_REPEATS = 64  # repeated augmentation: an epoch shows N / k distinct images
MAX_WORKERS = 1024  # grain worker processes per host
MAX_PREFETCH = 32  # every batch in flight holds a global batch in device memory
MAX_EVAL_IMAGES = 1024  # one TensorBoard grid, predicted as one batch
MAX_INPUT_CHANNELS = 64  # zero channels padded onto the image (cuDNN's stem wants 4); more only add work


@dataclasses.dataclass(frozen=True, kw_only=True)
class Domain:
    """The values one config key accepts. `none` says what None means where it is valid (else None)."""

    none: str | None = None
    kind: ClassVar[type] = object  # what ml_collections stores; a bool is never taken for a number

    def validate(self, key: str, value: Any, config: Any) -> None:
        """Raise `ConfigError`, one line with the key, the value and the valid values, unless valid."""
        if value is None and self.none is not None:
            return
        if value is None or not self.has_kind(value):
            raise self.error(key, value, config)
        self.check(key, value, config)

    def has_kind(self, value: Any) -> bool:
        return isinstance(value, self.kind) and (self.kind is bool or not isinstance(value, bool))

    def describe(self, config: Any) -> str:
        """The valid values in words, to follow "must be"."""
        raise NotImplementedError

    def check(self, key: str, value: Any, config: Any) -> None:
        """The checks beyond the type (ranges, parsers); `value` is not None and has the kind."""

    def must(self, config: Any, detail: str = "") -> str:
        """What follows "must be" in a refusal: the valid values, None's meaning where it is valid."""
        none = f" or None ({self.none})" if self.none is not None else ""
        return f"{self.describe(config)}{detail}{none}"

    def error(self, key: str, value: Any, config: Any, detail: str = "") -> ConfigError:
        return ConfigError(f"config.{key}={value!r} must be {self.must(config, detail)}")


@dataclasses.dataclass(frozen=True)
class Int(Domain):
    """An integer from `low` (None: any) up to `high`: a number, a key whose value bounds it, or None."""

    low: int | None = 1
    high: int | str | None = None
    zero: str | None = None  # what 0 means, where `low` is 0
    words: str | None = None  # the valid values, where the phrasing from `low` would mislead
    kind: ClassVar[type] = int

    def describe(self, config: Any) -> str:
        if self.words:
            return self.words
        if self.low == 1:
            return "a positive integer"
        if self.low == 0:
            return f"0 ({self.zero}) or a positive integer" if self.zero else "0 or a positive integer"
        return f"an integer >= {self.low}"

    def check(self, key: str, value: int, config: Any) -> None:
        if self.low is not None and value < self.low:
            raise self.error(key, value, config)
        high = config[self.high] if isinstance(self.high, str) else self.high
        if isinstance(high, int) and value > high:
            limit = f"config.{self.high}={high}" if isinstance(self.high, str) else str(high)
            raise self.error(key, value, config, f", at most {limit}")


@dataclasses.dataclass(frozen=True)
class Float(Domain):
    """A number in `interval`, written as in maths: "[0, 1)" includes 0 and excludes 1."""

    interval: str = "[0, inf)"
    zero: str | None = None  # what 0 means, where it is valid
    kind: ClassVar[type] = float

    def has_kind(self, value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def describe(self, config: Any) -> str:
        return f"in {self.interval}" + (f" (0: {self.zero})" if self.zero else "")

    def check(self, key: str, value: float, config: Any) -> None:
        low, high = (float(end) for end in self.interval[1:-1].split(","))
        above = low <= value if self.interval[0] == "[" else low < value
        below = value <= high if self.interval[-1] == "]" else value < high
        if not (above and below):  # also NaN, which compares False
            raise self.error(key, value, config)
        if abs(value) > FLOAT32_MAX:
            raise self.error(key, value, config, f", within float32's range (+-{FLOAT32_MAX:.2g})")


@dataclasses.dataclass(frozen=True)
class Flag(Domain):
    """True or False (not 0/1, not None: ml_collections would store those as given)."""

    kind: ClassVar[type] = bool

    def describe(self, config: Any) -> str:
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Text(Domain):
    """A string. `empty` says what '' means where it is valid; `parse` raises ValueError on a bad one."""

    words: str = "a non-empty string"
    empty: str | None = None
    parse: Callable[[str], object] | None = None
    kind: ClassVar[type] = str

    def describe(self, config: Any) -> str:
        return self.words + (f" or '' ({self.empty})" if self.empty is not None else "")

    def check(self, key: str, value: str, config: Any) -> None:
        if value == "" and self.empty is not None:
            return
        if self.parse is None:
            if not value:
                raise self.error(key, value, config)
            return
        try:
            self.parse(value)
        except ValueError as e:  # ConfigError included: parsers name the key, or are made to here
            message = str(e)
            if message.startswith(f"{key}="):
                message = f"config.{message}"
            elif not message.startswith(f"config.{key}="):
                message = f"config.{key}={value!r}: {message}; it must be {self.describe(config)}"
            raise ConfigError(message) from None


@dataclasses.dataclass(frozen=True)
class Choice(Domain):
    """One name from a registry: a tuple or dict of names, or a function that lists them."""

    registry: Iterable[str] | Callable[[], Iterable[str]] = ()
    kind: ClassVar[type] = str

    def names(self) -> tuple[str, ...]:
        return tuple(self.registry() if callable(self.registry) else self.registry)

    def describe(self, config: Any) -> str:
        return f"one of: {', '.join(self.names())}"

    def validate(self, key: str, value: Any, config: Any) -> None:
        check_choice(f"config.{key}", value, self.names())


@dataclasses.dataclass(frozen=True)
class Epochs(Domain):
    """Epochs (numbers >= 0) in increasing order; at least one where `lr_schedule` is 'step'."""

    kind: ClassVar[type] = tuple

    def has_kind(self, value: Any) -> bool:
        return isinstance(value, tuple | list)

    def describe(self, config: Any) -> str:
        return "increasing epochs (numbers >= 0), e.g. (30, 60, 80)"

    def check(self, key: str, value: tuple, config: Any) -> None:
        numbers = all(
            isinstance(e, int | float) and not isinstance(e, bool) and math.isfinite(e) and e >= 0
            for e in value
        )
        if not numbers or any(a >= b for a, b in itertools.pairwise(value)):
            raise self.error(key, value, config)
        if not value and config.lr_schedule == "step":
            raise self.error(key, value, config, " (lr_schedule='step' needs at least one)")


# Every key of defaults.py, in its order (a key bounded by another comes after it).
DOMAINS: dict[str, Domain] = {
    "model": Choice(models.names),
    "dtype": Choice(models.DTYPES),
    "zero_init_residual": Flag(),
    "activation": Choice(models.ACTIVATIONS),
    "init_from": Text(words="a weights directory", empty="train from scratch", none="train from scratch"),
    "freeze_backbone": Flag(),
    "dataset": Text(words="a dataset spec", parse=data.parse_spec),
    "data_dir": Text(words="a directory", empty="the tfds default", none="the tfds default"),
    "image_size": Int(1, MAX_IMAGE_SIZE),
    "augment": Choice(augment.AUGMENTATIONS),
    "auto_augment": Text(words="a policy", parse=autoaugment.policy_settings),
    "random_erase_prob": Float("[0, 1]", zero="off"),
    "repeated_aug": Int(1, MAX_REPEATS),
    "eval_image_size": Int(0, MAX_IMAGE_SIZE, zero="image_size"),
    "eval_crop_pct": Float("[0, 1]", zero="by augmentation"),
    "train_split": Text(words="a split name, e.g. 'train'"),
    "eval_split": Text(words="'auto' or a split name, e.g. 'validation'"),
    "folder_eval_fraction": Float("(0, 1)"),
    "loader": Choice(dali.LOADERS),
    "num_workers": Int(-1, MAX_WORKERS, words="-1 (auto), 0 (no worker processes) or more"),
    "device_prefetch": Int(0, MAX_PREFETCH, zero="off"),
    "batch_size": Int(1, MAX_BATCH_SIZE),
    "eval_batch_size": Int(0, MAX_BATCH_SIZE, zero="batch_size"),
    "grad_accum_steps": Int(1, "batch_size"),
    "bn_group_size": Int(0, "batch_size", zero="the whole batch"),
    "fold_bn": Choice(models.FOLD_BN),
    "space_to_depth_stem": Flag(),
    "pad_input_channels": Int(0, MAX_INPUT_CHANNELS, zero="off"),
    "bn_form": Choice(models.BN_FORMS),
    "num_epochs": Float(f"[0, {INT32_MAX}]", zero="num_train_steps sets the length"),
    "num_train_steps": Int(None, INT32_MAX, words="an integer (<= 0: num_epochs sets the length)"),
    "optimizer": Choice(optim.OPTIMIZERS),
    "learning_rate": Float("(0, inf)", none="the optimizer's default"),
    "momentum": Float("[0, 1)"),
    "b1": Float("[0, 1)"),
    "b2": Float("[0, 1)"),
    "eps": Float("(0, 1]", none="the optimizer's own"),
    "rmsprop_decay": Float("[0, 1)"),
    "adagrad_initial_accumulator": Float("[0, inf)"),
    "trust_coefficient": Float("(0, inf)", none="the optimizer's own"),
    "weight_decay": Float("[0, inf)", none="the optimizer's default"),
    "weight_decay_mode": Choice(optim.WEIGHT_DECAY_MODES),
    "weight_decay_mask": Choice(optim.WEIGHT_DECAY_MASKS),
    "grad_clip_norm": Float("[0, inf)", zero="no clipping"),
    "lr_schedule": Choice(optim.SCHEDULES),
    "warmup_epochs": Float("[0, inf)", zero="no warmup"),
    "warmup_style": Choice(optim.WARMUP_STYLES),
    "warmup_factor": Float("[0, 1]"),
    "lr_end_factor": Float("[0, 1]"),
    "lr_step_epochs": Epochs(),
    "lr_decay_factor": Float("[0, 1]"),
    "lr_power": Float("(0, inf)"),
    "loss": Choice(step.LOSSES),
    "bce_target_threshold": Float("[0, 1)", none="soft targets"),
    "label_smoothing": Float("[0, 1)"),
    "mixup_alpha": Float("[0, inf)", zero="off"),
    "cutmix_alpha": Float("[0, inf)", zero="off"),
    "mixup_switch_prob": Float("[0, 1]"),
    "mixup_prob": Float("[0, 1]"),
    "ema_decay": Float("[0, 1)", zero="off"),
    "drop_path_rate": Float("[0, 1)"),
    "dropout_rate": Float("[0, 1)"),
    "loss_scale_init": Float("[1, inf)"),
    "loss_scale_period": Int(1, INT32_MAX),
    "seed": Int(0, INT64_MAX),
    "log_every_steps": Int(0, zero="once per epoch"),
    "eval_every_steps": Int(0, zero="once per epoch"),
    "checkpoint_every_steps": Int(0, zero="once per epoch"),
    "keep_checkpoints": Int(1),
    "skip_nonfinite_steps": Flag(),
    "grad_norm": Choice(step.GRAD_NORMS),
    "progress": Choice(progress.PROGRESS_MODES),
    "eval_images": Int(0, MAX_EVAL_IMAGES, zero="none"),
    "profile_steps": Text(words="'START:END'", empty="off", parse=progress.parse_profile_steps),
    "watchdog_seconds": Float("[0, inf)", zero="automatic"),
    "watchdog_compile_seconds": Float("[1, inf)"),
    "compilation_cache_dir": Text(words="a directory", empty="off", none="~/.cache/resnet_jax/jax_cache"),
}


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
    Values take the defaults' types: ml_collections casts an int to float and a list to a tuple,
    numpy scalars become Python ones, and anything else of another type (a bool for a number too,
    which ml_collections would store as 1) is refused here.
    """
    complete = defaults.get_config()
    for key, value in config.items():
        if key not in complete:
            raise ConfigError(
                f"config.{key} is not a config key{did_you_mean(key, complete)}; "
                "every key is listed with its default in resnet_jax/defaults.py"
            )
        if isinstance(value, np.generic):  # e.g. a batch size computed with numpy in a script
            value = value.item()
        domain = DOMAINS.get(key)
        kind = domain.kind if domain else type(complete[key])
        try:
            if isinstance(value, bool) and kind is not bool:
                raise TypeError(value)
            complete[key] = value
        except (TypeError, ValueError):
            expected = f"; it must be {domain.must(complete)}" if domain else ""
            raise ConfigError(
                f"config.{key}={value!r} has the wrong type: expected {kind.__name__}{expected}"
            ) from None
    complete.lock()
    return complete


def check_config(config: Any, workdir: str | None = None) -> ml_collections.ConfigDict:
    """`config` completed from the defaults (see `complete_config`) and checked.

    Raises `ConfigError` for the first unknown key or bad value (or an unwritable workdir, if given).
    """
    config = complete_config(config)
    for key, domain in DOMAINS.items():
        domain.validate(key, config[key], config)
    if config.optimizer == "adamw" and config.weight_decay_mode == "coupled":
        raise ConfigError(
            "weight_decay_mode='coupled' with optimizer='adamw': AdamW is Adam with decoupled decay; "
            "use optimizer='adam' for Adam with L2 decay"
        )
    if config.bce_target_threshold is not None and config.loss != "bce":
        raise ConfigError(
            f"config.bce_target_threshold={config.bce_target_threshold!r} applies to loss='bce' only "
            f"(config.loss={config.loss!r})"
        )
    dali.check_config(config)
    if config.space_to_depth_stem:
        odd = [f"{k}={config[k]}" for k in ("image_size", "eval_image_size") if config[k] % 2]
        if odd or models.MODELS[config.model]["stem"] != "imagenet":
            reason = (
                f"even image sides, not {' and '.join(odd)}"
                if odd
                else f"an ImageNet stem ({config.model} has none)"
            )
            raise ConfigError(f"config.space_to_depth_stem=True needs {reason}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError(
            f"config.num_epochs={config.num_epochs!r} and config.num_train_steps={config.num_train_steps!r}: "
            "set one of them to a positive number"
        )
    if workdir is not None:
        check_workdir(workdir)
    return config
