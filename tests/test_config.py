"""One source of defaults: every config is completed from `resnet_jax/defaults.py`, and a key that is
not there is an error, from Python and from the command line."""

import importlib

import ml_collections
import pytest

from configs import default
from resnet_jax import defaults, optim
from resnet_jax.config_checks import ConfigError, check_config, complete_config
from tests.conftest import ROOT, run_script


def test_configs_default_is_resnet50_on_imagenet_with_the_goyal_recipe():
    """configs/default.py, and so every key's default, is what resnet_jax/defaults.py and the README
    say: ResNet-50 on ImageNet at 224 px with Goyal et al.'s (2017) SGD recipe: batch 256, Nesterov
    momentum 0.9, lr 0.1 per 256 images after a 5-epoch linear warmup from 0, weight decay 1e-4
    (coupled) on the kernels only, zero-initialised residual branches, 90 epochs; float32 and none of
    the later recipes' regularisers."""
    config = check_config(default.get_config())
    recipe = {
        "model": "resnet50",
        "dataset": "tfds:imagenet2012",
        "image_size": 224,
        "batch_size": 256,
        "grad_accum_steps": 1,
        "bn_group_size": 0,
        "num_epochs": 90.0,
        "num_train_steps": -1,
        "optimizer": "nesterov",
        "momentum": 0.9,
        "weight_decay_mask": "kernels",
        "warmup_epochs": 5.0,
        "warmup_style": "linear",
        "warmup_factor": 0.0,
        "lr_step_epochs": (30, 60, 80),  # Goyal's steps, for lr_schedule='step'
        "zero_init_residual": True,
        "dtype": "float32",
        "loss": "softmax",
        "label_smoothing": 0.0,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "auto_augment": "none",
        "random_erase_prob": 0.0,
        "repeated_aug": 1,
        "ema_decay": 0.0,
        "drop_path_rate": 0.0,
        "dropout_rate": 0.0,
    }
    assert {key: config[key] for key in recipe} == recipe
    assert optim.learning_rate(config) == 0.1 and optim.weight_decay(config) == 1e-4
    assert optim.weight_decay_mode(config) == "coupled"
    # The schedule at ImageNet's size: 0 at the start, the peak after the warmup, 0 at the end.
    steps_per_epoch = 1_281_167 // config.batch_size
    schedule = optim.create_schedule(config, steps_per_epoch, 90 * steps_per_epoch)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5 * steps_per_epoch)) == pytest.approx(0.1)
    assert float(schedule(90 * steps_per_epoch)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("[!_]*.py")))
def test_every_config_file_sets_only_known_keys_and_passes_the_checks(name):
    """A config file that sets a key the defaults lack, or a value the checks refuse, fails here
    before anyone passes it to train.py (a new file in configs/ is picked up by the glob)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    assert set(config) <= set(defaults.get_config()), set(config) - set(defaults.get_config())
    check_config(config)


def test_a_config_built_from_scratch_takes_every_other_key_from_the_defaults():
    config = ml_collections.ConfigDict({"model": "resnet20", "dataset": "digits", "learning_rate": 0.05})
    complete = check_config(config)
    assert complete.learning_rate == 0.05 and complete.model == "resnet20"
    reference = defaults.get_config()
    assert set(complete) == set(reference)
    for key in set(reference) - {"model", "dataset", "learning_rate"}:
        assert complete[key] == reference[key], key
    assert "learning_rate" in config and "num_workers" not in config  # the input is left as it was


def test_a_misspelt_key_is_one_error_that_names_the_closest_key():
    config = ml_collections.ConfigDict({"model": "resnet20", "learnng_rate": 0.01})
    with pytest.raises(ConfigError) as err:
        check_config(config)
    message = str(err.value)
    assert message.startswith("config.learnng_rate is not a config key (did you mean 'learning_rate'?)")
    assert "\n" not in message


def test_a_value_of_the_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"config.batch_size=32.5 has the wrong type: expected int"):
        complete_config(ml_collections.ConfigDict({"batch_size": 32.5}))


def test_the_completed_config_is_locked_against_new_keys():
    config = complete_config(ml_collections.ConfigDict({"model": "resnet20"}))
    config.learning_rate = 0.2  # existing keys can change
    with pytest.raises(AttributeError):
        config.learnng_rate = 0.2


def test_train_py_rejects_a_config_file_with_a_misspelt_key(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from configs import digits\n\n\ndef get_config():\n"
        "    config = digits.get_config()\n    config.warmup_epochz = 2.0\n    return config\n"
    )
    result = run_script("train.py", "--config", str(config_file), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: config.warmup_epochz is not a config key (did you mean 'warmup_epochs'?); every key is "
        "listed with its default in resnet_jax/defaults.py"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"auto_augment": "autoaugment"},
            "config.auto_augment='autoaugment' is not a policy; use one of: none,",
        ),
        ({"auto_augment": "rand-q9"}, "config.auto_augment='rand-q9': cannot read 'q9'"),
        ({"loss": "focal"}, "config.loss='focal' is not valid; choose one of: softmax, bce"),
        ({"bce_target_threshold": 0.2}, "applies to loss='bce' only (config.loss='softmax')"),
        (
            {"loss": "bce", "bce_target_threshold": 1.5},
            "config.bce_target_threshold=1.5 must be in [0, 1)",
        ),
        ({"random_erase_prob": 1.5}, "config.random_erase_prob=1.5 must be in [0, 1]"),
        ({"repeated_aug": 0}, "config.repeated_aug=0 must be a positive integer"),
        ({"eval_image_size": -1}, "config.eval_image_size=-1 must be 0 (image_size) or a positive integer"),
        ({"device_prefetch": -2}, "config.device_prefetch=-2 must be 0 (off) or a positive integer"),
        ({"eval_crop_pct": 1.2}, "config.eval_crop_pct=1.2 must be in [0, 1]"),
        ({"fold_bn": "yes"}, "config.fold_bn='yes' is not valid; choose one of: auto, on, off"),
    ],
)
def test_augmentation_loss_and_prefetch_keys_are_checked_before_anything_loads(overrides, message):
    config = ml_collections.ConfigDict({"model": "resnet20", "dataset": "digits", **overrides})
    with pytest.raises(ConfigError) as err:
        check_config(config)
    assert message in str(err.value) and "\n" not in str(err.value)
