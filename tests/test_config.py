"""One source of defaults: every config is completed from `resnet_jax/defaults.py`, and a key that is
not there is an error, from Python and from the command line."""

import ml_collections
import pytest

from configs import default
from resnet_jax import defaults
from resnet_jax.config_checks import ConfigError, check_config, complete_config
from tests.conftest import run_script


def test_configs_default_is_the_package_defaults():
    assert default.get_config().to_dict() == defaults.get_config().to_dict()


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
