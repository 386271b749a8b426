"""Random-access sources behind the dataset specs: in-memory arrays, synthetic, TFDS and image folders.

Every source is a picklable sequence of `{"image": uint8 HWC, "label": int32}` examples (grain's
`RandomAccessDataSource` protocol), so that grain worker processes can read it. `find` (through
`find_tfds` and `find_folder`) turns a spec into a `Found` record; `data.load` adds augmentation
and statistics.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax import augment, progress
from resnet_jax.augment import Example
from resnet_jax.errors import ImageError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FOLDER_EVAL_DIRS = ("val", "validation", "test")
TFDS_EVAL_SPLITS = ("validation", "test")

# Per-channel mean/std in uint8 units of well-known datasets; others are estimated from samples.
IMAGENET_STATS = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
KNOWN_STATS = {
    "cifar10": ((125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
    "cifar100": ((129.30, 124.07, 112.43), (68.17, 65.39, 70.42)),
    "imagenet": IMAGENET_STATS,  # imagenet2012, imagenet_v2, imagenet_a, imagenette, ...
}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read; the message says what was looked for and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Found:
    """Two sources and what is known about them before any image is decoded."""

    name: str
    train: Sequence[Example]
    eval: Sequence[Example]
    class_names: tuple[str, ...]
    channels: int
    source_size: int | None  # the images' common side length, None when sizes vary
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None  # known mean/std, else None


def known_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    base = name.split("/")[0].split(":")[0]
    if base in KNOWN_STATS:
        return KNOWN_STATS[base]
    return IMAGENET_STATS if base.startswith("imagenet") else None


# ---------------------------------------------------------------- in memory


class ArraySource:
    """In-memory uint8 images and integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Example:
        return {"image": self.images[index], "label": np.int32(self.labels[index])}


class SyntheticSource:
    """Random images and labels, a pure function of the index (no memory, any length)."""

    def __init__(self, length: int, image_shape: tuple[int, int, int], num_classes: int, salt: int):
        self.length, self.image_shape, self.num_classes, self.salt = length, image_shape, num_classes, salt

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng((self.salt, index))
        image = rng.integers(0, 256, self.image_shape, dtype=np.uint8)
        return {"image": image, "label": np.int32(rng.integers(self.num_classes))}


# ---------------------------------------------------------------- TFDS


class TfdsSource:
    """A `tfds.data_source` split with its image and label features renamed to `image` and `label`.

    Opened with TFDS's image decoding skipped, it hands over the stored JPEG/PNG bytes as
    `EncodedImage`, which the transform decodes only as far as its crop needs.
    """

    def __init__(self, source: Sequence[dict[str, Any]], image_key: str, label_key: str, name: str = "tfds"):
        self.source, self.image_key, self.label_key, self.name = source, image_key, label_key, name

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, index: int) -> tuple[bytes | np.ndarray, int]:
        """The stored image (encoded bytes, or pixels where TFDS stores them) and its label."""
        record = self.source[index]
        return record[self.image_key], int(record[self.label_key])

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def __getitem__(self, index: int) -> Example:
        record = self.source[index]
        image = record[self.image_key]
        if isinstance(image, bytes):
            image = augment.EncodedImage(image, self.describe(index))
        else:
            image = np.asarray(image, dtype=np.uint8)
            image = image if image.ndim == 3 else image[..., None]
        return {"image": image, "label": np.int32(record[self.label_key])}


