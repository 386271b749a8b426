"""Images/s of the input pipeline alone (no model), per number of grain worker processes.

    python -m resnet_jax.loader_benchmark [--kinds cifar,jpeg] [--workers 0,1,2] [--batches 50] [--json F]

`cifar`: in-memory 32x32 images with CIFAR augmentation (pad-crop-flip), batch 128.
`jpeg`: a folder of 375x500 JPEG files (ImageNet's typical size), decoded and random-resized-cropped
to 224 px with flips, batch 64: the ImageNet training path. Compare the figures with the train
step's images/s (`benchmark.py`) to see whether loading can keep up.
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
    # kind: (batch size, image size, number of source images)
    "cifar": (128, 32, 10_000),
    "jpeg": (64, 224, 512),
}


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


def write_jpeg_folder(root: str, num_images: int, classes: int = 8) -> str:
    """Smooth random images (they compress like photos, unlike noise) as 375x500 JPEGs."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        directory = os.path.join(root, f"class{i % classes}")
        os.makedirs(directory, exist_ok=True)
        image.save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    return root


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


def run(kinds: Sequence[str], workers: Sequence[int], batches: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            batch_size, size, count = KINDS[kind]
            if kind == "cifar":
                dataset = cifar_like(count)
            else:
                print(f"writing {count} JPEG files to {tmp}", file=sys.stderr, flush=True)
                found = sources.find_folder(f"folder:{tmp}", write_jpeg_folder(tmp, count), 0.1)
                dataset = data.assemble(found, size, "imagenet")
            for n in workers:
                print(f"{kind}: {n} worker(s)", file=sys.stderr, flush=True)
                rows.append({"kind": kind, "image_size": size, **measure(dataset, batch_size, n, batches)})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| source | workers | batch | images/s | first batch (s) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['kind']} {r['image_size']}px | {r['workers']} | {r['batch_size']} | "
            f"{r['images_per_sec']:,.0f} | {r['first_batch_seconds']:.1f} |"
        )
    return "\n".join(lines) + f"\n({os.cpu_count()} CPU cores)"


def main(argv: Sequence[str] | None = None) -> int:
    flag_values = flags.FlagValues()
    flags.DEFINE_list(
        "kinds", ["cifar", "jpeg"], f"Pipelines to time: {', '.join(KINDS)}.", flag_values=flag_values
    )
    flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts.", flag_values=flag_values)
    flags.DEFINE_integer("batches", 50, "Timed batches per row.", flag_values=flag_values)
    flags.DEFINE_string("json", None, "Also write the rows to this file.", flag_values=flag_values)
    cli.parse(flag_values, argv, prog="python -m resnet_jax.loader_benchmark", doc=__doc__)
    unknown = [kind for kind in flag_values.kinds if kind not in KINDS]
    if unknown:
        cli.fail(f"--kinds={unknown[0]!r} is not valid; choose one of: {', '.join(KINDS)}")
    try:
        workers = [int(w) for w in flag_values.workers]
    except ValueError:
        cli.fail(f"--workers={','.join(flag_values.workers)!r} must be integers, e.g. 0,1,2")
    if flag_values.batches < 1 or any(w < 0 for w in workers):
        cli.fail("--batches must be positive and --workers 0 or more")
    rows = run(flag_values.kinds, workers, flag_values.batches)
    print(format_table(rows))
    if flag_values.json:
        with open(flag_values.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
