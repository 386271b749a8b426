"""The command lines users run: `train.py` end to end and its error messages."""

import importlib
import json

import ml_collections
import pytest

from tests.conftest import digits_config, run_script


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


# ------------------------------------------------------------ one command-line style

TOOLS = ("convert", "evaluate", "predict", "export", "plot", "models", "loader_benchmark", "gradient_flow")


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_help_and_turns_a_bad_flag_into_one_error_line(tool, capsys):
    main = importlib.import_module(f"resnet_jax.{tool}").main
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0
    shown = capsys.readouterr().out
    assert f"usage: python -m resnet_jax.{tool} [flags]" in shown and "--" in shown
    with pytest.raises(SystemExit) as exit_bad:
        main(["--no_such_flag=1"])
    assert exit_bad.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"error: Unknown command line flag 'no_such_flag' (see python -m resnet_jax.{tool} --help)"
    ]


def test_train_and_benchmark_share_one_definition_of_the_multi_host_flags():
    helps = [run_script(script, "--helpfull").stdout for script in ("train.py", "benchmark.py")]
    for flag in ("--coordinator_address", "--num_processes", "--process_id", "--[no]distributed"):
        lines = [
            [line.strip() for line in text.splitlines() if line.strip().startswith(flag)] for text in helps
        ]
        assert lines[0] and lines[0] == lines[1], flag
    assert all("resnet_jax.cli:" in text for text in helps)


def test_errors_have_the_type_of_their_cause(tmp_path):
    from resnet_jax import convert, data, errors, inference, predict

    (tmp_path / "broken.png").write_bytes(b"not an image")
    info = data.load(digits_config()).info
    with pytest.raises(errors.ImageError, match="cannot read image .*broken.png"):
        predict.read_images([str(tmp_path / "broken.png")], info)
    config = ml_collections.ConfigDict({"learning_rate": 0.1, "model": "resnet20"})
    with pytest.raises(errors.ConfigError, match="did you mean 'learning_rate'"):
        inference.apply_overrides(config, ["--config.learnng_rate=0.2"])
    with pytest.raises(errors.ConfigError, match="config.learning_rate takes a float"):
        inference.apply_overrides(config, ["--config.learning_rate=fast"])
    with pytest.raises(errors.ConfigError, match="does not exist"):
        convert.load_config(tmp_path / "missing.py")
