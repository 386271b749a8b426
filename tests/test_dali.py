"""`config.loader="dali"`: DALI's CPU operators stand in for the GPU decoder, so everything but nvJPEG
is tested here. The refusals need no DALI; the rest skip cleanly without the `dali` extra."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import augment, dali, data, inference
from resnet_jax.config_checks import ConfigError, check_config
from tests.conftest import (
    ROOT,
    TINY_BENCHMARK,
    digits_config,
    run_script,
    start_two_processes,
    xla_flags_with,
)

needs_dali = pytest.mark.skipif(not dali.installed(), reason="the dali extra is not installed")
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def smooth(height, width, seed):
    """A photo-like field (a bicubic upsampling of noise): resizers agree on it up to rounding."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def write_folder(root, per_class=6, coloured=False):
    """Four classes of JPEGs of assorted sizes; `coloured`: each class one flat colour (its label)."""
    for label, colour in enumerate(COLOURS):
        directory = root / f"class{label}"
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = 48 + 8 * i, 64 + 4 * (i % 3)
            pixels = np.full((height, width, 3), colour, np.uint8) if coloured else smooth(height, width, i)
            Image.fromarray(pixels).save(directory / f"{i}.jpg", quality=95)
    return root


def dali_flags(root):
    """train.py's flags for a small DALI run on the folder `root`."""
    return [
        "--config=configs/digits.py",
        f"--config.dataset=folder:{root}",
        "--config.loader=dali",
        "--config.augment=imagenet",
        "--config.image_size=32",
        "--config.batch_size=8",
        "--config.eval_images=0",
    ]


def train_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows if "train_loss" in row]


def config_for(root, **overrides):
    options = dict(dataset=f"folder:{root}", image_size=32, augment="imagenet", batch_size=8)
    return check_config(digits_config(**{**options, **overrides}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loader="dail"), "config.loader='dail' is not valid; choose one of: grain, dali"),
        (
            dict(loader="dali", dataset="folder:/x", auto_augment="randaugment"),
            "config.loader='dali' cannot apply config.auto_augment='randaugment' (DALI has no such "
            "policy); use config.loader='grain' or config.auto_augment='none'",
        ),
        (
            dict(loader="dali", dataset="folder:/x", random_erase_prob=0.25),
            "config.loader='dali' cannot apply config.random_erase_prob=0.25 (DALI has no random "
            "erasing); use config.loader='grain' or config.random_erase_prob=0",
        ),
        (
            dict(loader="dali"),
            "config.loader='dali' decodes image files and config.dataset='digits' has none; "
            "use config.loader='grain'",
        ),
    ],
)
def test_a_bad_loader_and_what_dali_cannot_do_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(digits_config(**overrides))
    assert str(error.value) == message


def test_dali_missing_is_named_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if "dali" in name else real(name))
    with pytest.raises(
        ConfigError, match=r"needs NVIDIA DALI, which is not installed: pip install -e '\.\[dali\]'"
    ):
        check_config(digits_config(loader="dali", dataset="folder:/x"))


def test_the_eval_region_is_torchvisions_resize_and_center_crop():
    # Resizing the region to size x size samples the points that resizing, then cropping, keeps.
    for height, width, size, crop in [(375, 500, 224, 0.875), (500, 333, 224, 0.875), (64, 64, 32, 1.0)]:
        y0, x0, y1, x1 = dali.eval_region(height, width, size, crop)
        short = round(size / crop)
        scale = min(height, width) / short
        assert (y1 - y0, x1 - x0) == pytest.approx(
            (size * height / round(height / scale), size * width / round(width / scale)), rel=0.01
        )
        assert (y0 + y1) / 2 == pytest.approx(height / 2, abs=scale) and (x0 + x1) / 2 == pytest.approx(
            width / 2, abs=scale
        )


@needs_dali
def test_a_refused_augmentation_or_channel_count_names_both_loaders(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=2)
    with pytest.raises(ConfigError, match=r"config.augment\); use config.loader='grain'"):
        data.load(config_for(root, loader="dali", augment="cifar"))


