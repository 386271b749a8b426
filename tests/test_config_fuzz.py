"""Every config key fuzzed: a value of the wrong type, a negative number, zero, an absurd magnitude,
a non-finite number, an empty string and None, for every key of `resnet_jax/defaults.py`.

Each is either refused by `check_config` (what `train_and_evaluate` calls first, before anything
loads or compiles) with one `ConfigError` line that names the key and the valid values, or valid by
design, listed below with the reason. A key added to the defaults is fuzzed without a change here,
and cannot be added without a domain in `config_checks.DOMAINS`.
"""

import math

import ml_collections
import numpy as np
import pytest

from resnet_jax import config_checks, defaults, optim
from resnet_jax.config_checks import ConfigError, check_config

BASE = {"model": "resnet20", "dataset": "digits"}
# Keys that only mean something together with another key's value are fuzzed in that setting.
SETTING = {"bce_target_threshold": {"loss": "bce"}, "lr_step_epochs": {"lr_schedule": "step"}}
INF, NAN = float("inf"), float("nan")

# The bad values for a key, by the type of its default (placeholders: their declared type).
BAD_VALUES: dict[type, dict[str, tuple]] = {
    int: {
        "wrong type": ("12", 1.5, True),
        "negative": (-1,),
        "zero": (0,),
        "absurd": (10**12,),
        "empty string": ("",),
        "None": (None,),
    },
    float: {
        "wrong type": ("0.5", True),
        "negative": (-1.0,),
        "zero": (0.0,),
        "absurd": (1e12,),
        "non-finite": (INF, NAN),
        "empty string": ("",),
        "None": (None,),
    },
    bool: {
        "wrong type": (1, "yes"),
        "negative": (-1,),
        "zero": (0,),
        "absurd": (10**12,),
        "empty string": ("",),
        "None": (None,),
    },
    str: {
        "wrong type": (3, 0.5),
        "negative": (-1,),
        "zero": (0,),
        "absurd": (10**12,),
        "empty string": ("",),
        "None": (None,),
    },
    tuple: {
        "wrong type": (30, ("30", "60")),
        "negative": ((-1, 30),),
        "zero": ((),),  # no epochs at all
        "absurd": ((30, 10**12),),
        "non-finite": ((30, INF), (NAN,)),
        "empty string": ("",),
        "None": (None,),
    },
}

