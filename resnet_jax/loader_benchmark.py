"""Images/s of the input pipeline alone (no model), per number of grain worker processes.

    python -m resnet_jax.loader_benchmark [--kinds imagenet,trivialaugment] [--decode reduced,full]
        [--workers 0,1] [--cores 1] [--batches 50] [--images 512] [--json F]

`cifar`: in-memory 32x32 images with CIFAR augmentation (pad-crop-flip), batch 128.
`imagenet`: a folder of JPEG files with ImageNet's sizes (`write_jpeg_folder`), decoded,
Inception-cropped to 224 px and flipped, batch 64: the ImageNet training path.
`trivialaugment`: the same plus TrivialAugment and random erasing (probability 0.25).
`randaugment`: the same plus RandAugment rand-m9-mstd0.5 (timm's ImageNet default).
`--decode full` decodes every JPEG whole before cropping, `reduced` (what training does) decodes
at the DCT scale the crop needs. `--cores 1` pins the benchmark and its workers to one core:
images/s per core. Compare with the train step's images/s (`benchmark.py`) to see whether
loading keeps up.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from resnet_jax import cli, data, sources

KINDS = {
    # kind: (batch size, image size, number of source images, style, auto_augment, random_erase_prob)
    "cifar": (128, 32, 10_000, "cifar", "none", 0.0),
    "imagenet": (64, 224, 512, "imagenet", "none", 0.0),
    "trivialaugment": (64, 224, 512, "imagenet", "trivialaugment", 0.25),
    "randaugment": (64, 224, 512, "imagenet", "rand-m9-mstd0.5", 0.0),
}
DECODES = ("reduced", "full")
# ImageNet's training images: most are 500 px on the long side (500x375, 500x333 and their
# portraits), the rest spread from about 200 to 1000 px; about 110 KB each.
COMMON_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500))


def cifar_like(num_images: int) -> data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    found = sources.Found(
        name="cifar_like",
        train=sources.ArraySource(images, rng.integers(0, 10, num_images)),
        eval=sources.ArraySource(images[:10], np.zeros(10, np.int64)),
        class_names=tuple(str(i) for i in range(10)),
        channels=3,
        source_size=32,
        stats=data.SYNTHETIC_STATS,
    )
    return data.assemble(found, 32, "cifar")


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): 70 % one of ImageNet's common sizes, else a long side of 200-1000 px."""
    if rng.random() < 0.7:
        return COMMON_SIZES[int(rng.integers(len(COMMON_SIZES)))]
    long_side = int(rng.integers(200, 1001))
    short_side = int(long_side * rng.uniform(0.6, 1.0))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def write_jpeg_folder(root: str, num_images: int, classes: int = 8) -> str:
    """Photo-like JPEGs (smooth colour fields plus grain, quality 90) with ImageNet's sizes."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        width, height = imagenet_like_size(rng)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        directory = os.path.join(root, f"class{i % classes}")
        os.makedirs(directory, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    return root


def folder_stats(root: str) -> str:
    sizes = [entry.stat().st_size for d in os.scandir(root) for entry in os.scandir(d.path)]
    return f"{len(sizes)} JPEG files, {np.mean(sizes) / 1024:.0f} KB on average"


def measure(dataset: data.Dataset, batch_size: int, workers: int, batches: int) -> dict[str, Any]:
    """Seconds to the first batch (worker start-up included), then images/s over `batches` batches."""
    t0 = time.perf_counter()
    loader = data.train_loader(dataset, global_batch_size=batch_size, seed=0, num_workers=workers)
    next(loader)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - t0
    loader.close()
    return {
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "first_batch_seconds": first,
        "images_per_sec": batches * batch_size / seconds,
    }


def jpeg_dataset(root: str, kind: str, decode: str) -> data.Dataset:
    _, size, _, style, policy, erase = KINDS[kind]
    found = sources.find_folder(f"folder:{root}", root, 0.1)
    return data.assemble(
        found, size, style, auto_augment=policy, random_erase_prob=erase, draft=decode == "reduced"
    )


def pin_to_cores(count: int) -> list[int]:
    """Restrict this process (and the worker processes it starts) to `count` cores."""
    cores = sorted(os.sched_getaffinity(0))[:count]
    os.sched_setaffinity(0, cores)
    return cores


def run(
    kinds: Sequence[str], decodes: Sequence[str], workers: Sequence[int], batches: int, images: int
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if any(kind != "cifar" for kind in kinds):
            print(f"writing {images} JPEG files to {tmp}", file=sys.stderr, flush=True)
            write_jpeg_folder(tmp, images)
            print(folder_stats(tmp), file=sys.stderr, flush=True)
        for kind in kinds:
            batch_size, size = KINDS[kind][:2]
            for decode in decodes if kind != "cifar" else ("-",):
                dataset = cifar_like(KINDS[kind][2]) if kind == "cifar" else jpeg_dataset(tmp, kind, decode)
                for n in workers:
                    print(f"{kind} ({decode} decode): {n} worker(s)", file=sys.stderr, flush=True)
                    row = {"kind": kind, "decode": decode, "image_size": size}
                    rows.append({**row, **measure(dataset, batch_size, n, batches)})
    return rows


def format_table(rows: Sequence[dict[str, Any]], cores: int) -> str:
    lines = [
        "| pipeline | decode | workers | batch | images/s | first batch (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} {r['image_size']}px | {r['decode']} | {r['workers']} | {r['batch_size']} | "
            f"{r['images_per_sec']:,.0f} | {r['first_batch_seconds']:.1f} |"
        )
    return "\n".join(lines) + f"\n({cores} CPU core{'s' if cores > 1 else ''})"


def main(argv: Sequence[str] | None = None) -> int:
    flag_values = flags.FlagValues()
    flags.DEFINE_list(
        "kinds", ["cifar", "imagenet"], f"Pipelines to time: {', '.join(KINDS)}.", flag_values=flag_values
    )
    flags.DEFINE_list("decode", ["reduced"], f"JPEG decoding: {', '.join(DECODES)}.", flag_values=flag_values)
    flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts.", flag_values=flag_values)
    flags.DEFINE_integer(
        "cores", 0, "Pin to this many cores (0: all this process may use).", flag_values=flag_values
    )
    flags.DEFINE_integer("batches", 50, "Timed batches per row.", flag_values=flag_values)
    flags.DEFINE_integer(
        "images", 512, "JPEG files to write for the folder pipelines.", flag_values=flag_values
    )
    flags.DEFINE_string("json", None, "Also write the rows to this file.", flag_values=flag_values)
    cli.parse(flag_values, argv, prog="python -m resnet_jax.loader_benchmark", doc=__doc__)
    for name, given, valid in (("kinds", flag_values.kinds, KINDS), ("decode", flag_values.decode, DECODES)):
        unknown = [value for value in given if value not in valid]
        if unknown:
            cli.fail(f"--{name}={unknown[0]!r} is not valid; choose from: {', '.join(valid)}")
    try:
        workers = [int(w) for w in flag_values.workers]
    except ValueError:
        cli.fail(f"--workers={','.join(flag_values.workers)!r} must be integers, e.g. 0,1,2")
    available = len(os.sched_getaffinity(0))
    counts_bad = flag_values.batches < 1 or flag_values.images < 10 or any(w < 0 for w in workers)
    if counts_bad or not 0 <= flag_values.cores <= available:
        cli.fail(
            "--batches must be positive, --images 10 or more, --workers 0 or more and "
            f"--cores in 0..{available}"
        )
    cores = len(pin_to_cores(flag_values.cores)) if flag_values.cores else available
    rows = run(flag_values.kinds, flag_values.decode, workers, flag_values.batches, flag_values.images)
    print(format_table(rows, cores))
    if flag_values.json:
        with open(flag_values.json, "w") as f:
            json.dump([{**row, "cores": cores} for row in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
