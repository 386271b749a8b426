"""Dataset specs -> random-access sources -> grain pipelines of host-local uint8 batches.

Images stay uint8 on the host (cheap to augment, 4x less to copy); the train step
normalises them on the device with the statistics in `DatasetInfo`. Every
process reads a disjoint slice of each global batch, and evaluation pads the
last batch with masked examples so that every example counts exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

SPEC_FORMS = ("digits", "synthetic", "tfds:NAME", "folder:PATH")
Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the train step need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (height, width, channels) of the batches
    mean: tuple[float, ...]  # per channel, in uint8 units
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    num_train: int
    num_eval: int
    eval_crop: float = 1.0  # eval: resize the shorter side to size / eval_crop, then center-crop


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset ready for loading: two random-access sources and their transforms."""

    info: DatasetInfo
    train_source: Sequence[Example]
    eval_source: Sequence[Example]
    train_transform: Callable[[Example, np.random.Generator], Example]
    eval_transform: Callable[[Example], Example]


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a dataset spec into (kind, argument); raise on anything else."""
    kind, _, arg = str(spec).partition(":")
    if spec in ("digits", "synthetic") or (kind in ("tfds", "folder") and arg):
        return kind, arg
    raise ValueError(f"dataset={spec!r} is not a dataset spec; use one of: {', '.join(SPEC_FORMS)}")


# ---------------------------------------------------------------- sources


class ArraySource:
    """A random-access source over in-memory arrays (grain's RandomAccessDataSource protocol)."""

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


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 NHWC stack exactly as `predict` will resize an image file."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([resize_shorter_and_center_crop(image, size) for image in images])


def decode_image(source: str | bytes, channels: int = 3) -> np.ndarray:
    """A file path or encoded bytes -> uint8 HWC with `channels` (grayscale, palette, RGBA converted)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def resize_shorter_and_center_crop(image: np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """The standard eval preprocessing: shorter side to size / crop, then the central size x size."""
    from PIL import Image

    h, w = image.shape[:2]
    short = round(size / crop)
    new_h, new_w = (
        (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    )
    if (new_h, new_w) != (h, w):
        squeezed = image[..., 0] if image.shape[-1] == 1 else image
        resized = Image.fromarray(squeezed).resize((new_w, new_h), Image.BILINEAR)
        image = np.asarray(resized, dtype=np.uint8).reshape(new_h, new_w, image.shape[-1])
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size]


def random_shift(example: Example, rng: np.random.Generator, pad: int) -> Example:
    """Translate by up to `pad` pixels (zero fill): the light augmentation for digit-like images."""
    image = example["image"]
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    return {**example, "image": padded[dy : dy + h, dx : dx + w]}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return tuple(flat.mean(0).tolist()), tuple(np.maximum(flat.std(0), 1e-3).tolist())


def load_digits(image_size: int, augment: str = "auto") -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images); fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = resize_images(images, image_size)
    train_x, eval_x, train_y, eval_y = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    mean, std = channel_stats(train_x)
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        image_shape=(image_size, image_size, 1),
        mean=mean,
        std=std,
        class_names=tuple(str(d) for d in range(10)),
        num_train=len(train_y),
        num_eval=len(eval_y),
    )
    pad = max(1, image_size // 8)
    shift = (lambda ex, rng: random_shift(ex, rng, pad)) if augment != "none" else _keep
    return Dataset(info, ArraySource(train_x, train_y), ArraySource(eval_x, eval_y), shift, _identity)


# ImageNet-sized epochs so that epoch-based schedules look like the real run.
SYNTHETIC_SIZES = {"classes": 1000, "train": 1_281_167, "eval": 10_000}


def load_synthetic(image_size: int) -> Dataset:
    shape = (image_size, image_size, 3)
    classes = SYNTHETIC_SIZES["classes"]
    info = DatasetInfo(
        name="synthetic",
        num_classes=classes,
        image_shape=shape,
        mean=(127.5,) * 3,
        std=(73.9,) * 3,  # uniform on 0..255
        class_names=tuple(f"class_{i}" for i in range(classes)),
        num_train=SYNTHETIC_SIZES["train"],
        num_eval=SYNTHETIC_SIZES["eval"],
    )
    train = SyntheticSource(info.num_train, shape, classes, salt=0)
    eval_ = SyntheticSource(info.num_eval, shape, classes, salt=1)
    return Dataset(info, train, eval_, _keep, _identity)


def _keep(example: Example, rng: np.random.Generator) -> Example:
    return example


def _identity(example: Example) -> Example:
    return example


def load(config: Any) -> Dataset:
    """Build the dataset named by `config.dataset` at `config.image_size`."""
    kind, _ = parse_spec(config.dataset)
    if kind == "digits":
        return load_digits(config.image_size, config.get("augment", "auto"))
    if kind == "synthetic":
        return load_synthetic(config.image_size)
    raise NotImplementedError(
        f"dataset={config.dataset!r}: {kind}: specs are not implemented yet; use digits or synthetic"
    )


# ---------------------------------------------------------------- loaders


def stack_examples(examples: Sequence[Example]) -> Example:
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def train_loader(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless host-local train batches: a fresh seeded shuffle every epoch, augmented.

    Process p takes examples p, p + P, p + 2P, ... of the global order, so the
    global batch is the same whatever the number of processes.
    """
    local_batch = global_batch_size // process_count
    ds = (
        grain.MapDataset.source(dataset.train_source)
        .seed(seed)
        .shuffle()
        .repeat(None)[process_index::process_count]
        .random_map(dataset.train_transform)
        .batch(local_batch, drop_remainder=True, batch_fn=stack_examples)
    )
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Example]:
    """Host-local eval batches with a `mask`; padding examples (mask 0) complete the last one."""
    source, n = dataset.eval_source, len(dataset.eval_source)
    num_batches = -(-n // global_batch_size)
    blank = dataset.eval_transform(source[0])

    def example(index: int) -> Example:
        if index < n:
            return {**dataset.eval_transform(source[index]), "mask": np.float32(1)}
        return {key: np.zeros_like(value) for key, value in blank.items()} | {"mask": np.float32(0)}

    ds = (
        grain.MapDataset.range(num_batches * global_batch_size)[process_index::process_count]
        .map(example)
        .batch(global_batch_size // process_count, batch_fn=stack_examples)
    )
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
