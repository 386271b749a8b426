"""Dataset specs -> random-access sources -> grain pipelines of host-local uint8 batches.

Images stay uint8 on the host (cheap to augment, 4x less to copy); the train step
normalises them on the device with the statistics in `DatasetInfo`. Every
process reads a disjoint slice of each global batch, and evaluation pads the
last batch with masked examples so that every example counts exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from resnet_jax import augment, dali, parallel, progress, shards, sources
from resnet_jax.augment import Example

SPEC_FORMS = ("digits", "synthetic", "tfds:NAME", "folder:PATH", "prepared:DIR")
STATS_SAMPLES = 256  # examples that estimate mean/std when the dataset's are not known


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the train step need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (height, width, channels) of the train batches
    mean: tuple[float, ...]  # per channel, in uint8 units
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    num_train: int
    num_eval: int
    eval_crop: float = 1.0  # eval: resize the shorter side to size / eval_crop, then center-crop
    augment: str = "none"  # the train augmentation in use (augment.AUGMENTATIONS)
    eval_image_shape: tuple[int, int, int] | None = None  # eval batches (None: image_shape)

    def __post_init__(self):
        if self.eval_image_shape is None:
            object.__setattr__(self, "eval_image_shape", self.image_shape)
        object.__setattr__(self, "eval_image_shape", tuple(self.eval_image_shape))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset ready for loading: two random-access sources and their transforms."""

    info: DatasetInfo
    train_source: Sequence[Example]
    eval_source: Sequence[Example]
    train_transform: Callable[[Example, np.random.Generator], Example]
    eval_transform: Callable[[Example], Example]
    decoder: dali.Decoder | None = None  # loader="dali": the transforms prepare, DALI decodes

    def to_global(
        self, batch: Example, sharding: Any, global_batch_size: int | None = None, train: bool = True
    ) -> dict[str, Any]:
        """A host-local batch of the loaders as the global, sharded batch the steps take."""
        if self.decoder is not None:
            return self.decoder.to_global(batch, sharding, train, global_batch_size)
        return parallel.to_global(batch, sharding, global_batch_size)

    def host_images(self, batch: Example, train: bool = False) -> np.ndarray:
        """The uint8 images of a host-local batch (DALI's decoded, for the loaders that prepare)."""
        if self.decoder is None:
            return batch["image"]
        return self.decoder.host_images(batch, train)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a dataset spec into (kind, argument); raise on anything else."""
    kind, _, arg = str(spec).partition(":")
    if spec in ("digits", "synthetic") or (kind in ("tfds", "folder", "prepared") and arg):
        return kind, arg
    raise ValueError(f"dataset={spec!r} is not a dataset spec; use one of: {', '.join(SPEC_FORMS)}")


# ---------------------------------------------------------------- datasets


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return tuple(flat.mean(0).tolist()), tuple(np.maximum(flat.std(0), 1e-3).tolist())


def estimate_stats(
    source: Sequence[Example], transform: Callable[[Example], Example], samples: int = STATS_SAMPLES
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from evenly spaced examples: deterministic, so a resumed run normalises identically."""
    indices = np.linspace(0, len(source) - 1, min(samples, len(source))).round().astype(int)
    return channel_stats(np.stack([transform(source[int(i)])["image"] for i in indices]))


def load_digits(image_size: int, preprocessing: augment.Preprocessing | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images); fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = np.stack([augment.resize_shorter_and_center_crop(image, image_size) for image in images])
    train_x, eval_x, train_y, eval_y = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    found = sources.Found(
        name="digits",
        train=sources.ArraySource(train_x, train_y),
        eval=sources.ArraySource(eval_x, eval_y),
        class_names=tuple(str(d) for d in range(10)),
        channels=1,
        source_size=image_size,
        stats=channel_stats(train_x),  # exact: the whole train split is in memory
    )
    return assemble(found, image_size, preprocessing)


# ImageNet-sized epochs so that epoch-based schedules look like the real run.
SYNTHETIC_SIZES = {"classes": 1000, "train": 1_281_167, "eval": 10_000}
SYNTHETIC_STATS = ((127.5,) * 3, (73.9,) * 3)  # uniform on 0..255


