"""Resuming with a config whose train state has another layout is refused, and nothing is moved.

The keys that change the layout are found, not listed: every key of `defaults.py` is set to other
valid values, and the abstract train state (`compiled_steps.abstract_state`) compared with the default's. A
key added later is covered without anyone remembering it.
"""

import functools
import json

import jax
import pytest

from resnet_jax import (
    augment,
    checkpoint,
    compiled_steps,
    data,
    defaults,
    models,
    optim,
    progress,
    resume,
    step,
    train,
)
from resnet_jax.config_checks import ConfigError, check_config
from tests.conftest import digits_config, run_script

# Other values to try for the string keys; numbers and booleans get theirs from `other_values`.
STRING_CHOICES = {
    "model": ("resnet32", "preact_resnet20", "plain20"),
    "dtype": tuple(models.DTYPES),
    "activation": tuple(models.ACTIVATIONS),
    "fold_bn": models.FOLD_BN,
    "bn_form": models.BN_FORMS,
    "grad_norm": step.GRAD_NORMS,
    "dataset": ("synthetic",),
    "augment": augment.AUGMENTATIONS,
    "auto_augment": ("trivialaugment",),
    "loader": ("dali",),  # refused with digits: decoding cannot change the state's layout anyway
    "train_split": ("train",),
    "eval_split": ("test",),
    "optimizer": optim.OPTIMIZERS,
    "weight_decay_mode": optim.WEIGHT_DECAY_MODES,
    "weight_decay_mask": optim.WEIGHT_DECAY_MASKS,
    "lr_schedule": optim.SCHEDULES,
    "warmup_style": optim.WARMUP_STYLES,
    "loss": ("softmax", "bce"),
    "progress": progress.PROGRESS_MODES,
    "profile_steps": ("2:3",),
}
# Keys that name paths or directories: another value cannot change the state's layout.
PATH_KEYS = ("init_from", "data_dir", "compilation_cache_dir")


def base_config():
    return check_config(digits_config(num_train_steps=2, batch_size=16, image_size=8))


def other_values(key, value):
    """Other values of `key` to try; those that `check_config` refuses are dropped later."""
    if key in STRING_CHOICES:
        return [v for v in STRING_CHOICES[key] if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float) or value is None:
        numbers = [0, 0.5, 2] + ([] if value is None else [value * 2])
        cast = type(value) if value is not None else float
        return sorted({cast(n) for n in numbers if cast(n) != value}, key=str)
    if isinstance(value, tuple | list):
        return [tuple(value[:1])] if value else []
    return []


@functools.cache
def info():
    return data.load(base_config()).info


def layout(config):
    return checkpoint.leaf_layout(compiled_steps.abstract_state(config, info(), "cpu"))


def layout_changes():
    """(key, value) pairs, each valid, that give the train state another layout than the default."""
    base = base_config()
    reference = layout(base)
    changes = []
    for key in defaults.get_config():
        if key in PATH_KEYS:
            continue
        for value in other_values(key, base[key]):
            config = base_config()
            try:
                config[key] = value
                config = check_config(config)
                changed = layout(config) != reference
            except (ConfigError, TypeError, ValueError):
                continue  # not a valid value of this key (or not in this combination)
            if changed:
                changes.append((key, value))
    return changes


def test_every_string_key_has_values_to_try():
    string_keys = {k for k, v in defaults.get_config().items() if isinstance(v, str)}
    missing = string_keys - set(STRING_CHOICES) - set(PATH_KEYS)
    assert not missing, f"add the keys' values to STRING_CHOICES: {sorted(missing)}"


@pytest.mark.slow
def test_layout_changing_keys_are_found_and_each_resume_with_one_is_refused(tmp_path):
    changes = layout_changes()
    found = {key for key, _ in changes}
    # What the search must at least find (the list may grow, never shrink without a reason).
    assert {"optimizer", "grad_clip_norm", "ema_decay", "freeze_backbone", "dtype", "model"} <= found, found

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(base_config(), workdir)
    checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
    saved_steps = checkpoints.steps()
    for key, value in dict(reversed(changes)).items():  # one value per key
        config = base_config()
        config[key] = value
        with pytest.raises(checkpoint.CheckpointError) as error:
            train.train_and_evaluate(config, workdir)
        message = str(error.value)
        assert f"config.{key}" in message and "\n" not in message, (key, value, message)
        assert checkpoints.steps() == saved_steps, (key, value)
        assert not (tmp_path / "run" / "broken_checkpoints").exists(), (key, value)


def test_a_layout_change_names_the_parts_of_the_state():
    saved = {"step": ((), "int32"), "opt_state/0/mu/w": ((3,), "float32"), "params/w": ((3,), "float32")}
    target = {"step": ((), "int32"), "opt_state/1/mu/w": ((3,), "float32"), "params/w": ((4,), "float32")}
    assert checkpoint.layout_difference(saved, saved) == ""
    assert checkpoint.layout_difference(saved, target) == "opt_state/0, opt_state/1, params/w"


@pytest.mark.slow
def test_train_py_refuses_a_resume_that_adds_gradient_clipping_and_moves_nothing(tmp_path):
    common = ["train.py", "--config=configs/digits.py", f"--workdir={tmp_path}", "--config.batch_size=32"]
    first = run_script(*common, "--config.num_train_steps=4", "--config.checkpoint_every_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_script(*common, "--config.num_train_steps=8", "--config.grad_clip_norm=1.0")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in resumed.stderr
    assert "config.grad_clip_norm changed from 0.0 to 1.0" in errors[0]
    assert "--config.grad_clip_norm=0.0" in errors[0] and f"--config.init_from={tmp_path}" in errors[0]
    assert "config.num_train_steps" not in errors[0]  # changed too, but not the cause
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (tmp_path / "broken_checkpoints").exists()
    # The way out it offers: a new run from these weights.
    fresh = run_script(
        "train.py",
        "--config=configs/digits.py",
        f"--workdir={tmp_path / 'clipped'}",
        "--config.batch_size=32",
        "--config.num_train_steps=2",
        "--config.grad_clip_norm=1.0",
        f"--config.init_from={tmp_path}",
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert f"initialised from the resnet20 weights in {tmp_path}" in fresh.stdout


def test_the_abstract_state_is_what_init_builds():
    config = base_config()
    steps = compiled_steps.CompiledSteps(config, info(), jax.sharding.Mesh(jax.devices()[:1], ("data",)))
    built = jax.eval_shape(steps.init, step.rng_key(config.seed))
    assert checkpoint.leaf_layout(built) == layout(config)


def test_a_resume_reports_config_changes_by_value_and_a_stretched_schedule():
    config = check_config(digits_config())
    saved = json.loads(json.dumps(config.to_dict()))  # as the checkpoint holds it: tuples are lists
    assert checkpoint.changed_keys(saved, config) == []
    assert resume.schedule_change(saved, config, info(), 220) is None
    longer = check_config(digits_config(num_epochs=15.0, log_every_steps=7))
    assert sorted(checkpoint.changed_keys(saved, longer)) == ["log_every_steps", "num_epochs"]
    line = resume.schedule_change(saved, longer, info(), 220)
    assert line.startswith("the learning-rate schedule changed (num_epochs 10.0 -> 15.0): it now spans 330 ")
    assert "steps instead of 220, and the rate at step 220 is 0.03227 instead of 0" in line
