"""The command lines users run: `train.py` end to end and its error messages."""

import importlib
import json
import subprocess
import sys

import ml_collections
import pytest

from tests.conftest import ROOT, digits_config, run_script


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
    ("--config.learnng_rate=0.1", "no config key 'learnng_rate'", "did you mean 'learning_rate'"),
    ("--config.batch_size=big", "--config.batch_size=big", "int"),
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


@pytest.mark.parametrize("script", ["train.py", "benchmark.py"])
def test_a_missing_config_file_is_one_line_with_the_nearest_file(tmp_path, script):
    result = run_script(script, "--config", "configs/digit.py", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: config file 'configs/digit.py' does not exist; did you mean configs/digits.py?"
    ]


@pytest.mark.parametrize(
    "body,message",
    [
        ('def get_config():\n    raise ValueError("bad value\\nmore")\n', "ValueError: bad value"),
        ("def get_config(:\n", "SyntaxError: invalid syntax"),
        ("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict().nope\n", "nope"),
    ],
)
def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, body, message):
    path = tmp_path / "broken_config.py"
    path.write_text(body)
    result = run_script("train.py", "--config", str(path), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: config file {path}: ") and message in line, line


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_script("train.py", "--config", "configs/digits.py", "--workdir", str(blocker / "run"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"workdir '{blocker / 'run'}' cannot be written" in result.stderr


# ------------------------------------------------------------ one command-line style

TOOLS = ("convert", "evaluate", "predict", "export", "plot", "models", "loader_benchmark", "gradient_flow")
TOOLS += ("prepare",)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_help_and_turns_a_bad_flag_into_one_error_line(tool, capsys):
    main = importlib.import_module(f"resnet_jax.{tool}").main
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0
    shown, warned = capsys.readouterr()
    assert warned == ""
    assert f"usage: python -m resnet_jax.{tool} [flags]" in shown and "--" in shown
    with pytest.raises(SystemExit) as exit_bad:
        main(["--no_such_flag=1"])
    assert exit_bad.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"error: Unknown command line flag 'no_such_flag' (see python -m resnet_jax.{tool} --help)"
    ]


@pytest.mark.parametrize("script", [["train.py"], ["benchmark.py"], ["-m", "resnet_jax.preflight"]])
def test_scripts_print_help_and_exit_0(script):
    result = run_script(*script, "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith(("Train and evaluate", "Measure the train", "Compile the real"))
    assert "--config:" in result.stdout


def test_a_closed_pipe_ends_a_tool_quietly():
    result = subprocess.run(
        f"{sys.executable} -m resnet_jax.models --no_flops | head -n 1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.startswith("model") and "BrokenPipeError" not in result.stderr, result.stderr


def test_evaluate_pointed_at_the_checkpoints_folder_says_which_folder_to_give(tmp_path):
    from resnet_jax import checkpoint

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=f"did you mean {tmp_path}\\?"):
        checkpoint.Checkpoints(str(tmp_path / "checkpoints"), read_only=True).resolve("latest")


def test_a_refused_run_leaves_no_empty_workdir(tmp_path):
    from resnet_jax import errors, train

    with pytest.raises(errors.UserError):
        train.train_and_evaluate(
            digits_config(dataset=f"folder:{tmp_path / 'no_such_folder'}"), str(tmp_path / "w")
        )
    assert not (tmp_path / "w").exists()


def test_train_and_benchmark_share_one_definition_of_the_multi_host_flags():
    helps = [run_script(script, "--helpfull").stdout for script in ("train.py", "benchmark.py")]
    for flag in ("--coordinator_address", "--num_processes", "--process_id", "--[no]distributed"):
        lines = [
            [line.strip() for line in text.splitlines() if line.strip().startswith(flag)] for text in helps
        ]
        assert lines[0] and lines[0] == lines[1], flag
    assert all("resnet_jax.cli:" in text for text in helps)


def test_errors_have_the_type_of_their_cause(tmp_path):
    from resnet_jax import cli, data, errors, predict

    (tmp_path / "broken.png").write_bytes(b"not an image")
    info = data.load(digits_config()).info
    with pytest.raises(errors.ImageError, match="cannot read image .*broken.png"):
        predict.read_images([str(tmp_path / "broken.png")], info)
    config = ml_collections.ConfigDict({"learning_rate": 0.1, "model": "resnet20"})
    with pytest.raises(errors.ConfigError, match="did you mean 'learning_rate'"):
        cli.apply_config_overrides(config, ["--config.learnng_rate=0.2"])
    with pytest.raises(errors.ConfigError, match="config.learning_rate takes a number"):
        cli.apply_config_overrides(config, ["--config.learning_rate=fast"])
    with pytest.raises(errors.ConfigError, match="does not exist"):
        cli.load_config(tmp_path / "missing.py")