def load_synthetic(image_size: int) -> Dataset:
    shape = (image_size, image_size, 3)
    classes = SYNTHETIC_SIZES["classes"]
    found = sources.Found(
        name="synthetic",
        train=sources.SyntheticSource(SYNTHETIC_SIZES["train"], shape, classes, salt=0),
        eval=sources.SyntheticSource(SYNTHETIC_SIZES["eval"], shape, classes, salt=1),
        class_names=tuple(f"class_{i}" for i in range(classes)),
        channels=3,
        source_size=image_size,
        stats=SYNTHETIC_STATS,
    )
    return assemble(found, image_size, augment.Preprocessing(style="none"))


def assemble(
    found: sources.Found,
    image_size: int,
    preprocessing: augment.Preprocessing | None = None,
    draft: bool = True,
) -> Dataset:
    """Sources + the preprocessing for the data and size + statistics -> a `Dataset`.

    The style's crop and flip, then the policy and random erasing, for training; for eval the
    shorter side to `eval_image_size` / `eval_crop_pct` (0: 0.875 for ImageNet-style data, else 1)
    and the central square, e.g. testing above the train resolution (FixRes).
    """
    p = preprocessing or augment.Preprocessing()
    style = augment.choose(p.style, found.name, found.source_size, image_size)
    crop = p.eval_crop_pct or (augment.IMAGENET_EVAL_CROP if style == "imagenet" else 1.0)
    eval_size = eval_side(image_size, p.eval_image_size)
    eval_transform = augment.EvalTransform(eval_size, found.channels, crop)
    mean, std = found.stats or estimate_stats(found.train, eval_transform)
    info = DatasetInfo(
        name=found.name,
        num_classes=len(found.class_names),
        image_shape=(image_size, image_size, found.channels),
        mean=tuple(mean),
        std=tuple(std),
        class_names=found.class_names,
        num_train=len(found.train),
        num_eval=len(found.eval),
        eval_crop=crop,
        augment=style,
        eval_image_shape=(eval_size, eval_size, found.channels),
    )
    if p.loader == "dali":  # grain prepares (bytes, crops), DALI decodes
        dali.check_dataset(style, found.channels)
        train_transform, eval_transform = dali.TrainPrep(), dali.EvalPrep(eval_size, crop)
        decoder = dali.Decoder(image_size, eval_size)
    else:
        train_transform = p.train_transform(style, image_size, found.channels, (mean, std), draft)
        decoder = None
    return Dataset(info, found.train, found.eval, train_transform, eval_transform, decoder)


def eval_side(image_size: int, eval_image_size: int = 0) -> int:
    """The side of eval images: `config.eval_image_size`, or the train `image_size` when it is 0."""
    return eval_image_size or image_size


def load(config: Any) -> Dataset:
    """Build the dataset named by `config.dataset` (a checked config) at `config.image_size`.

    Raises `sources.DatasetError` (a ValueError) with a message that says what is wrong and how to fix it.
    """
    kind, arg = parse_spec(config.dataset)
    preprocessing = augment.Preprocessing.from_config(config)
    if kind == "digits":
        return load_digits(config.image_size, preprocessing)
    if kind == "synthetic":
        return load_synthetic(config.image_size)
    if kind == "prepared":
        found = shards.find_prepared(config.dataset, arg)
    else:
        found = sources.find(
            config.dataset,
            data_dir=config.data_dir,
            train_split=config.train_split,
            eval_split=config.eval_split,
            folder_eval_fraction=config.folder_eval_fraction,
        )
    return assemble(found, config.image_size, preprocessing)


def write_class_names(info: DatasetInfo, workdir: str) -> str:
    """WORKDIR/class_names.json: index -> name, so that predictions map back to the dataset's labels."""
    path = os.path.join(workdir, "class_names.json")
    with open(path + ".tmp", "w") as f:
        json.dump(list(info.class_names), f, indent=0)
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------- loaders


def stack_examples(examples: Sequence[Example]) -> Example:
    """One batch; encoded files (`dali.RAGGED`) differ in length and stay a list."""
    return {
        key: [ex[key] for ex in examples] if key in dali.RAGGED else np.stack([ex[key] for ex in examples])
        for key in examples[0]
    }