def _feature_keys(features: Any, spec: str) -> tuple[str, str]:
    """The (image, label) feature names: `image`/`label` when present, else the first of each type."""
    import tensorflow_datasets as tfds

    items = dict(features.items())
    images = [k for k, f in items.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in items.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise DatasetError(
            f"dataset={spec!r} has no image and class-label features to classify "
            f"(features: {', '.join(items) or 'none'})"
        )
    pick = lambda keys, preferred: preferred if preferred in keys else keys[0]
    return pick(images, "image"), pick(labels, "label")


def _not_prepared(spec: str, name: str, builder_dir: str, error: Exception) -> DatasetError:
    base = name.split("/")[0].split(":")[0]
    manual = (
        f" ImageNet cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
        f"in DATA_DIR/downloads/manual first (see https://www.tensorflow.org/datasets/catalog/{base})."
        if base.startswith("imagenet2012")
        else ""
    )
    return DatasetError(
        f"dataset={spec!r}: TFDS found no prepared array_record copy in {builder_dir} "
        f"({type(error).__name__}), and nothing is downloaded during training. "
        "Prepare it once on a machine with network access: "
        f"`tfds build {name.split(':')[0]} --file_format=array_record --data_dir=DATA_DIR`, then pass "
        f"--config.data_dir=DATA_DIR.{manual}"
    )


def find_tfds(spec: str, name: str, data_dir: str | None, train_split: str, eval_split: str) -> Found:
    """Open a TFDS dataset through `tfds.data_source` (ArrayRecord, no TensorFlow), never downloading."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise DatasetError(
            f"dataset={spec!r}: {first_line} (see tfds.list_builders() for the names)"
        ) from None
    image_key, label_key = _feature_keys(builder.info.features, spec)

    def open_split(split: str) -> Sequence[dict[str, Any]]:
        undecoded = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
        try:
            undecoded[0] if len(undecoded) else None
        except ImportError:  # tfds.testing.mock_data makes records by encoding with TensorFlow
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        return undecoded

    if eval_split == "auto":
        present = list(builder.info.splits.keys())  # empty when unprepared and under mock_data
        candidates = [s for s in TFDS_EVAL_SPLITS if s in present] or list(TFDS_EVAL_SPLITS)
    else:
        candidates = [eval_split]
    try:
        train = open_split(train_split)
    except (NotImplementedError, FileNotFoundError, AssertionError, OSError, KeyError) as e:
        # KeyError: TFDS 4.9.10 on a never-prepared dataset ("`splits` is empty").
        raise _not_prepared(spec, name, str(builder.data_dir), e) from None
    except ValueError as e:
        raise DatasetError(f"dataset={spec!r}: train split {train_split!r}: {e}") from None
    errors = []
    for split in candidates:
        try:
            evaluation = open_split(split)
            break
        except (ValueError, KeyError, NotImplementedError, OSError) as e:
            errors.append(f"{split!r}: {e}")
    else:
        raise DatasetError(
            f"dataset={spec!r} has no usable eval split ({'; '.join(errors)}); "
            "set config.eval_split to one of its splits"
        )
    image_feature = builder.info.features[image_key]
    height, width, channels = image_feature.shape
    label_feature = builder.info.features[label_key]
    return Found(
        name=name,
        train=TfdsSource(train, image_key, label_key, f"{name}:{train_split}"),
        eval=TfdsSource(evaluation, image_key, label_key, f"{name}:{split}"),
        class_names=tuple(label_feature.names),
        channels=channels or 3,
        source_size=height if height and height == width else None,
        stats=known_stats(name),
    )


# ---------------------------------------------------------------- image folders


class FolderSource:
    """Image files read on access, as `EncodedImage` bytes that the transform decodes (only as much
    as its crop needs); an unreadable file is skipped with a warning.

    Train sources (`substitute=True`) return the next readable file instead, with `skipped` counting
    the files passed over; eval sources return a blank example with `valid=0`, which is masked out.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], substitute: bool):
        self.paths, self.labels, self.substitute = list(paths), np.asarray(labels, np.int32), substitute
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int) -> tuple[bytes, int]:
        """The file's bytes as stored, and its label; raises OSError when it cannot be read."""
        with open(self.paths[index], "rb") as f:
            return f.read(), int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.paths[index]

    def _read(self, index: int) -> augment.EncodedImage | np.ndarray | None:
        try:
            return augment.encoded_or_decoded(self.raw(index)[0], self.paths[index])
        except (OSError, ImageError) as e:
            if index not in self._warned:
                self._warned.add(index)
                reason = e.reason if isinstance(e, ImageError) else e
                progress.warn(f"skipping unreadable image {self.paths[index]}: {reason}", every_process=True)
            return None

    def __getitem__(self, index: int) -> Example:
        for offset in range(len(self.paths) if self.substitute else 1):
            image = self._read((index + offset) % len(self.paths))
            if image is not None:
                label = self.labels[(index + offset) % len(self.paths)]
                extra = {"skipped": np.int32(offset)} if self.substitute else {"valid": np.float32(1)}
                return {"image": image, "label": label, **extra}
        if self.substitute:
            raise DatasetError(f"no readable image among the {len(self.paths)} files of this split")
        return {"image": np.zeros((1, 1, 3), np.uint8), "label": np.int32(0), "valid": np.float32(0)}


