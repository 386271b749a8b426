"""Images/s of the input pipeline alone (no model), per number of grain worker processes.

    python -m resnet_jax.loader_benchmark [--kinds imagenet,trivialaugment] [--decode reduced,full]
        [--workers 0,1] [--cores 1] [--batches 50] [--images 512] [--json F]
        [--sources originals,prepared] [--shorter_side 256] [--quality 90]
        [--feed v5p-8,h100x8] [--feed_config configs/imagenet_resnet50.py] [--preflight_json F]
        [--loader grain,dali]

`cifar`: in-memory 32x32 images with CIFAR augmentation (pad-crop-flip), batch 128.
`imagenet`: a folder of JPEG files with ImageNet's sizes (`write_jpeg_folder`), decoded,
Inception-cropped to 224 px and flipped, batch 64: the ImageNet training path.
`trivialaugment`: the same plus TrivialAugment and random erasing (probability 0.25).
`randaugment`: the same plus RandAugment rand-m9-mstd0.5 (timm's ImageNet default).
`--decode full` decodes every JPEG whole before cropping, `reduced` (what training does) decodes
at the DCT scale the crop needs. `--cores 1` pins the benchmark and its workers to one core:
images/s per core. `--sources prepared` also times the same files after `python -m
resnet_jax.prepare` (shorter side `--shorter_side`, JPEG quality `--quality`), side by side.

`--loader grain,dali` also times NVIDIA DALI's decoding of the same batches (`config.loader="dali"`):
its CPU operators on a host without a GPU, nvJPEG (`device="mixed"`) with the batch left on the GPUs
where JAX has them; grain still reads the files and draws the crops. DALI does no policies, so its
rows are for `imagenet` alone.

`--feed TARGET,...` answers "will this host keep up?": for each pipeline, its images/s per core,
the train step's images/s on each target (the preflight's target names, or `here`: measured on this
host's devices; a named target whose accelerator this host has is measured here too, else its
preflight roofline bound, an upper limit, is compiled for it on the CPU or read from
`--preflight_json`), and the cores it takes to feed that step against this host's cores.
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

from resnet_jax import augment, cli, dali, data, feed, prepare, shards, sources, targets
from resnet_jax.errors import UserError

KINDS = {
    # kind: (batch size, image size, number of source images, style, auto_augment, random_erase_prob)
    "cifar": (128, 32, 10_000, "cifar", "none", 0.0),
    "imagenet": (64, 224, 512, "imagenet", "none", 0.0),
    "trivialaugment": (64, 224, 512, "imagenet", "trivialaugment", 0.25),
    "randaugment": (64, 224, 512, "imagenet", "rand-m9-mstd0.5", 0.0),
}
DECODES = ("reduced", "full")
SOURCES = ("originals", "prepared")
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
    return data.assemble(found, 32, augment.Preprocessing(style="cifar"))


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
    decode = decoding(dataset)
    try:
        decode(next(loader))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            decode(next(loader))
        seconds = time.perf_counter() - t0
    finally:
        data.close_loader(loader)  # before the caller deletes the files it reads ahead
    return {
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "first_batch_seconds": first,
        "images_per_sec": batches * batch_size / seconds,
    }


def decoding(dataset: data.Dataset) -> Any:
    """What finishes a loader's batch: nothing for grain; for DALI, its decoding, on the GPUs (the
    batch made global and awaited) where JAX has them, else on this host's CPU."""
    if dataset.decoder is None:
        return lambda batch: batch
    import jax

    from resnet_jax import parallel

    if jax.devices()[0].platform != "gpu":
        return lambda batch: dataset.host_images(batch, train=True)
    sharding = parallel.data_sharding(parallel.create_mesh())
    return lambda batch: jax.block_until_ready(dataset.to_global(batch, sharding)["image"])


