"""Prepare a dataset once: every image resized to a shorter side of at most S and re-encoded as JPEG
at quality Q, in ArrayRecord shards that `--config.dataset=prepared:DIR` trains from.

    python -m resnet_jax.prepare --data SPEC --out DIR --shorter_side S --quality Q
        [--processes N] [--splits train,eval] [--shard_size 1024]
        [--data_dir D] [--train_split train] [--eval_split auto] [--folder_eval_fraction 0.1]

SPEC is `folder:PATH` or `tfds:NAME`, read exactly as training reads it. Decoding costs time in
proportion to the pixels, and every epoch decodes every image again: stored at S = 256, ImageNet's
images carry about half their pixels. Shards are written by N processes (default: every core) and
are the same bytes whatever N. A re-run with the same arguments keeps the finished shards (resume);
unreadable images are reported, counted and listed in prepared.json, never written. JPEGs that are
already small enough, baseline and in the right colour mode are stored as they are (no second loss).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax import augment, cli, data, progress, shards, sources
from resnet_jax.errors import ImageError, UserError

SHARD_SIZE = 1024  # examples per shard: about 30 MB of ImageNet at S = 256, Q = 90
# A shard's counts that prepared.json sums per split.
COUNTED = ("examples", "resized", "kept", "file_bytes", "bytes_in", "bytes_out", "pixels_in", "pixels_out")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the shards' bytes (not the process count)."""

    spec: str
    shorter_side: int
    quality: int
    splits: tuple[str, ...] = shards.SPLITS
    shard_size: int = SHARD_SIZE
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "auto"
    folder_eval_fraction: float = 0.1

    def check(self) -> None:
        if self.shorter_side <= 0:
            raise UserError(
                f"--shorter_side={self.shorter_side} must be a positive number of pixels, e.g. 256"
            )
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality={self.quality} must be a JPEG quality in 1..100, e.g. 90")
        if self.shard_size <= 0:
            raise UserError(f"--shard_size={self.shard_size} must be a positive number of examples")
        unknown = [split for split in self.splits if split not in shards.SPLITS]
        if unknown or not self.splits or "train" not in self.splits:
            raise UserError(
                f"--splits={','.join(self.splits)!r} must be train or train,eval "
                "(without eval, prepared:DIR evaluates on the source's own eval split)"
            )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "splits": list(self.splits)}


@dataclasses.dataclass(frozen=True)
class Job:
    split: str
    index: int
    count: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return shards.shard_name(self.split, self.index, self.count)


def open_source(settings: Settings) -> sources.Found:
    """The dataset as training reads it; in-memory and already prepared specs have nothing to prepare."""
    try:
        kind, _ = data.parse_spec(settings.spec)
    except ValueError as e:
        raise UserError(str(e).replace("dataset=", "--data=")) from None
    if kind not in sources.FILE_SPECS:
        raise UserError(
            f"--data={settings.spec!r} holds no image files to prepare; pass folder:PATH or tfds:NAME"
        )
    return sources.find(
        settings.spec,
        data_dir=settings.data_dir,
        train_split=settings.train_split,
        eval_split=settings.eval_split,
        folder_eval_fraction=settings.folder_eval_fraction,
    )


# ---------------------------------------------------------------- one image


@dataclasses.dataclass(frozen=True)
class Shrunk:
    jpeg: bytes
    size_before: tuple[int, int]  # (width, height)
    size_after: tuple[int, int]
    kept: bool  # the original bytes, stored as they were
    pixels: np.ndarray  # the stored image's uint8 HWC pixels (for the channel statistics)


def shrink(payload: bytes | np.ndarray, name: str, channels: int, shorter_side: int, quality: int) -> Shrunk:
    """One image at a shorter side of at most `shorter_side`, as JPEG; `ImageError` if unreadable."""
    mode = "L" if channels == 1 else "RGB"
    with augment.decoding(name):
        if isinstance(payload, bytes):
            image = Image.open(io.BytesIO(payload))
        else:
            image = augment.open_image(augment.match_channels(np.asarray(payload, np.uint8), channels))
        original_format, original_mode = image.format, image.mode
        progressive = bool(image.info.get("progressive") or image.info.get("progression"))
        width, height = size_before = image.size
        short = min(width, height)
        if short > shorter_side:
            scale = shorter_side / short
            size = (
                (shorter_side, max(1, round(height * scale)))
                if width <= height
                else (max(1, round(width * scale)), shorter_side)
            )
            image.draft(None, (2 * size[0], 2 * size[1]))  # DCT-reduce to no less than twice the output
            image = augment.to_mode(image, channels).resize(size, Image.BICUBIC)
        else:
            image = augment.to_mode(image, channels)
            image.load()
        pixels = np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], channels)
    kept = (
        isinstance(payload, bytes)
        and original_format == "JPEG"
        and original_mode == mode
        and not progressive
        and short <= shorter_side
    )
    if kept:
        jpeg = payload
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        jpeg = buffer.getvalue()
    return Shrunk(jpeg, size_before, image.size, kept, pixels)