def image_files_under(directory: str) -> list[str]:
    """The image files in `directory` and its sub-directories (hidden ones skipped), in sorted order."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [
            os.path.join(root, n)
            for n in sorted(names)
            if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
        ]
    return files


def _class_images(directory: str) -> dict[str, list[str]]:
    """Class sub-directory name -> its image files (searched recursively, sorted)."""
    entries = sorted(d for d in os.listdir(directory) if not d.startswith("."))
    classes = [d for d in entries if os.path.isdir(os.path.join(directory, d))]
    return {name: image_files_under(os.path.join(directory, name)) for name in classes}


def _check_classes(spec: str, directory: str, classes: dict[str, list[str]]) -> None:
    if not classes:
        raise DatasetError(
            f"dataset={spec!r}: {directory} has no class sub-directories; expected "
            f"{directory}/<class>/<image> or {directory}/train/<class>/<image> and val/<class>/<image>"
        )
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DatasetError(
            f"dataset={spec!r}: class {empty[0]!r} ({os.path.join(directory, empty[0])}) has no images "
            f"({', '.join(IMAGE_EXTENSIONS)}){f'; also empty: {empty[1:]}' if empty[1:] else ''}"
        )


def split_per_class(
    classes: dict[str, list[str]], eval_fraction: float, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A fixed, seeded, stratified split: `eval_fraction` of every class (at least one when it has two)."""
    train, evaluation = [], []
    for label, files in enumerate(classes.values()):
        order = np.random.default_rng((seed, label)).permutation(len(files))
        n_eval = max(1, round(eval_fraction * len(files))) if len(files) > 1 else 0
        evaluation += [(files[i], label) for i in sorted(order[:n_eval])]
        train += [(files[i], label) for i in sorted(order[n_eval:])]
    return train, evaluation


FILE_SPECS = ("tfds", "folder")  # the spec kinds whose images are files or records, not arrays


def find(
    spec: str,
    *,
    data_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "auto",
    folder_eval_fraction: float = 0.1,
) -> Found:
    """A `tfds:NAME` or `folder:PATH` spec's sources, with the config values that apply to it."""
    kind, _, arg = spec.partition(":")
    if kind == "tfds":
        return find_tfds(spec, arg, data_dir, train_split, eval_split)
    if kind == "folder":
        return find_folder(spec, arg, folder_eval_fraction)
    raise DatasetError(f"dataset={spec!r} is not a {' or '.join(FILE_SPECS)} spec")


def find_folder(spec: str, path: str, eval_fraction: float) -> Found:
    """`PATH/train/<class>` + `PATH/val/<class>` when present, else `PATH/<class>` split per class."""
    if not os.path.isdir(path):
        raise DatasetError(f"dataset={spec!r}: {path} is not a directory")
    train_dir = os.path.join(path, "train")
    eval_dirs = [os.path.join(path, d) for d in FOLDER_EVAL_DIRS if os.path.isdir(os.path.join(path, d))]
    if os.path.isdir(train_dir):
        if not eval_dirs:
            raise DatasetError(
                f"dataset={spec!r}: {train_dir} exists but no eval folder next to it "
                f"({', '.join(FOLDER_EVAL_DIRS)}); add one, or put the class folders directly in {path}"
            )
        classes = _class_images(train_dir)
        _check_classes(spec, train_dir, classes)
        eval_classes = _class_images(eval_dirs[0])
        unknown = sorted(set(eval_classes) - set(classes))
        if unknown:
            raise DatasetError(
                f"dataset={spec!r}: eval classes {unknown} in {eval_dirs[0]} do not exist in {train_dir}"
            )
        index = {name: i for i, name in enumerate(classes)}
        train = [(f, index[c]) for c, files in classes.items() for f in files]
        evaluation = [(f, index[c]) for c, files in eval_classes.items() for f in files]
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise DatasetError(f"config.folder_eval_fraction={eval_fraction!r} must be in (0, 1)")
        classes = _class_images(path)
        _check_classes(spec, path, classes)
        train, evaluation = split_per_class(classes, eval_fraction)
    if not evaluation:
        raise DatasetError(f"dataset={spec!r}: the eval split is empty; add images to the eval folder")
    return Found(
        name=f"folder:{os.path.basename(os.path.normpath(path))}",
        train=FolderSource(*zip(*train, strict=True), substitute=True),
        eval=FolderSource(*zip(*evaluation, strict=True), substitute=False),
        class_names=tuple(classes),
        channels=3,
        source_size=None,
        stats=None,
    )