def jpeg_dataset(root: str, kind: str, decode: str, loader: str = "grain") -> data.Dataset:
    """The kind's pipeline over a folder of JPEGs, or over a prepared folder (prepared.json)."""
    _, size, _, style, policy, erase = KINDS[kind]
    if os.path.exists(os.path.join(root, shards.METADATA)):
        found = shards.find_prepared(f"prepared:{root}", root)
    else:
        found = sources.find_folder(f"folder:{root}", root, 0.1)
    preprocessing = augment.Preprocessing(
        style=style, auto_augment=policy, random_erase_prob=erase, loader=loader
    )
    return data.assemble(found, size, preprocessing, draft=decode == "reduced")


def pin_to_cores(count: int) -> list[int]:
    """Restrict this process (and the worker processes it starts) to `count` cores."""
    cores = sorted(os.sched_getaffinity(0))[:count]
    os.sched_setaffinity(0, cores)
    return cores


def prepare_folder(originals: str, out: str, shorter_side: int, quality: int, cores: int) -> dict[str, Any]:
    """Run `prepare` on the generated files (train split only), timed: its images/s per process."""
    settings = prepare.Settings(
        f"folder:{originals}", shorter_side, quality, splits=("train",), folder_eval_fraction=0.1
    )
    start = time.perf_counter()
    document = prepare.prepare(settings, out, cores, lambda message: None)
    seconds = time.perf_counter() - start
    images = document["splits"]["train"]["examples"]
    return {
        "images": images,
        "processes": cores,
        "seconds": seconds,
        "images_per_sec": images / seconds,
        "images_per_sec_per_process": images / seconds / cores,
        "mb_per_image": document["splits"]["train"]["bytes_out"] / images / 1e6,
        "megapixels_per_image": document["splits"]["train"]["pixels_out"] / images / 1e6,
    }


def run(
    kinds: Sequence[str],
    decodes: Sequence[str],
    workers: Sequence[int],
    batches: int,
    images: int,
    source_kinds: Sequence[str] = ("originals",),
    shorter_side: int = 256,
    quality: int = 90,
    cores: int = 1,
    loaders: Sequence[str] = ("grain",),
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The rows, and the `prepare` run's figures when prepared files were timed."""
    rows, prepared = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"originals": os.path.join(tmp, "originals"), "prepared": os.path.join(tmp, "prepared")}
        if any(kind != "cifar" for kind in kinds):
            print(f"writing {images} JPEG files to {tmp}", file=sys.stderr, flush=True)
            write_jpeg_folder(folders["originals"], images)
            print(folder_stats(folders["originals"]), file=sys.stderr, flush=True)
            if "prepared" in source_kinds:
                prepared = prepare_folder(
                    folders["originals"], folders["prepared"], shorter_side, quality, cores
                )
                print(
                    f"prepared them at a shorter side of at most {shorter_side} px, quality {quality}: "
                    f"{prepared['images_per_sec_per_process']:,.0f} images/s per process, "
                    f"{prepared['mb_per_image'] * 1e3:.0f} KB per image",
                    file=sys.stderr,
                    flush=True,
                )
        for kind in kinds:
            batch_size, size = KINDS[kind][:2]
            for source in ("-",) if kind == "cifar" else source_kinds:
                label = source if source != "prepared" else f"prepared S={shorter_side} Q={quality}"
                for loader, decode in pipelines(kind, decodes, loaders):
                    dataset = (
                        cifar_like(KINDS[kind][2])
                        if kind == "cifar"
                        else jpeg_dataset(folders[source], kind, decode, loader)
                    )
                    for n in workers:
                        print(
                            f"{kind} ({label}, {loader}, {decode} decode): {n} worker(s)",
                            file=sys.stderr,
                            flush=True,
                        )
                        row = {"kind": kind, "source": label, "loader": loader, "decode": decode}
                        row["image_size"] = size
                        rows.append({**row, **measure(dataset, batch_size, n, batches)})
    return rows, prepared


