"""`python -m resnet_jax.plot`: curves of several runs into one PNG, and its errors."""

import json

import pytest

from resnet_jax import plot
from tests.conftest import run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(workdir, steps, scale):
    workdir.mkdir()
    rows = []
    for step in steps:
        rows.append(
            {"step": step, "train_loss": scale / step, "train_accuracy": 1 - 1 / step, "learning_rate": 0.1}
        )
        if step % 20 == 0:
            rows.append({"step": step, "eval_loss": scale / step, "eval_accuracy": 1 - 2 / step})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def test_plot_command_writes_a_png_of_two_runs(tmp_path):
    a = write_run(tmp_path / "run_a", range(10, 101, 10), 2.0)
    b = write_run(tmp_path / "run_b", range(5, 61, 5), 3.0)
    out = tmp_path / "curves.png"
    result = run_script("-m", "resnet_jax.plot", str(a), str(b), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes().startswith(PNG_SIGNATURE) and out.stat().st_size > 10_000
    assert f"wrote {out}" in result.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    default = run_script("-m", "resnet_jax.plot", str(a), str(b), cwd=elsewhere)
    assert default.returncode == 0, default.stderr[-2000:]
    assert (a / "curves.png").exists() and not list(elsewhere.iterdir())  # not into the cwd


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path):
    run = write_run(tmp_path / "run", [10, 20], 1.0)
    with open(run / "metrics.jsonl", "a") as f:  # a resumed run logs step 20 again
        f.write(json.dumps({"step": 20, "train_loss": 0.01}) + "\n")
    series = plot.read_metrics(str(run))
    assert series["train_loss"] == ([10, 20], [0.1, 0.01])
    assert series["eval_accuracy"] == ([20], [0.9])


def test_read_metrics_takes_tensorboard_tags_as_their_metrics_jsonl_keys(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "train/loss": 0.5, "train/learning_rate": 0.1}, {"step": 10, "eval/accuracy": 0.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {"train_loss": [0.5], "learning_rate": [0.1], "eval_accuracy": [0.9]}
    assert plot.read_metrics(str(run)) == {key: ([10], values) for key, values in expected.items()}


def test_same_folder_names_are_told_apart_by_their_paths(tmp_path):
    assert plot.run_label("x/a", ["x/a", "y/a"]) == "x/a"
    assert plot.run_label("x/a/", ["x/a/", "y/b"]) == "a"


def test_a_workdir_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert f"error: '{tmp_path}' has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(plot.PlotError, match="metrics.jsonl:1 is not a metrics row"):
        plot.read_metrics(str(tmp_path))