# ---------------------------------------------------------------- one shard (in a worker process)

_worker: dict[str, Any] = {}


def _start_worker(splits: dict[str, Any], settings: Settings, channels: int, counter: Any) -> None:
    _worker.update(splits=splits, settings=settings, channels=channels, counter=counter)


def write_shard(job: Job, out: str) -> dict[str, Any]:
    """Write one shard (to a temporary name, renamed when complete) and return its statistics."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source, settings = _worker["splits"][job.split], _worker["settings"]
    channels, counter = _worker["channels"], _worker["counter"]
    totals = dict(examples=0, resized=0, kept=0, bytes_in=0, bytes_out=0, pixels_in=0, pixels_out=0)
    channel_sum, channel_squares = np.zeros(channels), np.zeros(channels)
    corrupt = []
    path = os.path.join(out, job.file)
    writer = ArrayRecordWriter(path + ".tmp", shards.WRITER_OPTIONS)
    try:
        for index in range(job.start, job.stop):
            name = source.describe(index)
            try:
                payload, label = source.raw(index)
                shrunk = shrink(payload, name, channels, settings.shorter_side, settings.quality)
            except (OSError, ImageError) as e:
                corrupt.append({"index": index, "name": name, "reason": getattr(e, "reason", str(e))})
                continue
            finally:
                with counter.get_lock():
                    counter.value += 1
            writer.write(shards.encode_record(label, name, shrunk.jpeg))
            totals["examples"] += 1
            totals["resized"] += shrunk.size_before != shrunk.size_after
            totals["kept"] += shrunk.kept
            totals["bytes_in"] += len(payload) if isinstance(payload, bytes) else payload.nbytes
            totals["bytes_out"] += len(shrunk.jpeg)
            totals["pixels_in"] += math.prod(shrunk.size_before)
            totals["pixels_out"] += math.prod(shrunk.size_after)
            flat = shrunk.pixels.reshape(-1, channels).astype(np.float64)
            channel_sum += flat.sum(0)
            channel_squares += (flat * flat).sum(0)
    finally:
        writer.close()
    os.replace(path + ".tmp", path)
    return {
        "file": job.file,
        "split": job.split,
        "start": job.start,
        "stop": job.stop,
        **totals,
        "channel_sum": channel_sum.tolist(),
        "channel_squares": channel_squares.tolist(),
        "corrupt": corrupt,
        "file_bytes": os.path.getsize(path),
    }


# ---------------------------------------------------------------- the output folder


def plan(found: sources.Found, settings: Settings) -> list[Job]:
    jobs = []
    for split in settings.splits:
        n = len(found.train if split == "train" else found.eval)
        count = max(1, -(-n // settings.shard_size))
        for i in range(count):
            start = i * settings.shard_size
            jobs.append(Job(split, i, count, start, min(n, start + settings.shard_size)))
    return jobs


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, document: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(document, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _check_settings(out: str, found: dict[str, Any], settings: Settings) -> None:
    for key, value in settings.as_dict().items():
        if found.get(key) != value:
            raise UserError(
                f"--out={out} holds a dataset prepared with --{key}={found.get(key)!r}, not {value!r}; "
                "pass the same arguments to resume it, or another --out"
            )


def finished_shards(out: str, settings: Settings, jobs: Sequence[Job]) -> dict[str, dict[str, Any]]:
    """The shards a previous run of the same command finished (resume); refuses a folder that holds
    anything else, or a dataset prepared with other arguments."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file; pass a folder (it is created if missing)")
    os.makedirs(out, exist_ok=True)
    ours = {shards.METADATA, shards.STATE} | {job.file for job in jobs}
    ours |= {name + ".tmp" for name in ours}
    others = sorted(set(os.listdir(out)) - ours)
    if others:
        raise UserError(
            f"--out={out} holds files that prepare did not write ({others[0]}"
            f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); pass an empty or new folder"
        )
    previous = _read_json(os.path.join(out, shards.METADATA)) or _read_json(os.path.join(out, shards.STATE))
    if previous is None:
        return {}
    _check_settings(out, previous["settings"], settings)
    return {
        name: shard
        for name, shard in previous["shards"].items()
        if os.path.exists(os.path.join(out, name))
        and os.path.getsize(os.path.join(out, name)) == shard["file_bytes"]
    }


