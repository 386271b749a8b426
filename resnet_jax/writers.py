"""Where metrics go: stdout, metrics.jsonl and TensorBoard, plus the parameter table and image grid.

clu's own writers import TensorFlow, so this TensorFlow-free package has its own small `Writer`
interface (write_scalars / write_hparams / write_images / flush / close) with a stdout, a
metrics.jsonl and a TensorBoard writer (event files through tensorboardX in
WORKDIR/tensorboard/<run name>/, tags grouped as `train/...` and `eval/...` by `tensorboard_tag`),
combined by `MultiWriter`. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from resnet_jax.progress import log

# metrics.jsonl keys without a `train_`/`eval_` prefix, and their TensorBoard group.
UNPREFIXED_TAGS = {
    "learning_rate": "train/learning_rate",
    "steps_per_sec": "train/steps_per_sec",
    "images_per_sec": "train/images_per_sec",
}
GROUPS = ("train", "eval")
History = Mapping[str, Sequence[float]]  # a key's value at every step of a log window


def tensorboard_tag(key: str) -> str:
    """A metrics.jsonl key as its TensorBoard tag: `train_loss` -> `train/loss`, `learning_rate` ->
    `train/learning_rate`. TensorBoard draws one section per prefix before `/`, so flat names gave
    a section per metric."""
    if key in UNPREFIXED_TAGS:
        return UNPREFIXED_TAGS[key]
    group, _, name = key.partition("_")
    return f"{group}/{name}" if group in GROUPS and name else key


def metrics_key(name: str) -> str:
    """The metrics.jsonl key of a TensorBoard tag (a key stays as it is): `tensorboard_tag` undone."""
    unprefixed = {tag: key for key, tag in UNPREFIXED_TAGS.items()}
    if name in unprefixed:
        return unprefixed[name]
    group, slash, rest = name.partition("/")
    return f"{group}_{rest}" if slash and group in GROUPS else name


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as `{"a.b": value}` with values TensorBoard's hparams accept (others as str);
    unset (None) values are left out rather than shown as the string 'None'."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


class Writer(Protocol):
    """What the training loop writes through; every method is a no-op where it does not apply."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any], history: History | None = None) -> None:
        """`history`: for some keys of `scalars`, their value at every step up to `step`, which only
        TensorBoard keeps (a curve of one point per log step is bent by its smoothing)."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: tag -> HWC uint8 array (1 or 3 channels)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in scalars.items()}


class StdoutWriter:
    """`step N | key value | ...` lines; the training loop prints its own formatted lines instead."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any], history: History | None = None) -> None:
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

    def write_scalars(self, step: int, scalars: Mapping[str, Any], history: History | None = None) -> None:
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


# The HParams dashboard orders its columns by hparam name and ticks the first five, so these get
# names that sort first ("00 model", "01 optimizer", ...) and are shown under their own names.
HPARAM_COLUMNS = ("model", "optimizer", "learning_rate", "batch_size", "epochs", "dtype", "dataset")
HPARAM_METRICS = ("eval/accuracy", "eval/top5_accuracy", "eval/loss", "train/loss")


def hparams_summaries(hparams: Mapping[str, Any], metric_tags: Sequence[str] = HPARAM_METRICS) -> list[Any]:
    """The hparams plugin's experiment and session-start summaries (tensorboardX protos) of the
    flattened `hparams`: the `HPARAM_COLUMNS` first, then every other key in name order."""
    from tensorboardX.proto import api_pb2, plugin_hparams_pb2, summary_pb2

    flat = flatten(hparams)
    leading = [key for key in HPARAM_COLUMNS if key in flat]
    start = plugin_hparams_pb2.SessionStartInfo()
    infos = []
    for key in leading + sorted(flat.keys() - set(leading)):
        name, value = f"{leading.index(key):02d} {key}" if key in leading else key, flat[key]
        if isinstance(value, str):
            start.hparams[name].string_value, kind = value, "DATA_TYPE_STRING"
        elif isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        else:
            start.hparams[name].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
        infos.append(api_pb2.HParamInfo(name=name, display_name=key, type=api_pb2.DataType.Value(kind)))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)

    def summary(tag: str, **data: Any) -> Any:
        content = plugin_hparams_pb2.HParamsPluginData(version=0, **data).SerializeToString()
        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="hparams", content=content)
        metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)
        return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata)])

    return [
        summary("_hparams_/experiment", experiment=experiment),
        summary("_hparams_/session_start_info", session_start_info=start),
    ]


class TensorBoardWriter:
    """Event files written by tensorboardX (no TensorFlow needed) into `logdir`.

    Tags are grouped (`tensorboard_tag`), `history` gives a point per step, the config goes to the
    hparams plugin (and as text), images are HWC uint8.
    """

    def __init__(self, logdir: str, flush_secs: int = 10):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir, flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any], history: History | None = None) -> None:
        series = {key: [value] for key, value in _floats(scalars).items()} | dict(history or {})
        for key, values in series.items():
            tag = tensorboard_tag(key)
            for at, value in enumerate(values, int(step) - len(values) + 1):
                self._writer.add_scalar(tag, float(value), at)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Written into this run's folder (SummaryWriter.add_hparams would open a sub-folder, a
        second run, per call)."""
        file_writer = self._writer._get_file_writer()
        for summary in hparams_summaries(hparams):
            file_writer.add_summary(summary)
        self._writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in flatten(hparams).items()), 0)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for tag, image in images.items():
            self._writer.add_image(tensorboard_tag(tag), np.asarray(image), int(step), dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter:
    """Forwards every call to each writer; with `enabled=False` (processes other than 0) does nothing."""

    def __init__(self, writers: Sequence[Writer], enabled: bool = True):
        self.writers = list(writers) if enabled else []

    def write_scalars(self, step: int, scalars: Mapping[str, Any], history: History | None = None) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars, history)

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


def run_name(workdir: str) -> str:
    """The workdir's folder name: TensorBoard names a run by its folder below --logdir, so event files
    directly in the folder it is pointed at would be a run named "."."""
    return os.path.basename(os.path.abspath(workdir)) or "run"


def create_writer(workdir: str, *, enabled: bool = True, stdout: bool = False) -> MultiWriter:
    """metrics.jsonl + WORKDIR/tensorboard/<run name>/ (+ stdout lines if asked); nothing unless `enabled`."""
    if not enabled:
        return MultiWriter([], enabled=False)
    logdir = os.path.join(workdir, "tensorboard", run_name(workdir))
    writers: list[Writer] = [JsonlWriter(workdir), TensorBoardWriter(logdir)]
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
