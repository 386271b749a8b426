"""TFDS (through mock_data, offline) and image-folder datasets, and the augmentations they use."""

import io
import json
import pickle
import re
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, JpegImagePlugin

from resnet_jax import augment, data, sources, train
from resnet_jax.config_checks import ConfigError, check_config
from tests.conftest import ROOT, digits_config, module_available, run_script


def first_batch(dataset, batch_size=8):
    return next(data.train_loader(dataset, global_batch_size=batch_size, seed=0))


def all_eval_batches(dataset, batch_size):
    return list(data.eval_batches(dataset, global_batch_size=batch_size))


# ---------------------------------------------------------------- TFDS


def test_tfds_cifar10_has_its_classes_shape_statistics_and_cifar_augmentation():
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load(digits_config(dataset="tfds:cifar10", image_size=32))
        batch = first_batch(ds)
        evals = all_eval_batches(ds, 16)
    info = ds.info
    assert info.num_classes == len(info.class_names) == 10
    assert info.image_shape == (32, 32, 3) and (info.num_train, info.num_eval) == (40, 40)
    assert info.augment == "cifar" and info.eval_crop == 1.0
    assert info.mean == sources.KNOWN_STATS["cifar10"][0]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0 and batch["label"].max() < 10
    assert sum(b["mask"].sum() for b in evals) == 40 and len(evals) == 3  # 16 + 16 + 8 padded


def test_tfds_imagenet_resizes_variable_sizes_with_imagenet_augmentation():
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(digits_config(dataset="tfds:imagenet2012", image_size=24))
        sizes = {ds.train_source[i]["image"].shape for i in range(12)}
        batch = first_batch(ds)
        evals = all_eval_batches(ds, 5)
    assert len(sizes) > 1, "mock ImageNet images should vary in size"
    assert ds.info.num_classes == 1000 and ds.info.class_names[0] == "n01440764"
    assert ds.info.augment == "imagenet" and ds.info.eval_crop == augment.IMAGENET_EVAL_CROP
    assert batch["image"].shape == (8, 24, 24, 3) and batch["label"].max() < 1000
    assert [b["image"].shape for b in evals] == [(5, 24, 24, 3)] * 3
    assert sum(b["mask"].sum() for b in evals) == 12


def test_a_digits_config_pointed_at_imagenet_trains_1000_classes(tmp_path):
    config = digits_config(
        dataset="tfds:imagenet2012", image_size=16, batch_size=8, num_train_steps=2, eval_batch_size=8
    )
    with tfds.testing.mock_data(num_examples=10):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert state.params["fc"]["kernel"].shape[-1] == 1000
    names = json.loads((tmp_path / "class_names.json").read_text())
    assert len(names) == 1000 and names[0] == "n01440764"


def test_an_unprepared_tfds_dataset_says_where_tfds_looked_and_how_to_prepare_it(tmp_path):
    with pytest.raises(sources.DatasetError) as e:
        data.load(digits_config(dataset="tfds:cifar10", data_dir=str(tmp_path)))
    message = str(e.value)
    assert str(tmp_path / "cifar10") in message
    assert "tfds build cifar10 --file_format=array_record" in message
    with pytest.raises(sources.DatasetError, match="downloads/manual"):
        data.load(digits_config(dataset="tfds:imagenet2012", data_dir=str(tmp_path)))
    with pytest.raises(sources.DatasetError, match="nosuchdataset"):
        data.load(digits_config(dataset="tfds:nosuchdataset", data_dir=str(tmp_path)))