def pipelines(kind: str, decodes: Sequence[str], loaders: Sequence[str]) -> list[tuple[str, str]]:
    """(loader, decode) pairs to time: DALI decodes the plain ImageNet path (at its own scale)."""
    if kind == "cifar":
        return [("grain", "-")]
    rows = [("grain", decode) for decode in decodes if "grain" in loaders]
    return rows + ([("dali", "roi")] if "dali" in loaders and kind == "imagenet" else [])


def format_table(rows: Sequence[dict[str, Any]], cores: int) -> str:
    lines = [
        "| pipeline | files | loader | decode | workers | batch | images/s | first batch (s) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} {r['image_size']}px | {r['source']} | {r['loader']} | {r['decode']} | "
            f"{r['workers']} | "
            f"{r['batch_size']} | "
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
    flags.DEFINE_list(
        "loader",
        ["grain"],
        f"Who decodes: {', '.join(dali.LOADERS)} (imagenet only).",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "sources",
        ["originals"],
        f"Files to time: {', '.join(SOURCES)} (prepare's output).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "shorter_side", 256, "--sources prepared: prepare's --shorter_side.", flag_values=flag_values
    )
    flags.DEFINE_integer("quality", 90, "--sources prepared: prepare's --quality.", flag_values=flag_values)
    flags.DEFINE_list(
        "feed",
        [],
        f"Targets to feed: {feed.HERE} or the preflight's names ({', '.join(targets.TARGETS)}).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "feed_config",
        None,
        "--feed: the config whose train step is fed (default configs/imagenet_resnet50.py).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "preflight_json",
        None,
        "--feed: roofline figures from `preflight --json` instead of compiling.",
        flag_values=flag_values,
    )
    cli.parse(flag_values, argv, prog="python -m resnet_jax.loader_benchmark", doc=__doc__)
    choices = (("kinds", flag_values.kinds, KINDS), ("decode", flag_values.decode, DECODES))
    choices += (("loader", flag_values.loader, dali.LOADERS),)
    for name, given, valid in (*choices, ("sources", flag_values.sources, SOURCES)):
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
    if "dali" in flag_values.loader and not dali.installed():
        cli.fail(f"--loader=dali needs NVIDIA DALI, which is not installed: {dali.INSTALL_HINT}")
    try:
        prepare.Settings("-", flag_values.shorter_side, flag_values.quality).check()
        feed.check_feed_targets(flag_values.feed)
        config = flag_values.feed and cli.load_config(flag_values.feed_config or feed.FEED_CONFIG)
        if flag_values.preflight_json and not os.path.isfile(flag_values.preflight_json):
            raise UserError(f"--preflight_json={flag_values.preflight_json!r} is not a file")
    except UserError as e:
        cli.fail(str(e))
    host_cores = sorted(os.sched_getaffinity(0))
    cores = len(pin_to_cores(flag_values.cores)) if flag_values.cores else available
    rows, prepared = run(
        flag_values.kinds,
        flag_values.decode,
        workers,
        flag_values.batches,
        flag_values.images,
        flag_values.sources,
        flag_values.shorter_side,
        flag_values.quality,
        cores,
        flag_values.loader,
    )
    print(format_table(rows, cores))
    document: dict[str, Any] = {"rows": [{**row, "cores": cores} for row in rows], "prepare": prepared}
    if flag_values.feed:
        os.sched_setaffinity(0, host_cores)  # the step is measured or compiled on every core
        try:
            rates = feed.step_rates(flag_values.feed, config, flag_values.preflight_json)
        except UserError as e:  # a missing preflight extra, a config the step cannot run
            cli.fail(str(e))
        table, document["feed"] = feed.feed_table(feed.per_core_rates(rows, cores), rates, len(host_cores))
        print(f"\n{table}")
    if flag_values.json:
        with open(flag_values.json, "w") as f:
            json.dump(document, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