PLACEHOLDER = "unset: the default"
ONCE_PER_EPOCH = "0 is once per epoch"
LAST_STEP_ONLY = "longer than the run: only the last step, which always counts"
SCALE = "any finite scale is a setting; a run that diverges stops at its first non-finite loss"
# (key, kind of bad value): why that value is valid.
VALID_BY_DESIGN = {
    ("init_from", "empty string"): "'' is unset, as None: `--config.init_from=` clears it",
    ("init_from", "None"): "None: train from scratch",
    ("data_dir", "empty string"): "'' is tfds's own default, as None",
    ("data_dir", "None"): "None: tfds's default data dir",
    ("eval_image_size", "zero"): "0 is image_size",
    ("eval_crop_pct", "zero"): "0 chooses by augmentation (0.875 for ImageNet style, else 1)",
    ("random_erase_prob", "zero"): "0 is off",
    ("num_workers", "negative"): "-1 is automatic (one worker per core for files, none in memory)",
    ("num_workers", "zero"): "0 loads in the training process",
    ("device_prefetch", "zero"): "0 is no prefetch",
    ("eval_batch_size", "zero"): "0 is batch_size",
    ("bn_group_size", "zero"): "0 normalises over the whole batch (sync BN)",
    ("pad_input_channels", "zero"): "0 is off: the image's own channels",
    ("num_train_steps", "negative"): "<= 0: num_epochs sets the length (the default is -1)",
    ("num_train_steps", "zero"): "<= 0: num_epochs sets the length",
    ("learning_rate", "absurd"): SCALE,
    ("learning_rate", "None"): PLACEHOLDER + " of the optimizer",
    ("momentum", "zero"): "0 is plain SGD",
    ("b1", "zero"): "0: Adam without a first moment (RMSprop-like)",
    ("b2", "zero"): "0: the second moment is the last squared gradient (sign-like steps)",
    ("eps", "None"): PLACEHOLDER + " of the optimizer",
    ("rmsprop_decay", "zero"): "0: the last squared gradient",
    ("adagrad_initial_accumulator", "zero"): "0 starts the sum of squares empty (optax allows it)",
    ("adagrad_initial_accumulator", "absurd"): SCALE,
    ("trust_coefficient", "absurd"): SCALE,
    ("trust_coefficient", "None"): PLACEHOLDER + " of LARS / LAMB",
    ("weight_decay", "zero"): "0 is no decay",
    ("weight_decay", "absurd"): SCALE,
    ("weight_decay", "None"): PLACEHOLDER + " of the optimizer",
    ("grad_clip_norm", "zero"): "0 is no clipping",
    ("grad_clip_norm", "absurd"): "a bound no gradient reaches: no clipping in effect",
    ("warmup_epochs", "zero"): "0 is no warmup",
    ("warmup_epochs", "absurd"): "warmup is clipped to the run's length (DESIGN.md)",
    ("warmup_factor", "zero"): "warmup starts from 0",
    ("lr_end_factor", "zero"): "decays end at 0",
    ("lr_step_epochs", "absurd"): "a boundary past the run's end never fires (optim drops it)",
    ("lr_decay_factor", "zero"): "the rate drops to 0 at the first boundary",
    ("lr_power", "absurd"): "a steep but finite polynomial decay",
    ("bce_target_threshold", "zero"): "every target above 0 becomes 1",
    ("bce_target_threshold", "None"): "None keeps the soft (mixed, smoothed) targets",
    ("label_smoothing", "zero"): "0 is off",
    ("mixup_alpha", "zero"): "0 is off",
    ("mixup_alpha", "absurd"): "Beta(a, a) concentrates at 0.5: a valid (if odd) mixup",
    ("cutmix_alpha", "zero"): "0 is off",
    ("cutmix_alpha", "absurd"): "Beta(a, a) concentrates at 0.5: a valid (if odd) cutmix",
    ("mixup_switch_prob", "zero"): "0: always mixup, never cutmix",
    ("mixup_prob", "zero"): "0: no batch is mixed",
    ("ema_decay", "zero"): "0 is off",
    ("drop_path_rate", "zero"): "0 is off",
    ("dropout_rate", "zero"): "0 is off",
    ("loss_scale_init", "absurd"): "the scale halves on overflow until it fits (and fits float32)",
    ("seed", "zero"): "any seed",
    ("seed", "absurd"): "any seed up to 2**63 - 1 (jax.random.key's int64)",
    ("log_every_steps", "zero"): ONCE_PER_EPOCH,
    ("log_every_steps", "absurd"): LAST_STEP_ONLY,
    ("eval_every_steps", "zero"): ONCE_PER_EPOCH,
    ("eval_every_steps", "absurd"): LAST_STEP_ONLY,
    ("checkpoint_every_steps", "zero"): ONCE_PER_EPOCH,
    ("checkpoint_every_steps", "absurd"): LAST_STEP_ONLY,
    ("keep_checkpoints", "absurd"): "keep every checkpoint",
    ("eval_images", "zero"): "0 is no image grid",
    ("profile_steps", "empty string"): "'' is off (the default)",
    ("watchdog_seconds", "zero"): "0 is automatic (10 x the longest step + the longest compile)",
    ("watchdog_seconds", "absurd"): "a bound longer than any run switches the watchdog off",
    ("watchdog_compile_seconds", "absurd"): "a bound longer than any compile: no limit in effect",
    ("compilation_cache_dir", "empty string"): "'' is off",
    ("compilation_cache_dir", "None"): "None is ~/.cache/resnet_jax/jax_cache",
}
# A refusal says what would be valid, in one of these phrasings.
VALID_VALUES = ("has the wrong type: expected", "must be", "choose one of", "use one of", "set one of them")


def declared_type(key):
    """The type ml_collections enforces for `key` (a placeholder's declared one where the default is None)."""
    return defaults.get_config().get_ref(key).get_type()


CASES = [
    pytest.param(key, kind, value, id=f"{key}-{kind}-{value!r}")
    for key in defaults.get_config()
    for kind, values in BAD_VALUES[declared_type(key)].items()
    for value in values
]


def same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b or (isinstance(a, tuple | list) and tuple(a) == tuple(b))