@pytest.mark.parametrize("where", ["data_dir", "TFDS_DATA_DIR"])
def test_train_py_reports_a_missing_dataset_in_one_message(tmp_path, where):
    """Through --config.data_dir, or tfds's default directory (TFDS_DATA_DIR, data_dir None), where
    TFDS 4.9.10 fails differently (a KeyError about empty splits)."""
    args = ["train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path / "run")]
    args.append("--config.dataset=tfds:cifar10")
    env = {"TFDS_DATA_DIR": str(tmp_path / "tfds")} if where == "TFDS_DATA_DIR" else {}
    if where == "data_dir":
        args.append(f"--config.data_dir={tmp_path / 'tfds'}")
    result = run_script(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert "tfds build cifar10" in result.stderr and "Traceback" not in result.stderr
    assert str(tmp_path / "tfds" / "cifar10") in result.stderr


# ---------------------------------------------------------------- image folders


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_folder(root, with_corrupt=True):
    """Two classes in every format and mode the loader must accept, plus one corrupt file."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for i in range(6):
        save(root / "cat" / f"cat{i}.jpg", rgb(20 + i, 30))
    save(root / "dog" / "gray.png", rng.integers(0, 256, (24, 24), dtype=np.uint8))
    save(root / "dog" / "rgba.png", rng.integers(0, 256, (24, 24, 4), dtype=np.uint8))
    Image.fromarray(rgb(24, 24)).convert("P").save(root / "dog" / "palette.bmp")
    save(root / "dog" / "nested" / "deep.webp", rgb(30, 22))
    save(root / "dog" / "dog4.jpg", rgb(26, 26))
    save(root / "dog" / "dog5.jpg", rgb(26, 26))
    (root / "dog" / "notes.txt").write_text("not an image")
    if with_corrupt:
        (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    return root


def folder_dataset(path, **overrides):
    return data.load(digits_config(dataset=f"folder:{path}", image_size=16, **overrides))


def test_a_folder_converts_every_mode_to_rgb_and_splits_each_class(tmp_path):
    ds = folder_dataset(make_folder(tmp_path / "pets", with_corrupt=False))
    info = ds.info
    assert info.class_names == ("cat", "dog") and info.image_shape == (16, 16, 3)
    assert info.num_train + info.num_eval == 12  # the .txt file is not an image
    eval_labels = [ds.eval_source.labels[i] for i in range(info.num_eval)]
    assert sorted(set(eval_labels)) == [0, 1]  # stratified: every class in the eval split
    for source in (ds.train_source, ds.eval_source):
        for i in range(len(source)):
            image, path = source[i]["image"], source.paths[i]
            # Complete JPEG/PNG files stay encoded until the transform crops them; the rest decode now.
            lazy = path.endswith((".jpg", ".png"))
            assert isinstance(image, augment.EncodedImage) == lazy, path
            assert ds.eval_transform(source[i])["image"].shape == (16, 16, 3), path
            assert ds.train_transform(source[i], np.random.default_rng(i))["image"].shape == (16, 16, 3)
    batch = first_batch(ds, 4)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["skipped"].sum() == 0
    again = folder_dataset(tmp_path / "pets")
    assert again.eval_source.paths == ds.eval_source.paths  # the split is fixed


def test_train_and_val_subfolders_are_used_when_present(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", with_corrupt=False)
    save(root / "val" / "dog" / "v.png", np.zeros((10, 10, 3), np.uint8))
    ds = folder_dataset(root)
    assert ds.info.class_names == ("cat", "dog")
    assert (ds.info.num_train, ds.info.num_eval) == (12, 1) and ds.eval_source[0]["label"] == 1


def make_split_folder(root):
    """train/ (with a corrupt file) and val/ (one good image per class and a corrupt file)."""
    make_folder(root / "train")
    save(root / "val" / "cat" / "c.png", np.full((10, 10, 3), 50, np.uint8))
    save(root / "val" / "dog" / "d.png", np.full((10, 10, 3), 90, np.uint8))
    (root / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def test_a_corrupt_file_is_skipped_with_a_warning_in_train_and_masked_in_eval(tmp_path, capsys):
    root = make_split_folder(tmp_path / "pets")
    whole = (root / "train" / "cat" / "cat0.jpg").read_bytes()
    truncated = root / "train" / "cat" / "truncated.jpg"  # a valid header, half the data
    truncated.write_bytes(whole[: len(whole) // 2])
    ds = folder_dataset(root)
    broken = (str(root / "train" / "cat" / "broken.jpg"), str(truncated))
    for broken_train in broken:
        example = ds.train_source[ds.train_source.paths.index(broken_train)]
        image = ds.train_transform(example, np.random.default_rng(0))["image"]
        assert example["skipped"] == 1 and image.shape == (16, 16, 3)
    err = capsys.readouterr().err  # (the statistics' samples may have met them first)
    assert all(f"skipping unreadable image {path}" in err for path in broken)
    masks = np.concatenate([b["mask"] for b in all_eval_batches(ds, 2)])
    assert len(masks) == 4 and masks.sum() == 2  # 3 files, one unreadable, one padding slot
    assert str(root / "val" / "dog" / "broken.png") in capsys.readouterr().err


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "is not a directory"),
        ("no_classes", "no class sub-directories"),
        ("empty_class", "class 'empty'"),
        ("unknown_val_class", re.escape("eval classes ['fox']")),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "d"
    if layout == "no_classes":
        save(root / "loose.png", np.zeros((4, 4, 3), np.uint8))
    elif layout == "empty_class":
        make_folder(root, with_corrupt=False)
        (root / "empty").mkdir()
    elif layout == "unknown_val_class":
        make_folder(root / "train", with_corrupt=False)
        save(root / "val" / "fox" / "f.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(sources.DatasetError, match=message):
        folder_dataset(root)


PLAIN_SCRIPT = """
from resnet_jax import train
from configs import digits


def main():
    config = digits.get_config()
    config.update(dataset="folder:{root}", image_size=16, batch_size=4, eval_batch_size=4,
                  num_train_steps=6, num_workers=2, log_every_steps=3)
    train.train_and_evaluate(config, "{workdir}")


if __name__ == "__main__":
    main()
"""


def test_worker_processes_load_a_folder_from_a_plain_script(tmp_path):
    root = make_split_folder(tmp_path / "pets")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(PLAIN_SCRIPT.format(root=root, workdir=tmp_path / "run")))
    result = run_script(str(script), env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final eval at step 6" in result.stdout
    names = json.loads((tmp_path / "run" / "class_names.json").read_text())
    assert names == ["cat", "dog"]
    # 6 steps of 4 over 13 train files: two epochs (3 steps each), each meets the broken file once.
    broken = str(root / "train" / "cat" / "broken.jpg")
    assert f"skipping unreadable image {broken}" in result.stderr
    assert "epoch 1: skipped 1 unreadable image(s)" in result.stderr
    assert "epoch 2: skipped 1 unreadable image(s)" in result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["train_skipped_images"] for line in lines if "train_skipped_images" in line] == [1, 1]
    assert "/2), top-5" in result.stdout  # the final eval counts the two readable val images


# ---------------------------------------------------------------- augmentation


def test_augmentations_keep_shape_dtype_and_pixels_and_are_seeded():
    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (40, 30, 3), dtype=np.uint8)
    for style in ("imagenet", "cifar", "shift", "none"):
        transform = augment.TrainTransform(style, 24, 3)
        out = transform({"image": image, "label": 0}, np.random.default_rng(7))["image"]
        again = transform({"image": image, "label": 0}, np.random.default_rng(7))["image"]
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8, style
        np.testing.assert_array_equal(out, again)
    small = image[:24, :24]
    shifted = augment.TrainTransform("cifar", 24, 3)({"image": small}, np.random.default_rng(3))["image"]
    allowed = set(np.unique(small)) | {0}  # a crop of the zero-padded image, maybe flipped
    assert set(np.unique(shifted)) <= allowed
    crops = {
        augment.random_resized_crop_and_flip(image, np.random.default_rng(s), 24).tobytes() for s in range(5)
    }
    assert len(crops) == 5


def test_eval_transform_resizes_the_shorter_side_then_center_crops():
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, 60:68] = 255  # a bright vertical bar in the middle
    out = augment.EvalTransform(28, 3, crop=0.875)({"image": image})["image"]
    assert out.shape == (28, 28, 3)
    assert out[:, 14].min() > 200 and out[:, 0].max() == 0  # centred: the bar stays in the middle
    gray = augment.EvalTransform(8, 1)({"image": np.full((8, 8, 3), 100, np.uint8)})["image"]
    assert gray.shape == (8, 8, 1) and gray.max() == 100


def test_auto_augmentation_by_dataset_and_size():
    assert augment.choose("auto", "digits", 8, 12) == "shift"
    assert augment.choose("auto", "cifar10", 32, 32) == "cifar"
    assert augment.choose("auto", "imagenet2012", None, 224) == "imagenet"
    assert augment.choose("none", "cifar10", 32, 32) == "none"
    with pytest.raises(ConfigError, match="config.augment='crop' is not valid; choose one of: auto, "):
        check_config(digits_config(augment="crop"))  # validated with the config, before any data


SAME_BATCHES_SCRIPT = """
import numpy as np
from resnet_jax import data, loader_benchmark


def take(workers):
    dataset = loader_benchmark.cifar_like(500)
    loader = data.train_loader(dataset, global_batch_size=32, seed=5, num_workers=workers)
    batches = [next(loader) for _ in range(20)]  # 640 > 500: crosses an epoch boundary
    state = loader.get_state()
    loader.close()
    return batches, state


if __name__ == "__main__":
    serial, _ = take(0)
    parallel, state = take(2)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    print("same batches; state", state)
"""


def test_worker_processes_give_the_same_batches_as_the_main_process(tmp_path):
    script = tmp_path / "same.py"
    script.write_text(SAME_BATCHES_SCRIPT)
    result = run_script(str(script), env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same batches" in result.stdout


def test_the_loader_benchmark_prints_a_row_per_worker_count(tmp_path):
    out = tmp_path / "loader.json"
    result = run_script(
        *("-m", "resnet_jax.loader_benchmark", "--kinds", "cifar", "--workers", "0", "--batches", "2"),
        *("--json", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| cifar 32px | - | grain | - | 0 | 128 |" in result.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["images_per_sec"] > 0 and row["workers"] == 0


def test_the_loader_benchmark_times_each_policy_and_decode_on_one_core(tmp_path):
    out = tmp_path / "loader.json"
    result = run_script(
        *("-m", "resnet_jax.loader_benchmark", "--kinds", "imagenet,trivialaugment,randaugment"),
        *("--decode", "reduced,full", "--workers", "0", "--cores", "1", "--batches", "1", "--images", "16"),
        *("--json", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["decode"]) for r in rows] == [
        (kind, decode)
        for kind in ("imagenet", "trivialaugment", "randaugment")
        for decode in ("reduced", "full")
    ]
    assert all(r["cores"] == 1 and r["images_per_sec"] > 0 and r["batch_size"] == 64 for r in rows)
    assert "16 JPEG files" in result.stderr and "(1 CPU core)" in result.stdout
    bad = run_script("-m", "resnet_jax.loader_benchmark", "--decode", "lazy")
    assert bad.returncode == 2 and "--decode='lazy' is not valid; choose from: reduced, full" in bad.stderr


def test_the_loader_benchmark_times_prepared_files_beside_the_originals_and_says_who_it_feeds(tmp_path):
    """Prepared shards side by side with the originals, a clean stderr (the loaders are closed before
    their files go), and the feed table: this host's step measured, a target's bound from a preflight."""
    preflight_json = tmp_path / "preflight.json"
    roofline = {"target": "v5p-8", "roofline_images_per_sec": 45315.0, "roofline_bound": "HBM"}
    preflight_json.write_text(json.dumps({"targets": [roofline]}))
    out = tmp_path / "loader.json"
    result = run_script(
        *("-m", "resnet_jax.loader_benchmark", "--kinds", "imagenet", "--sources", "originals,prepared"),
        *("--workers", "0", "--cores", "1", "--batches", "2", "--images", "24", "--json", str(out)),
        *(
            "--feed",
            "here,v5p-8",
            "--feed_config",
            "configs/digits.py",
            "--preflight_json",
            str(preflight_json),
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert [r["source"] for r in document["rows"]] == ["originals", "prepared S=256 Q=90"]
    assert document["prepare"]["images"] > 0 and document["prepare"]["images_per_sec_per_process"] > 0
    noise = [
        line
        for line in result.stderr.splitlines()
        if "skipping" in line or "Traceback" in line or "Warning" in line or "error" in line.lower()
    ]
    assert not noise, noise
    feed = {(r["pipeline"], r["target"]): r for r in document["feed"]}
    assert len(feed) == 4
    for (_, target), row in feed.items():
        assert row["cores_needed"] == -(-row["images_per_sec"] // row["images_per_sec_per_core"])
        assert row["host_cores"] >= 1
        if target == "v5p-8":
            assert row["images_per_sec"] == 45315.0 and "roofline bound (HBM)" in row["from"]
        else:
            assert row["images_per_sec"] > 0 and row["from"].startswith("the step measured here (cpu)")
    assert "| keeps up (" in result.stdout and "an upper limit, not measured" in result.stdout

    if module_available("libtpu"):  # the preflight extra: the bound compiled for the target here
        result = run_script(
            *("-m", "resnet_jax.loader_benchmark", "--kinds", "cifar", "--workers", "0", "--batches", "2"),
            *("--feed", "v5e-8", "--feed_config", "configs/digits.py"),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| v5e-8 |" in result.stdout and "roofline bound (HBM) from the preflight" in result.stdout
        assert "os.fork" not in result.stderr

    bad = run_script("-m", "resnet_jax.loader_benchmark", "--feed", "v9-8")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown target 'v9-8'" in bad.stderr
    bad = run_script("-m", "resnet_jax.loader_benchmark", "--quality", "0", "--sources", "prepared")
    assert bad.returncode == 2 and "--quality=0 must be a JPEG quality in 1..100" in bad.stderr


# ---------------------------------------------------------------- lazy decoding


def coordinates_jpeg(height=480, width=640):
    """A JPEG whose red channel is x and green is y (plus blocky texture): a crop's colour is its place."""
    ys, xs = np.mgrid[0:height, 0:width]
    texture = np.random.default_rng(0).integers(0, 40, (height // 8, width // 8, 3)).repeat(8, 0).repeat(8, 1)
    pixels = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.full(xs.shape, 128.0)], -1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 0.8 + texture).clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return augment.EncodedImage(buffer.getvalue(), "coordinates.jpg")


def test_reduced_decoding_keeps_the_crops_regions_and_pixels(monkeypatch):
    """The DCT-scaled decode of a crop against the full decode of the same crop: same region (the
    mean x/y colour agrees within 0.5 of 255) and the same pixels within 2 levels on average."""
    image = coordinates_jpeg()
    reduced = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        reduced.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    lazy = augment.TrainTransform("imagenet", 64, 3, draft=True)
    full = augment.TrainTransform("imagenet", 64, 3, draft=False)
    for seed in range(60):
        a = lazy({"image": image}, np.random.default_rng(seed))["image"].astype(float)
        b = full({"image": image}, np.random.default_rng(seed))["image"].astype(float)
        assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() < 0.5, seed
        assert np.abs(a - b).mean() < 2.0, seed
    assert len(reduced) > 30 and {(640 // 4, 480 // 4), (640 // 2, 480 // 2)} <= set(reduced)


def test_a_folder_and_a_tfds_dataset_decode_lazily_and_agree(tmp_path):
    """A real ArrayRecord TFDS dataset (built here without TensorFlow) hands over JPEG bytes, like a
    folder of the same files; both give the same batches."""
    files = {
        f"{i}.jpg": np.random.default_rng(i).integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        for i in range(6)
    }
    for name, pixels in files.items():
        save(tmp_path / "folder" / f"class{int(name[0]) % 2}" / name, pixels, quality=95)

    class TinyJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=2),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            for name in files:
                path = tmp_path / "folder" / f"class{int(name[0]) % 2}" / name
                yield name, {"image": io.BytesIO(path.read_bytes()), "label": int(name[0]) % 2}

    TinyJpegs(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    config = dict(image_size=24, augment="imagenet")
    tfds_ds = data.load(digits_config(dataset="tfds:tiny_jpegs", data_dir=str(tmp_path / "tfds"), **config))
    folder_ds = data.load(
        digits_config(dataset=f"folder:{tmp_path / 'folder'}", folder_eval_fraction=0.5, **config)
    )
    assert isinstance(tfds_ds.train_source[0]["image"], augment.EncodedImage)
    assert tfds_ds.train_source[0]["image"].name == "tiny_jpegs:train[0]"
    assert isinstance(folder_ds.train_source[0]["image"], augment.EncodedImage)
    by_bytes = {}
    for source in (tfds_ds.train_source, folder_ds.train_source, folder_ds.eval_source):
        for i in range(len(source)):
            image = source[i]["image"]
            out = tfds_ds.train_transform({"image": image}, np.random.default_rng(1))["image"]
            assert out.shape == (24, 24, 3)
            by_bytes.setdefault(image.data, []).append(out)
    assert len(by_bytes) == 6
    for outputs in by_bytes.values():  # the same file through either source: the same crop
        assert all(np.array_equal(outputs[0], other) for other in outputs[1:])
    assert first_batch(tfds_ds, 4)["image"].shape == (4, 24, 24, 3)
    assert all_eval_batches(tfds_ds, 4)[0]["image"].shape == (4, 24, 24, 3)


def test_a_folder_image_header_is_parsed_once_on_its_way_to_its_crop(tmp_path, monkeypatch):
    for i in range(4):
        save(tmp_path / f"class{i % 2}" / f"{i}.jpg", np.full((30, 40, 3), 60 * i, np.uint8), quality=90)
    config = digits_config(dataset=f"folder:{tmp_path}", folder_eval_fraction=0.5, image_size=16)
    dataset = data.load(config)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    example = dataset.train_source[0]
    crop = dataset.train_transform(example, np.random.default_rng(0))["image"]
    assert len(opened) == 1 and crop.shape == (16, 16, 3)
    # The parsed header never travels to another process: a copy parses the bytes again, alike.
    copied = pickle.loads(pickle.dumps(dataset.train_source[0]))
    assert copied["image"].header is None
    np.testing.assert_array_equal(dataset.train_transform(copied, np.random.default_rng(0))["image"], crop)
