"""The command lines users run: `train.py` end to end and its error messages."""

import json

import pytest

from tests.conftest import run_script


@pytest.mark.slow
def test_train_py_on_digits_end_to_end(tmp_path):
    result = run_script(
        "train.py",
        "--config",
        "configs/digits.py",
        "--workdir",
        str(tmp_path),
        "--config.num_train_steps=20",
        "--config.log_every_steps=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final eval at step 20: accuracy" in result.stdout
    assert "(" in result.stdout and "/360)" in result.stdout  # every test image counted
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [5, 10, 15, 20]
    assert rows[-1]["step"] == 20 and "eval_accuracy" in rows[-1]


BAD_VALUES = [
    ("--config.model=resnet19", "config.model='resnet19'", "resnet20"),
    ("--config.dataset=mnist", "config.dataset='mnist'", "tfds:NAME"),
    ("--config.optimizer=adamax", "config.optimizer='adamax'", "nesterov"),
    ("--config.dtype=float64", "config.dtype='float64'", "bfloat16"),
    ("--config.batch_size=0", "config.batch_size=0", "positive"),
    ("--config.batch_size=-8", "config.batch_size=-8", "positive"),
    ("--config.lr_schedule=wavy", "config.lr_schedule='wavy'", "cosine"),
]


@pytest.mark.parametrize("flag,names,valid", BAD_VALUES)
def test_bad_config_values_exit_with_one_clear_message(tmp_path, flag, names, valid):
    result = run_script("train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path), flag)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert names in error_lines[0] and valid in error_lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before training started


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_script("train.py", "--config", "configs/digits.py", "--workdir", str(blocker / "run"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"workdir '{blocker / 'run'}' cannot be written" in result.stderr