def assert_outcome(config, key, value, reason):
    if reason is not None:
        assert same(check_config(config)[key], value)
        return
    with pytest.raises(ConfigError) as err:  # any other exception fails the test with its traceback
        check_config(config)
    message = str(err.value)
    assert "\n" not in message, message
    assert f"config.{key}=" in message, message
    assert any(phrase in message for phrase in VALID_VALUES), message


@pytest.mark.parametrize("key,kind,value", CASES)
def test_every_key_refuses_a_bad_value_in_one_line_or_takes_it_by_design(key, kind, value):
    setting = {**BASE, **SETTING.get(key, {})}
    reason = VALID_BY_DESIGN.get((key, kind))
    # A config file or --config.KEY=VALUE: assignment into the typed defaults, then check_config.
    typed = defaults.get_config()
    typed.update(setting)
    try:
        typed[key] = value
    except TypeError as e:  # the config system's own refusal; absl reports it against the flag
        assert reason is None, f"{key}={value!r} is valid by design ({reason}) but cannot be assigned"
        assert f"'{key}'" in str(e), str(e)
    else:
        # ml_collections stores a bool assigned to a float field as 1.0 or 0.0, and then the check
        # sees that number (another case); the command line cannot assign a bool to a float.
        if type(typed[key]) is type(value):
            assert_outcome(typed, key, value, reason)
    # A script: a plain ConfigDict built by hand, completed from the defaults by check_config.
    assert_outcome(ml_collections.ConfigDict({**setting, key: value}), key, value, reason)


def test_every_default_key_has_a_domain():
    assert set(config_checks.DOMAINS) == set(defaults.get_config())


def test_none_is_valid_exactly_for_the_keys_whose_default_is_none():
    reference = defaults.get_config()
    allowed = {key for key, domain in config_checks.DOMAINS.items() if domain.none is not None}
    assert allowed == {key for key in reference if reference[key] is None}


def test_every_valid_by_design_case_is_one_that_the_fuzz_tries():
    tried = {(key, kind) for key in defaults.get_config() for kind in BAD_VALUES[declared_type(key)]}
    assert set(VALID_BY_DESIGN) <= tried


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_workers": -2}, "config.num_workers=-2 must be -1 (auto), 0 (no worker processes) or more"),
        (
            {"batch_size": 256.0},
            "config.batch_size=256.0 has the wrong type: expected int; it must be a positive integer",
        ),
        ({"num_epochs": True}, "config.num_epochs=True has the wrong type: expected float"),
        ({"learning_rate": 1e300}, "config.learning_rate=1e+300 must be in (0, inf), within float32's range"),
        (
            {"grad_accum_steps": 512},
            "config.grad_accum_steps=512 must be a positive integer, at most config.batch_size=256",
        ),
        ({"lr_step_epochs": (30, 30)}, "config.lr_step_epochs=(30, 30) must be increasing epochs"),
        ({"lr_schedule": "step", "lr_step_epochs": ()}, "(lr_schedule='step' needs at least one)"),
        ({"auto_augment": "rand-m1.2.3"}, "config.auto_augment='rand-m1.2.3': could not convert"),
        ({"dataset": "tfds:"}, "config.dataset='tfds:' is not a dataset spec; use one of"),
        ({"model": None}, "config.model=None is not valid; choose one of: "),
        ({"seed": 2**63}, "config.seed=9223372036854775808 must be 0 or a positive integer, at most"),
    ],
)
def test_refusals_name_the_key_and_the_valid_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(ml_collections.ConfigDict({**BASE, **overrides}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_numbers_are_taken_as_the_defaults_types():
    config = check_config(
        ml_collections.ConfigDict(
            {**BASE, "batch_size": np.int64(64), "num_epochs": 3, "learning_rate": np.float32(0.5)}
        )
    )
    assert (config.batch_size, config.num_epochs, config.learning_rate) == (64, 3.0, 0.5)
    assert type(config.batch_size) is int and type(config.num_epochs) is float


def test_a_step_boundary_past_the_run_leaves_the_schedule_finite():
    config = check_config(
        ml_collections.ConfigDict(
            {**BASE, "lr_schedule": "step", "lr_step_epochs": (1, 10**12), "warmup_epochs": 0.0}
        )
    )
    schedule = optim.create_schedule(config, steps_per_epoch=10, total_steps=100)
    assert [float(schedule(step)) for step in (5, 50)] == pytest.approx([0.1, 0.01])
