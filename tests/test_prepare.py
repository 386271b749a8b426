"""`python -m resnet_jax.prepare`: shards that read back, identical bytes, resume after SIGKILL,
unreadable files counted, bad arguments refused in one line."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import data, prepare, shards, sources
from tests.conftest import ROOT, digits_config, run_script

ARGS = ["--shorter_side", "24", "--quality", "85", "--shard_size", "8"]


def write_images(root, count, classes=3, seed=0):
    """JPEGs of varied sizes and aspects (some already small, one PNG and one grayscale per class)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = (int(v) for v in rng.integers(16, 60, size=2))
        base = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
        directory = root / f"class{i % classes}"
        directory.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels)
        if i < classes:
            image.save(directory / f"{i:04d}.png")
        elif i < 2 * classes:
            image.convert("L").save(directory / f"{i:04d}.jpg", quality=90)
        else:
            image.save(directory / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = write_images(tmp_path_factory.mktemp("images"), 60)
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    truncated = (root / "class2" / "0005.jpg").read_bytes()
    (root / "class2" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    return root


def read_back(out, split="train"):
    document = json.loads((out / shards.METADATA).read_text())
    paths = shards.split_paths(str(out), document, split)
    source = shards.PreparedSource(paths, mark_valid=False)
    records = [shards.decode_record(source.records[i]) for i in range(len(source))]
    return document, records


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".array_record"}


def run_prepare(images, out, *extra):
    """The command line, as users run it."""
    return run_script(
        "-m", "resnet_jax.prepare", "--data", f"folder:{images}", "--out", str(out), *ARGS, *extra
    )


def test_prepare_writes_shards_that_read_back_with_their_labels_and_counts_unreadable_files(images, tmp_path):
    out = tmp_path / "prepared"
    result = run_prepare(images, out, "--processes", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    document, records = read_back(out)
    train = document["splits"]["train"]
    unreadable = {
        os.path.basename(c["name"]) for split in document["splits"].values() for c in split["corrupt"]
    }
    assert unreadable == {"broken.jpg", "truncated.jpg"}
    for name in unreadable:
        assert f"skipping unreadable image {images}" in result.stderr and name in result.stderr
    assert sum(s["examples"] + len(s["corrupt"]) for s in document["splits"].values()) == 62
    assert train["examples"] == len(records) == train["source_examples"] - len(train["corrupt"])
    assert document["class_names"] == ["class0", "class1", "class2"]
    for label, name, jpeg in records:  # every record: its own file's class, a JPEG within the size
        assert os.path.basename(os.path.dirname(name)) == f"class{label}"
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) <= 24
            original = Image.open(name)
            if min(original.size) > 24:  # resized, keeping the aspect
                assert min(image.size) == 24
                assert abs(image.size[0] / image.size[1] - original.size[0] / original.size[1]) < 0.1
    assert 0 < train["kept"] < train["examples"] and train["resized"] > 0
    assert len(document["stats"]["mean"]) == 3 and all(0 < s < 128 for s in document["stats"]["std"])
    assert "| train |" in result.stdout and f"prepared:{out}" in result.stdout

    # Same command into another folder with two processes: the same bytes; a re-run changes nothing.
    again = tmp_path / "again"
    result = run_prepare(images, again, "--processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert shard_bytes(again) == shard_bytes(out)
    assert (again / shards.METADATA).read_bytes() == (out / shards.METADATA).read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run_prepare(images, out)
    assert result.returncode == 0 and "is complete" in result.stderr, result.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # A lost shard is written again; the others are kept.
    lost = sorted(shard_bytes(out))[1]
    (out / lost).unlink()
    assert prepare.main(["--data", f"folder:{images}", "--out", str(out), *ARGS, "--processes", "1"]) == 0
    assert shard_bytes(out) == shard_bytes(again)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in (lost, shards.METADATA)} == {
        name: t for name, t in before.items() if name not in (lost, shards.METADATA)
    }


def test_a_tfds_dataset_is_prepared_from_its_records(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        settings = prepare.Settings("tfds:cifar10", shorter_side=24, quality=90, shard_size=8)
        document = prepare.prepare(settings, str(tmp_path), processes=1, report=lambda message: None)
        dataset = data.load(digits_config(dataset=f"prepared:{tmp_path}", image_size=16))
    assert document["splits"]["train"]["examples"] == 20 == dataset.info.num_train
    assert document["source_size"] == 24 and dataset.info.augment == "cifar"  # 32 px stored at 24
    assert len(dataset.info.class_names) == 10 == len(document["class_names"])
    assert dataset.info.mean == pytest.approx(sources.KNOWN_STATS["cifar10"][0])  # a known dataset's
    _, records = read_back(tmp_path)
    assert [name for _, name, _ in records[:2]] == ["cifar10:train[0]", "cifar10:train[1]"]


def test_a_killed_prepare_resumes_and_ends_with_the_same_bytes(tmp_path):
    images = write_images(tmp_path / "images", 240, seed=1)
    straight = tmp_path / "straight"
    assert (
        prepare.main(["--data", f"folder:{images}", "--out", str(straight), *ARGS, "--processes", "1"]) == 0
    )

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "resnet_jax.prepare", "--data", f"folder:{images}", "--out", str(out)]
    command += [*ARGS, "--shard_size", "2", "--processes", "1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / shards.STATE
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if state.exists() and len(json.loads(state.read_text() or "{}").get("shards", {})) >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, "prepare ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / shards.METADATA).exists()
    finished = set(json.loads(state.read_text())["shards"])

    result = run_script(*command[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {len(finished)} of " in result.stderr
    assert not state.exists()
    # Compared with an uninterrupted run of the same arguments (shard size 2): the same bytes.
    reference = tmp_path / "reference"
    assert prepare.main([*command[3:6], str(reference), *command[7:]]) == 0
    assert shard_bytes(out) == shard_bytes(reference)
    assert read_back(out)[1] == read_back(reference)[1]
    assert [r[0] for r in read_back(out)[1]] == [r[0] for r in read_back(straight)[1]]


def exit_status(argv):
    try:
        return prepare.main(argv)
    except SystemExit as e:  # flags that do not parse end in cli.fail
        return e.code


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shorter_side", "0", "--quality", "90"], "--shorter_side=0 must be a positive number"),
        (["--shorter_side", "256", "--quality", "101"], "--quality=101 must be a JPEG quality in 1..100"),
        (["--shorter_side", "256", "--quality", "0"], "--quality=0 must be a JPEG quality in 1..100"),
        (["--shorter_side", "256"], "--quality is required"),
        (["--shorter_side", "256", "--quality", "90", "--splits", "eval"], "--splits='eval' must be train"),
    ],
)
def test_bad_arguments_are_one_line(images, tmp_path, capsys, args, message):
    assert exit_status(["--data", f"folder:{images}", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_other_files_or_other_settings_is_refused(images, tmp_path, capsys):
    def prepare_into(out, *args):
        code = exit_status(["--data", f"folder:{images}", "--out", str(out), *args])
        return code, capsys.readouterr().err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = prepare_into(busy, *ARGS)
    assert code == 2 and "holds files that prepare did not write (notes.txt)" in err
    assert sorted(os.listdir(busy)) == ["notes.txt"]

    out = tmp_path / "out"
    assert prepare_into(out, *ARGS, "--processes", "1")[0] == 0
    code, err = prepare_into(out, "--shorter_side", "24", "--quality", "70", "--shard_size", "8")
    assert code == 2 and "prepared with --quality=85, not 70" in err
    assert prepare.main(["--data", "digits", "--out", str(tmp_path / "d"), *ARGS]) == 2
    assert "--data='digits' holds no image files to prepare" in capsys.readouterr().err
    assert prepare.main(["--data", "imagenet", "--out", str(tmp_path / "d"), *ARGS]) == 2
    assert "--data='imagenet' is not a dataset spec" in capsys.readouterr().err