def metadata(found: sources.Found, settings: Settings, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """prepared.json: what `prepared:DIR` needs (class names, shards, statistics) and what happened."""
    in_order = sorted(done.values(), key=lambda s: s["start"])
    by_split = {split: [s for s in in_order if s["split"] == split] for split in settings.splits}
    splits = {
        split: {
            **{key: sum(s[key] for s in rows) for key in COUNTED},
            "source_examples": len(found.train if split == "train" else found.eval),
            "corrupt": [c for s in rows for c in s["corrupt"]],
            "shards": [{"file": s["file"], "examples": s["examples"]} for s in rows],
        }
        for split, rows in by_split.items()
    }
    train = by_split["train"]
    pixels = sum(s["pixels_out"] for s in train) or 1
    mean = np.sum([s["channel_sum"] for s in train], axis=0) / pixels
    squares = np.sum([s["channel_squares"] for s in train], axis=0) / pixels
    std = np.sqrt(np.maximum(squares - mean * mean, 1e-6))
    source_size = found.source_size and min(found.source_size, settings.shorter_side)
    return {
        "format": 1,
        "settings": settings.as_dict(),
        "source": {
            "name": found.name,
            "spec": settings.spec,
            "data_dir": settings.data_dir,
            "train_split": settings.train_split,
            "eval_split": settings.eval_split,
            "folder_eval_fraction": settings.folder_eval_fraction,
        },
        "class_names": list(found.class_names),
        "channels": found.channels,
        "source_size": source_size,
        "stats": {"mean": mean.tolist(), "std": std.tolist(), "over": "the stored train pixels"},
        "splits": splits,
        "shards": done,
    }


# ---------------------------------------------------------------- running it


def _run_jobs(
    jobs: Sequence[Job],
    out: str,
    split_sources: dict[str, Any],
    settings: Settings,
    channels: int,
    processes: int,
    finished: Callable[[dict[str, Any]], None],
    meter: progress.Meter,
) -> None:
    if processes == 1:  # in this process: no start-up cost, and nothing to pickle
        counter = multiprocessing.Value("q", 0)
        _start_worker(split_sources, settings, channels, counter)
        for job in jobs:
            finished(write_shard(job, out))
            meter.update(counter.value)
        return
    context = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
    counter = context.Value("q", 0)
    with context.Pool(
        processes, initializer=_start_worker, initargs=(split_sources, settings, channels, counter)
    ) as pool:
        pending = [pool.apply_async(write_shard, (job, out)) for job in jobs]
        while pending:
            for result in [r for r in pending if r.ready()]:
                finished(result.get())
                pending.remove(result)
            meter.update(counter.value)
            time.sleep(0.1)


def prepare(settings: Settings, out: str, processes: int, report: Callable[[str], None]) -> dict[str, Any]:
    """Write (or finish) DIR's shards and prepared.json; returns prepared.json's contents."""
    settings.check()
    if processes < 1:
        raise UserError(f"--processes={processes} must be 1 or more")
    found = open_source(settings)
    jobs = plan(found, settings)
    done = finished_shards(out, settings, jobs)
    todo = [job for job in jobs if job.file not in done]
    split_sources = {"train": found.train, "eval": found.eval}
    total = sum(job.stop - job.start for job in todo)
    workers = min(processes, max(1, len(todo)))
    metadata_path = os.path.join(out, shards.METADATA)
    if not todo and os.path.exists(metadata_path):
        report(f"{out} is complete: every shard of these arguments is there; nothing to do")
        with open(metadata_path) as f:
            return json.load(f)
    if done:
        report(f"resuming: {len(done)} of {len(jobs)} shards are finished, {total:,} images to go")
    report(
        f"preparing {settings.spec} ({', '.join(settings.splits)}) at a shorter side of at most "
        f"{settings.shorter_side} px, JPEG quality {settings.quality}: {total:,} images, "
        f"{len(todo)} shards, {workers} process(es)"
    )
    state = {"settings": settings.as_dict(), "shards": done}
    if os.path.exists(metadata_path):  # shards went missing: unfinished until they are back
        _write_json(os.path.join(out, shards.STATE), state)
        os.remove(metadata_path)

    def finished(shard: dict[str, Any]) -> None:
        done[shard["file"]] = shard
        _write_json(os.path.join(out, shards.STATE), state)
        for bad in shard["corrupt"]:
            progress.warn(f"skipping unreadable image {bad['name']}: {bad['reason']}")

    start = time.perf_counter()
    with progress.Meter(total, "images") as meter:
        _run_jobs(todo, out, split_sources, settings, found.channels, workers, finished, meter)
    seconds = time.perf_counter() - start
    document = metadata(found, settings, done)
    _write_json(metadata_path, document)
    if os.path.exists(os.path.join(out, shards.STATE)):
        os.remove(os.path.join(out, shards.STATE))
    if total:
        report(
            f"{total:,} images in {seconds:.1f} s: {total / seconds:,.0f} images/s with "
            f"{workers} process(es), {total / seconds / workers:,.0f} per process"
        )
    return document


def summary(document: dict[str, Any]) -> str:
    lines = [
        "| split | examples | unreadable | resized | stored as they were | MB before | MB after | "
        "megapixels/image before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for split, s in document["splits"].items():
        n = max(1, s["examples"])
        lines.append(
            f"| {split} | {s['examples']:,} | {len(s['corrupt'])} | {s['resized']:,} | {s['kept']:,} | "
            f"{s['bytes_in'] / 1e6:,.1f} | {s['file_bytes'] / 1e6:,.1f} | "
            f"{s['pixels_in'] / n / 1e6:.3f} | {s['pixels_out'] / n / 1e6:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags

    flag_values = flags.FlagValues()
    flags.DEFINE_string(
        "data", None, "Dataset spec to prepare: folder:PATH or tfds:NAME.", flag_values=flag_values
    )
    flags.DEFINE_string("out", None, "Folder for the shards and prepared.json.", flag_values=flag_values)
    flags.DEFINE_integer(
        "shorter_side", None, "Resize so that the shorter side is at most this.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "quality", None, "JPEG quality of re-encoded images, 1..100.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "processes", 0, "Worker processes (0: every core this process may use).", flag_values=flag_values
    )
    flags.DEFINE_list("splits", list(shards.SPLITS), "train, or train,eval.", flag_values=flag_values)
    flags.DEFINE_integer("shard_size", SHARD_SIZE, "Examples per shard.", flag_values=flag_values)
    flags.DEFINE_string(
        "data_dir", None, "tfds: its data dir (None: the tfds default).", flag_values=flag_values
    )
    flags.DEFINE_string("train_split", "train", "tfds: the train split.", flag_values=flag_values)
    flags.DEFINE_string(
        "eval_split", "auto", "tfds: the eval split (auto: validation, else test).", flag_values=flag_values
    )
    flags.DEFINE_float(
        "folder_eval_fraction",
        0.1,
        "folder: the eval share of each class without train/ and val/.",
        flag_values=flag_values,
    )
    cli.parse(flag_values, argv, prog="python -m resnet_jax.prepare", doc=__doc__)
    missing = [name for name in ("data", "out", "shorter_side", "quality") if flag_values[name].value is None]
    if missing:
        cli.fail(f"--{missing[0]} is required (see python -m resnet_jax.prepare --help)")
    settings = Settings(
        spec=flag_values.data,
        shorter_side=flag_values.shorter_side,
        quality=flag_values.quality,
        splits=tuple(flag_values.splits),
        shard_size=flag_values.shard_size,
        data_dir=flag_values.data_dir,
        train_split=flag_values.train_split,
        eval_split=flag_values.eval_split,
        folder_eval_fraction=flag_values.folder_eval_fraction,
    )
    processes = flag_values.processes or len(os.sched_getaffinity(0))

    def work() -> None:
        report = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        document = prepare(settings, flag_values.out, processes, report)
        print(summary(document))
        print(f"train with --config.dataset=prepared:{flag_values.out}")

    return cli.run(work)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing here needs an accelerator
    sys.exit(main())
