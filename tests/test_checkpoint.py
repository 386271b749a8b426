"""Checkpoints: exact resume after SIGKILL, SIGTERM, retention, corruption, bad states, evaluate/predict."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from resnet_jax import checkpoint, data, inference, loop, train
from tests.conftest import ROOT, digits_config, run_script, xla_flags_with

STEPS = 60
# Bit-identical runs on a GPU need deterministic kernels (no atomics in reductions or in cuDNN's
# backward algorithms); the flag is ignored on CPU and TPU. Both runs of a comparison also share the
# persistent compilation cache (conftest), so they run the same executable with the same autotuned
# convolution algorithms.
DETERMINISTIC = {"XLA_FLAGS": xla_flags_with("--xla_gpu_deterministic_ops=true")}
RUN_FLAGS = [
    "--config",
    "configs/digits.py",
    f"--config.num_train_steps={STEPS}",
    "--config.checkpoint_every_steps=10",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=1000",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """An uninterrupted 60-step digits run: the reference for resume, and a checkpoint to evaluate."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run_script("train.py", "--workdir", str(workdir), *RUN_FLAGS, env=DETERMINISTIC)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def final_eval(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_accuracy" in r][-1]


def assert_same_tree(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.accelerator
def test_resume_after_sigkill_is_bit_identical(trained_run, tmp_path):
    command = [sys.executable, "train.py", "--workdir", str(tmp_path), *RUN_FLAGS]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **DETERMINISTIC},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "checkpoints" / "10"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at and killed_at[-1] < STEPS

    result = run_script("train.py", "--workdir", str(tmp_path), *RUN_FLAGS, env=DETERMINISTIC)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from the checkpoint of step {killed_at[-1]}" in result.stdout

    straight, resumed = inference.load_trained(str(trained_run)), inference.load_trained(str(tmp_path))
    assert straight.step == resumed.step == STEPS
    assert_same_tree(straight.state.params, resumed.state.params)
    assert_same_tree(straight.state.batch_stats, resumed.state.batch_stats)
    assert final_eval(trained_run)["eval_accuracy"] == final_eval(tmp_path)["eval_accuracy"]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    command = [
        sys.executable,
        "train.py",
        "--config",
        "configs/digits.py",
        "--workdir",
        str(tmp_path),
        "--config.num_train_steps=100000",
        "--config.checkpoint_every_steps=100000",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "compile + first step" in line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("preempted at step"))
    step = int(line.split()[3].rstrip(","))
    assert line == f"preempted at step {step}, checkpoint saved"
    assert checkpoint.Checkpoints(str(tmp_path), read_only=True).steps() == [step]