def resolve_workers(num_workers: int, dataset: Dataset) -> int:
    """config.num_workers: -1 = auto (none for in-memory data, else one per core up to 16; DALI's
    runs too, as files that are not JPEG or PNG are re-encoded on the host)."""
    if num_workers >= 0:
        return num_workers
    in_memory = isinstance(dataset.train_source, sources.ArraySource | sources.SyntheticSource)
    return 0 if in_memory else min(16, os.cpu_count() or 1)


def _workers_unavailable() -> str | None:
    """Why grain's spawned worker processes cannot start here, or None when they can."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return f"the main program ({main_file}) cannot be re-imported by spawned worker processes"
    return None


def _prepare_grain_workers() -> None:
    """grain's worker start reads absl flags, which a notebook or a plain script never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class RepeatedExamples:
    """Position j of epoch e -> example j // k of epoch e's shuffled order: each epoch keeps its
    length but holds N / k distinct images, k times each, side by side (timm's RepeatAugSampler).
    Neighbouring positions go to different processes, and every copy is augmented by its own
    position, so the k copies differ."""

    def __init__(self, shuffled: grain.MapDataset, epoch_length: int, repeats: int):
        self.shuffled, self.epoch_length, self.repeats = shuffled, epoch_length, repeats

    def __call__(self, position: int) -> Example:
        epoch, offset = divmod(position, self.epoch_length)
        return self.shuffled[epoch * self.epoch_length + offset // self.repeats]


def train_loader(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    repeats: int = 1,
) -> grain.DatasetIterator:
    """Endless host-local train batches: a fresh seeded shuffle every epoch, augmented.

    Process p takes examples p, p + P, p + 2P, ... of the global order, augmented by their global
    index, so the set of examples in a global batch and their augmentation do not depend on the
    number of processes. With `num_workers > 0`, grain worker processes read,
    decode and augment; the batches (and the checkpointable iterator state) are the same as without.
    `repeats` k > 1 is repeated augmentation (`RepeatedExamples`).
    """
    local_batch = parallel.local_batch_size(global_batch_size, process_count)
    ds = grain.MapDataset.source(dataset.train_source).seed(seed).shuffle().repeat(None)
    if repeats > 1:
        repeated = RepeatedExamples(ds, len(dataset.train_source), repeats)
        ds = grain.MapDataset.range(len(ds)).seed(seed).map(repeated)
    ds = ds.random_map(dataset.train_transform)[process_index::process_count].batch(
        local_batch, drop_remainder=True, batch_fn=stack_examples
    )
    if num_workers > 0:
        reason = _workers_unavailable()
        if reason is None:
            _prepare_grain_workers()
            iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
            return iter(iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers)))
        progress.warn(f"num_workers={num_workers} ignored, loading in threads: {reason}")
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def close_loader(loader: Iterator[Example]) -> None:
    """Stop a loader and wait until nothing reads its files any more.

    grain's `close()` stops its worker processes but leaves its read-ahead threads finishing the
    batches they started; waiting for them lets a caller delete the files right after.
    """
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    executor = getattr(loader, "_executor", None)  # grain's PrefetchDatasetIterator (threads)
    if executor is not None:
        executor.shutdown(wait=True)


def eval_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
) -> Iterator[Example]:
    """Host-local eval batches with a `mask`: padding (and unreadable files) have mask 0.

    Every example of the split counts exactly once, whatever the batch size and process count.
    """
    source, n = dataset.eval_source, len(dataset.eval_source)
    num_batches = -(-n // global_batch_size)
    padding = {"image": np.zeros((1, 1, dataset.info.eval_image_shape[-1]), np.uint8), "label": 0, "valid": 0}

    def example(index: int) -> Example:
        ex = dataset.eval_transform(source[index] if index < n else padding)
        mask = np.float32(ex.pop("valid", 1))
        return {**ex, "label": np.int32(ex["label"]), "mask": mask}

    ds = (
        grain.MapDataset.range(num_batches * global_batch_size)[process_index::process_count]
        .map(example)
        .batch(parallel.local_batch_size(global_batch_size, process_count), batch_fn=stack_examples)
    )
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))
