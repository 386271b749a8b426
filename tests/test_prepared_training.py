"""Training from `prepared:DIR`: the same crops as from the folder it was made from, every eval
example counted, the original eval split when only train was prepared, and train.py's exact resume
after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from resnet_jax import data, inference, prepare, shards
from tests.conftest import ROOT, digits_config, run_script
from tests.test_checkpoint import DETERMINISTIC, assert_same_tree

SIZE = 16  # train and eval at 16 px, from images stored at a shorter side of at most 24


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """scikit-learn's digits as JPEG files of varied sizes (32-48 px, either orientation)."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    rng = np.random.default_rng(0)
    for i in range(300):
        pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
        width, height = (int(v) for v in rng.integers(32, 49, size=2))
        image = Image.fromarray(pixels).resize((width, height), Image.BICUBIC).convert("RGB")
        directory = root / str(digits.target[i])
        directory.mkdir(exist_ok=True)
        image.save(directory / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def prepared(digit_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    args = ["--data", f"folder:{digit_files}", "--out", str(out), "--shorter_side", "24"]
    assert prepare.main([*args, "--quality", "90", "--processes", "1", "--shard_size", "64"]) == 0
    return out


def config_for(spec, **overrides):
    return digits_config(dataset=spec, image_size=SIZE, augment="imagenet", **overrides)


def test_prepared_shards_give_the_folders_crops_labels_and_eval_examples(digit_files, prepared):
    folder = data.load(config_for(f"folder:{digit_files}"))
    shrunk = data.load(config_for(f"prepared:{prepared}"))
    assert shrunk.info.num_train == folder.info.num_train and shrunk.info.num_eval == folder.info.num_eval
    assert shrunk.info.class_names == folder.info.class_names
    a = next(data.train_loader(folder, global_batch_size=64, seed=3))
    b = next(data.train_loader(shrunk, global_batch_size=64, seed=3))
    np.testing.assert_array_equal(a["label"], b["label"])  # the same order
    same = np.abs(a["image"].astype(float) - b["image"].astype(float)).mean((1, 2, 3))
    shifted = np.abs(a["image"].astype(float) - np.roll(b["image"], 1, axis=0).astype(float)).mean((1, 2, 3))
    # The same crop of the same digit at a lower stored resolution: close, far closer than neighbours.
    assert same.mean() < 15 and same.mean() < shifted.mean() / 3, (same.mean(), shifted.mean())
    for stat in (np.mean, np.std):  # crop statistics over the batch
        assert abs(stat(a["image"].astype(float)) - stat(b["image"].astype(float))) < 3

    batches = list(data.eval_batches(shrunk, global_batch_size=7))  # 7 divides no split here
    labels = np.concatenate([batch["label"][batch["mask"] > 0] for batch in batches])
    assert len(labels) == shrunk.info.num_eval
    np.testing.assert_array_equal(
        np.sort(labels), np.sort([folder.eval_source[i]["label"] for i in range(folder.info.num_eval)])
    )


def test_prepared_train_split_alone_evaluates_on_the_original_files(digit_files, tmp_path):
    out = tmp_path / "train_only"
    args = ["--data", f"folder:{digit_files}", "--out", str(out), "--shorter_side", "24", "--quality", "90"]
    assert prepare.main([*args, "--splits", "train", "--processes", "1"]) == 0
    assert not any(name.startswith("eval-") for name in os.listdir(out))
    dataset = data.load(config_for(f"prepared:{out}"))
    eval_files = dataset.eval_source.paths
    assert eval_files and all(path.startswith(str(digit_files)) for path in eval_files)
    assert dataset.info.num_eval == len(eval_files) and dataset.info.num_train == 300 - len(eval_files)


def test_an_unfinished_or_foreign_folder_is_refused_in_one_line(prepared, tmp_path):
    with pytest.raises(data.sources.DatasetError, match="has no prepared.json; write one with"):
        data.load(config_for(f"prepared:{tmp_path}"))
    (tmp_path / shards.STATE).write_text("{}")
    with pytest.raises(data.sources.DatasetError, match="unfinished prepare run; run the same"):
        data.load(config_for(f"prepared:{tmp_path}"))
    with pytest.raises(data.sources.DatasetError, match="is not a directory"):
        data.load(config_for(f"prepared:{tmp_path / 'missing'}"))


RUN_FLAGS = [
    "--config",
    "configs/digits.py",
    f"--config.image_size={SIZE}",
    "--config.augment=imagenet",
    "--config.num_train_steps=40",
    "--config.batch_size=32",
    "--config.checkpoint_every_steps=10",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=1000",
    "--config.eval_images=0",
]


@pytest.mark.slow
def test_training_from_shards_resumes_bit_identically_after_sigkill(prepared, tmp_path):
    flags = [*RUN_FLAGS, f"--config.dataset=prepared:{prepared}"]
    straight = tmp_path / "straight"
    result = run_script("train.py", "--workdir", str(straight), *flags, env=DETERMINISTIC)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping unreadable" not in result.stderr, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "train.py", "--workdir", str(killed), *flags],
        cwd=ROOT,
        env={**os.environ, **DETERMINISTIC},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = run_script("train.py", "--workdir", str(killed), *flags, env=DETERMINISTIC)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint of step" in result.stdout

    a, b = inference.load_trained(str(straight)), inference.load_trained(str(killed))
    assert a.step == b.step == 40
    assert_same_tree(a.state.params, b.state.params)
    assert_same_tree(a.state.batch_stats, b.state.batch_stats)
    evals = [
        [
            json.loads(line)
            for line in (w / "metrics.jsonl").read_text().splitlines()
            if "eval_accuracy" in line
        ]
        for w in (straight, killed)
    ]
    assert evals[0][-1]["eval_accuracy"] == evals[1][-1]["eval_accuracy"]
