"""Where metrics go: stdout, metrics.jsonl and TensorBoard, plus the parameter table and image grid.

clu's own writers import TensorFlow, so this TensorFlow-free package has its own small `Writer`
interface (write_scalars / write_hparams / write_images / flush / close) with a stdout, a
metrics.jsonl and a TensorBoard writer (event files through tensorboardX, in one flat folder,
scalar tags named like the metrics.jsonl keys), combined by `MultiWriter`. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from resnet_jax.progress import log


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as `{"a.b": value}` with values TensorBoard's hparams accept (others as str)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class Writer(Protocol):
    """What the training loop writes through; every method is a no-op where it does not apply."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: tag -> HWC uint8 array (1 or 3 channels)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in scalars.items()}


class StdoutWriter:
    """`step N | key value | ...` lines; the training loop prints its own formatted lines instead."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        log(" | ".join([f"step {int(step)}", *(f"{k} {v:.6g}" for k, v in _floats(scalars).items())]))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        log("hparams: " + ", ".join(f"{k}={v}" for k, v in flatten(hparams).items()))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in images.items())
        log(f"step {int(step)}: images {shapes}")

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        self.flush()


class JsonlWriter:
    """WORKDIR/metrics.jsonl: one `{"step": int, ...scalars}` object per write (the contract)."""

    def __init__(self, workdir: str):
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 - lives with the writer

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"step": int(step), **_floats(scalars)}) + "\n")
        self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass  # the config is in the checkpoints and on the command line; jsonl holds scalars only

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Event files in one flat folder, written by tensorboardX (no TensorFlow needed).

    Scalars keep their metrics.jsonl names as tags; the config goes to the hparams plugin (and as
    text); images are HWC uint8. `tensorboard --logdir WORKDIR/tensorboard` shows the run.
    """

    HPARAM_METRICS = ("eval_accuracy", "eval_top5_accuracy", "eval_loss", "train_loss")

    def __init__(self, logdir: str, flush_secs: int = 10):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir, flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in _floats(scalars).items():
            self._writer.add_scalar(key, value, int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hparams plugin's summaries, written into this folder (SummaryWriter.add_hparams would
        open a sub-folder per call, breaking the one-flat-folder layout)."""
        from tensorboardX.summary import hparams as hparams_summaries

        flat = flatten(hparams)
        experiment, session_start, _ = hparams_summaries(flat, dict.fromkeys(self.HPARAM_METRICS, 0.0))
        file_writer = self._writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)
        self._writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in flat.items()), 0)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for tag, image in images.items():
            self._writer.add_image(tag, np.asarray(image), int(step), dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter:
    """Forwards every call to each writer; with `enabled=False` (processes other than 0) does nothing."""

    def __init__(self, writers: Sequence[Writer], enabled: bool = True):
        self.writers = list(writers) if enabled else []

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_hparams(hparams)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for writer in self.writers:
            writer.write_images(step, images)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create_writer(workdir: str, *, enabled: bool = True, stdout: bool = False) -> MultiWriter:
    """metrics.jsonl + WORKDIR/tensorboard/ (+ stdout lines if asked); nothing unless `enabled`."""
    if not enabled:
        return MultiWriter([], enabled=False)
    writers: list[Writer] = [JsonlWriter(workdir), TensorBoardWriter(os.path.join(workdir, "tensorboard"))]
    if stdout:
        writers.insert(0, StdoutWriter())
    return MultiWriter(writers)


def prediction_grid(
    images: np.ndarray,
    labels: Sequence[int],
    predicted: Sequence[int],
    class_names: Sequence[str],
    tile: int = 64,
    columns: int = 4,
) -> np.ndarray:
    """uint8 NHWC images -> one HWC uint8 grid, each tile captioned `predicted (true)`, green when
    right and red when wrong: what the eval image card in TensorBoard shows."""
    from PIL import Image, ImageDraw

    caption_height = 14
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, label, guess) in enumerate(zip(images, labels, predicted, strict=True)):
        image = np.asarray(image, np.uint8)
        mode = "L" if image.shape[-1] == 1 else "RGB"
        picture = Image.fromarray(image[..., 0] if mode == "L" else image, mode).convert("RGB")
        # Small images keep their pixels sharp; large ones shrink smoothly.
        resample = Image.Resampling.NEAREST if picture.width < tile else Image.Resampling.BILINEAR
        picture = picture.resize((tile, tile), resample)
        x, y = (i % columns) * tile, (i // columns) * (tile + caption_height)
        grid.paste(picture, (x, y))
        name = lambda k: str(class_names[k])[:8] if k < len(class_names) else str(k)
        colour = (0, 128, 0) if guess == label else (200, 0, 0)
        draw.text((x + 2, y + tile + 1), f"{name(guess)} ({name(label)})", fill=colour)
    return np.asarray(grid)


def write_parameter_overview(params: Any, workdir: str) -> tuple[str, str]:
    """`clu.parameter_overview`'s table (name, shape, size of every array) into WORKDIR/parameters.txt.

    Returns the path and the table's last line (`Total: N`): a ResNet-200's table is 600+ lines,
    too long for the start of a log, so stdout gets the total and the path.
    """
    from clu import parameter_overview

    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    path = os.path.join(workdir, "parameters.txt")
    with open(path, "w") as f:
        f.write(table + "\n")
    return path, table.strip().splitlines()[-1]