@needs_dali
def test_train_crops_are_the_grain_paths_boxes_and_flips_decoded_by_dali(tmp_path):
    """The same seed gives the same boxes and flips as grain's own crop (the draws are the same
    functions on the same random stream), so the two paths' images differ by resampling only: a
    wrong anchor order, box or flip would differ by far more."""
    root = write_folder(tmp_path / "imgs")
    grain_ds, dali_ds = data.load(config_for(root)), data.load(config_for(root, loader="dali"))
    assert dali_ds.info == grain_ds.info and dali_ds.decoder is not None
    grain_batch = next(data.train_loader(grain_ds, global_batch_size=24, seed=3))
    dali_batch = next(data.train_loader(dali_ds, global_batch_size=24, seed=3))
    images = dali_ds.host_images(dali_batch, train=True)
    assert images.shape == grain_batch["image"].shape == (24, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(dali_batch["label"], grain_batch["label"])
    difference = np.abs(images.astype(np.float32) - grain_batch["image"])
    assert difference.mean() < 4.0, difference.mean()
    flipped = np.abs(images[:, :, ::-1].astype(np.float32) - grain_batch["image"]).mean(axis=(1, 2, 3))
    assert (difference.mean(axis=(1, 2, 3)) < flipped).all()  # every flip agrees


@needs_dali
def test_labels_travel_with_their_images(tmp_path):
    root = write_folder(tmp_path / "imgs", coloured=True)
    dataset = data.load(config_for(root, loader="dali"))
    batch = next(data.train_loader(dataset, global_batch_size=16, seed=0))
    images = dataset.host_images(batch, train=True).reshape(16, -1, 3).mean(axis=1)
    expected = np.asarray(COLOURS, np.float32)[batch["label"]]
    np.testing.assert_allclose(images, expected, atol=3)


@needs_dali
def test_eval_pixels_are_within_tolerance_of_the_grain_path(tmp_path):
    root = write_folder(tmp_path / "imgs")
    grain_ds = data.load(config_for(root, eval_image_size=40, eval_crop_pct=0.875))
    dali_ds = data.load(config_for(root, loader="dali", eval_image_size=40, eval_crop_pct=0.875))
    grain_batch = next(data.eval_batches(grain_ds, global_batch_size=64))
    dali_batch = next(data.eval_batches(dali_ds, global_batch_size=64))
    np.testing.assert_array_equal(dali_batch["mask"], grain_batch["mask"])  # padding masked alike
    keep = grain_batch["mask"] > 0
    images = dali_ds.host_images(dali_batch)[keep].astype(np.float32)
    difference = np.abs(images - grain_batch["image"][keep])
    assert images.shape[1:] == (40, 40, 3)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12, (
        difference.mean(),
        difference.max(),
    )


@needs_dali
def test_unreadable_truncated_grayscale_and_cmyk_files_are_handled_like_grain(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root / "train", per_class=2)
    write_folder(root / "val", per_class=1)
    odd = root / "train" / "class0"
    Image.fromarray(smooth(40, 50, 7)[..., 0]).save(odd / "gray.jpg")
    Image.fromarray(smooth(40, 50, 8)).convert("CMYK").save(odd / "cmyk.jpg")
    whole = (odd / "0.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (odd / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    dataset = data.load(config_for(root, loader="dali"))
    train = dataset.train_source
    names = [train.describe(i).rsplit("/", 1)[-1] for i in range(len(train))]
    batch = data.stack_examples(
        [dataset.train_transform(train[i], np.random.default_rng(i)) for i in range(len(train))]
    )
    images = dataset.host_images(batch, train=True)
    assert images.shape == (len(train), 32, 32, 3)
    gray = images[names.index("gray.jpg")]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    grain_ds = data.load(config_for(root))
    grain_batch = data.stack_examples(
        [
            grain_ds.train_transform(grain_ds.train_source[i], np.random.default_rng(i))
            for i in range(len(train))
        ]
    )
    # The broken and the truncated file are passed over (and counted) exactly as grain passes them.
    assert batch["skipped"].sum() == 2
    np.testing.assert_array_equal(batch["skipped"], grain_batch["skipped"])
    np.testing.assert_array_equal(batch["label"], grain_batch["label"])
    cmyk = images[names.index("cmyk.jpg")].astype(np.float32)
    reference = augment.decode_crop_resize(
        augment.EncodedImage((odd / "cmyk.jpg").read_bytes(), "cmyk"),
        tuple(np.r_[batch["box"][names.index("cmyk.jpg")]][[1, 0, 3, 2]]),
        32,
        3,
        draft=False,
    )
    reference = np.asarray(reference, np.float32)
    if batch["flip"][names.index("cmyk.jpg")]:
        reference = reference[:, ::-1]
    assert np.abs(cmyk - reference).mean() < 6


@needs_dali
def test_train_py_with_dali_on_eight_devices_resumes_after_sigkill_to_the_same_state(tmp_path):
    """The command users run, on 8 virtual devices: a run killed after its checkpoint of step 4 and
    started again ends with the parameters of an uninterrupted run (the same images, in the same
    order, with the same crops)."""
    root = write_folder(tmp_path / "imgs")
    command = [*dali_flags(root), "--config.num_train_steps=12", "--config.checkpoint_every_steps=4"]
    env = {"XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=8")}
    straight = run_script("train.py", *command, f"--workdir={tmp_path / 'straight'}", env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "8 device(s)" in straight.stdout + straight.stderr
    workdir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "train.py", *command, f"--workdir={workdir}"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_script("train.py", *command, f"--workdir={workdir}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint of step" in resumed.stdout
    a, b = inference.load_trained(str(tmp_path / "straight")), inference.load_trained(str(workdir))
    assert a.step == b.step == 12
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@needs_dali
def test_two_processes_train_like_one_process_with_as_many_devices(tmp_path):
    """Each process prepares and decodes only its rows: the two-process run's losses are the
    one-process run's (4 devices either way)."""
    root = write_folder(tmp_path / "imgs")
    command = ["train.py", *dali_flags(root), "--config.num_train_steps=2", "--config.log_every_steps=1"]
    one = run_script(
        *command,
        f"--workdir={tmp_path / 'one'}",
        env={"XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=4")},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    processes = start_two_processes(command, f"--workdir={tmp_path / 'two'}")
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=1e-4)


@needs_dali
def test_benchmark_feeds_the_step_from_both_loaders_beside_device_batches(tmp_path):
    root = write_folder(tmp_path / "imgs")
    out = tmp_path / "rows.json"
    result = run_script(
        *TINY_BENCHMARK,
        f"--data=device,folder:{root}",
        "--loader=grain,dali",
        f"--json={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["data"], r["loader"]) for r in rows] == [
        ("device", "-"),
        (f"folder:{root}", "grain"),
        (f"folder:{root}", "dali"),
    ]
    assert all(r["images_per_sec"] > 0 for r in rows)
    header = result.stdout.splitlines()[0].split()
    assert header[6:8] == ["data", "loader"]  # the table says which feed each row had


@needs_dali
def test_tfds_images_decode_through_dali_with_their_labels():
    """TFDS hands over its stored JPEG bytes (or pixels, as lossless PNG) to the same pipeline."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        config = check_config(digits_config(dataset="tfds:imagenet2012", image_size=24, loader="dali"))
        dataset = data.load(config)
        batch = next(data.train_loader(dataset, global_batch_size=8, seed=0))
        evals = next(data.eval_batches(dataset, global_batch_size=12))
        source_labels = [int(dataset.train_source[i]["label"]) for i in range(12)]
    assert dataset.decoder is not None and dataset.info.augment == "imagenet"
    assert dataset.host_images(batch, train=True).shape == (8, 24, 24, 3)
    assert dataset.host_images(evals).shape == (12, 24, 24, 3) and evals["mask"].sum() == 12
    assert set(batch["label"].tolist()) <= set(source_labels)


@needs_dali
def test_exif_rotated_jpegs_are_cropped_where_grain_crops_them(tmp_path):
    """Phone photos carry an EXIF orientation; grain draws boxes in the stored orientation and never
    rotates, so DALI must not rotate either (or its crops land elsewhere)."""
    root = write_folder(tmp_path / "imgs", per_class=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    ramp = np.broadcast_to(np.linspace(0, 255, 72, dtype=np.float32)[None, :, None], (40, 72, 3))
    for label in range(len(COLOURS)):  # dark to bright along the stored width: a rotation shows
        Image.fromarray(ramp.astype(np.uint8)).save(root / f"class{label}" / "phone.jpg", exif=exif)
    grain_ds, dali_ds = data.load(config_for(root)), data.load(config_for(root, loader="dali"))
    train = dali_ds.train_source
    rows = [i for i in range(len(train)) if train.describe(i).endswith("phone.jpg")]
    assert rows
    prepared = data.stack_examples(
        [dali_ds.train_transform(train[i], np.random.default_rng(i)) for i in rows]
    )
    reference = data.stack_examples(
        [grain_ds.train_transform(grain_ds.train_source[i], np.random.default_rng(i)) for i in rows]
    )
    difference = np.abs(dali_ds.host_images(prepared, train=True).astype(np.float32) - reference["image"])
    assert difference.mean() < 4.0, difference.mean()
    # The eval path decodes whole images, where DALI's default would rotate them.
    prepared = data.stack_examples([dali_ds.eval_transform(train[i]) for i in rows])
    reference = data.stack_examples([grain_ds.eval_transform(grain_ds.train_source[i]) for i in rows])
    difference = np.abs(dali_ds.host_images(prepared).astype(np.float32) - reference["image"])
    assert difference.mean() < 2.0, difference.mean()


@needs_dali
def test_a_batch_dali_cannot_decode_is_decoded_on_the_host_with_a_warning(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "imgs", per_class=2)
    dataset = data.load(config_for(root, loader="dali"))
    batch = next(data.train_loader(dataset, global_batch_size=8, seed=0))
    decoded = dataset.host_images(batch, train=True)
    pipe = dataset.decoder.pipeline(True, None, 8)

    def refuse():
        raise RuntimeError("nvImageCodec: unsupported JPEG\ntraceback lines")

    monkeypatch.setattr(pipe, "outputs", refuse)
    fallback = dataset.host_images(batch, train=True)
    assert "DALI could not decode a batch (nvImageCodec: unsupported JPEG); decoding it on the host" in (
        capsys.readouterr().err
    )
    assert fallback.shape == decoded.shape and fallback.dtype == np.uint8
    assert np.abs(fallback.astype(np.float32) - decoded).mean() < 4.0