@pytest.mark.accelerator
def test_evaluate_reproduces_the_final_eval(trained_run):
    result = run_script(
        "-m",
        "resnet_jax.evaluate",
        "--workdir",
        str(trained_run),
        "--checkpoint",
        "latest",
        env=DETERMINISTIC,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((trained_run / f"eval_step{STEPS}.json").read_text())
    expected = final_eval(trained_run)
    assert scores["num_examples"] == 360
    assert scores["eval_accuracy"] == pytest.approx(expected["eval_accuracy"], abs=1e-7)
    assert scores["eval_top5_accuracy"] == pytest.approx(expected["eval_top5_accuracy"], abs=1e-7)
    assert f"top-1 {expected['eval_accuracy']:.2%}" in result.stdout


@pytest.mark.accelerator
def test_predict_on_image_files_matches_the_final_eval(trained_run, tmp_path):
    eval_split = data.load_digits(8).eval_source
    paths = []
    for i in range(len(eval_split)):
        path = tmp_path / f"{i}.png"
        Image.fromarray(eval_split.images[i][..., 0]).save(path)
        paths.append(str(path))
    result = run_script(
        "-m",
        "resnet_jax.predict",
        "--workdir",
        str(trained_run),
        "--json",
        "--top_k",
        "3",
        *paths,
        env=DETERMINISTIC,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout)
    assert len(predictions) == 360 and len(predictions[0]["top_k"]) == 3
    correct = sum(int(p["top_k"][0]["class"]) == eval_split.labels[i] for i, p in enumerate(predictions))
    assert correct / 360 == pytest.approx(final_eval(trained_run)["eval_accuracy"], abs=1e-6)
    probabilities = [c["probability"] for c in predictions[0]["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_predict_skips_unreadable_inputs_searches_folders_and_fails_only_on_nothing(trained_run, tmp_path):
    eval_split = data.load_digits(8).eval_source
    (tmp_path / "folder" / "nested").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(eval_split.images[i][..., 0]).save(tmp_path / "folder" / "nested" / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    inputs = [str(tmp_path / name) for name in ("folder", "notes.txt", "broken.png", "missing.jpg")]
    result = run_script("-m", "resnet_jax.predict", f"--workdir={trained_run}", "--json", *inputs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p["image"] for p in json.loads(result.stdout)] == [
        str(tmp_path / "folder" / "nested" / f"{i}.png") for i in range(3)
    ]
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 4 and warnings[-1] == "warning: 3 input(s) skipped; classifying 3 image(s)"
    assert all(w.startswith("warning: skipped ") for w in warnings[:3]) and "missing.jpg" in warnings[0]
    nothing = run_script("-m", "resnet_jax.predict", f"--workdir={trained_run}", *inputs[1:])
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr
    assert nothing.stderr.strip().splitlines()[-1] == (
        "error: none of the 3 input(s) holds a readable image; nothing to classify"
    )


# ---------------------------------------------------------------- the manager on small states

INFO = data.DatasetInfo("toy", 2, (4, 4, 1), (0.0,), (1.0,), ("a", "b"), 10, 10)
CONFIG = ml_collections.ConfigDict({"model": "resnet20", "dataset": "digits"})


def toy_state(value):
    return {"w": jnp.full((3,), float(value)), "step": jnp.int32(value)}


def save_steps(workdir, accuracies, keep=2):
    checkpoints = checkpoint.Checkpoints(str(workdir), keep=keep, async_save=False)
    for step, accuracy in enumerate(accuracies, start=1):
        scores = None if accuracy is None else {"eval_accuracy": accuracy}
        checkpoints.save(step, toy_state(step), config=CONFIG, dataset_info=INFO, eval_metrics=scores)
    checkpoints.wait()
    return checkpoints


def test_keeps_the_last_k_plus_the_best(tmp_path):
    checkpoints = save_steps(tmp_path, [0.5, 0.9, 0.6, 0.7, 0.65, None], keep=2)
    assert checkpoints.steps() == [2, 5, 6]
    assert checkpoints.resolve("best") == 2 and checkpoints.resolve("latest") == 6
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint of step 3 .*\[2, 5, 6\]"):
        checkpoints.resolve("3")


@pytest.mark.parametrize("damage", ["deleted", "truncated", "metadata deleted"])
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    save_steps(tmp_path, [None, None, None], keep=3)
    state_dir = tmp_path / "checkpoints" / "3" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            if damage == "deleted" or (damage == "metadata deleted" and name == "_METADATA"):
                os.remove(path)
            elif damage == "truncated":
                os.truncate(path, os.path.getsize(path) // 3)
    checkpoints = checkpoint.Checkpoints(str(tmp_path), keep=3)
    abstract = jax.eval_shape(lambda: toy_state(0))
    # With the config, as train.py resumes: the layout check must not take a broken checkpoint for
    # a config change (which would refuse the resume instead of falling back).
    step, items = checkpoints.restore_latest(abstract, config=CONFIG)
    assert step == 2
    np.testing.assert_array_equal(items["state"]["w"], 2.0)
    warning = capsys.readouterr().err
    assert "checkpoint of step 3 is broken" in warning
    assert (tmp_path / "broken_checkpoints" / "3").exists() and checkpoints.steps() == [1, 2]


def test_a_failed_write_says_so_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    checkpoints = save_steps(tmp_path, [0.5], keep=2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.manager, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoints.save(2, toy_state(2), config=CONFIG, dataset_info=INFO)
    message = str(err.value)
    assert "step 2" in message and "No space left on device" in message and "steps [1]" in message
    assert checkpoints.steps() == [1]


def test_incompatible_config_changes_are_refused_and_harmless_ones_listed():
    saved = {"model": "resnet20", "dataset": "digits", "num_train_steps": 100, "log_every_steps": 10}
    config = ml_collections.ConfigDict(dict(saved, num_train_steps=200))
    assert checkpoint.check_compatible(saved, config, 50, "/w") == ["num_train_steps: 100 -> 200"]
    config.model = "resnet56"
    with pytest.raises(checkpoint.CheckpointError, match="config.model was 'resnet20' and is now 'resnet56'"):
        checkpoint.check_compatible(saved, config, 50, "/w")


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(tmp_path):
    train.train_and_evaluate(digits_config(num_train_steps=2, batch_size=32), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="config.model was 'resnet20' and is now 'resnet32'"):
        train.train_and_evaluate(
            digits_config(num_train_steps=4, batch_size=32, model="resnet32"), str(tmp_path)
        )


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_without_saving_the_bad_state(tmp_path):
    config = digits_config(
        num_train_steps=8,
        batch_size=32,
        learning_rate=1e30,
        warmup_epochs=0.0,
        lr_schedule="constant",
        checkpoint_every_steps=1,
        log_every_steps=100,
    )
    with pytest.raises(loop.NonFiniteError) as err:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(err.value)
    bad_step = int(message.split("at step ")[1].split(";")[0])
    saved = checkpoint.Checkpoints(str(tmp_path), read_only=True).steps()
    assert saved and max(saved) < bad_step
    assert f"Last good checkpoint: step {max(saved)}" in message

    config.skip_nonfinite_steps = True
    skipped = tmp_path / "skipping"
    state = train.train_and_evaluate(config, str(skipped))
    assert int(state.step) == 8
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    rows = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("train_nonfinite_steps", 0) for r in rows) >= 1
