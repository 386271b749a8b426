"""Decoding with NVIDIA DALI (`config.loader="dali"`): on a GPU host, JPEGs decode on the GPU.

grain keeps everything that makes a run exact: the index, the shuffle, the epochs, repeated
augmentation, the skipping of unreadable files and the checkpointed position. Its per-example
transform (`TrainPrep`, `EvalPrep`) reads the stored bytes, parses the header and draws the crop
and the flip with the grain path's own functions and random stream, so a resumed run sees the same
images in the same order with the same crops. DALI (`Decoder`) then decodes only each crop's
region (`fn.decoders.image_slice`: nvJPEG with Hopper's hardware decoder under `device="mixed"`,
its CPU operators on hosts without a GPU), resizes it and flips it; the eval images are resized
and center-cropped in one pass over the region torchvision's arithmetic gives. On GPU hosts each
local device gets its own pipeline and its shard of the batch stays on that device.

DALI has no RandAugment, TrivialAugment or random erasing: `check_config` refuses those settings.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax import augment, parallel, progress
from resnet_jax.augment import Example
from resnet_jax.errors import ConfigError

LOADERS = ("grain", "dali")
INSTALL_HINT = "pip install -e '.[dali]' (CUDA 12, like jax[cuda12]; '.[dali-cuda13]' with jax[cuda13])"
MAX_THREADS = 6  # host threads per pipeline: NVIDIA's MLPerf ResNet uses about this many per GPU
HW_DECODER_LOAD = 0.99  # share of the images for the hardware JPEG decoder (A100, Hopper), as MLPerf's
RAGGED = ("encoded",)  # batch keys that stay lists: files differ in length
PREPARED = ("encoded", "box", "flip", "region")  # what the transforms hand to the pipelines


def installed() -> bool:
    """Whether NVIDIA DALI can be imported, without importing it (`find_spec("nvidia.dali")` raises
    where no `nvidia` package exists at all)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def check_config(config: Any) -> None:
    """One line for a `loader="dali"` setting that cannot work, before anything loads or compiles."""
    if config.loader != "dali":
        return
    if config.auto_augment != "none":
        raise ConfigError(
            f"config.loader='dali' cannot apply config.auto_augment={config.auto_augment!r} (DALI has no "
            "such policy); use config.loader='grain' or config.auto_augment='none'"
        )
    if config.random_erase_prob > 0:
        raise ConfigError(
            f"config.loader='dali' cannot apply config.random_erase_prob={config.random_erase_prob!r} "
            "(DALI has no random erasing); use config.loader='grain' or config.random_erase_prob=0"
        )
    kind = str(config.dataset).partition(":")[0]
    if kind in ("digits", "synthetic"):
        raise ConfigError(
            f"config.loader='dali' decodes image files and config.dataset={config.dataset!r} has none; "
            "use config.loader='grain'"
        )
    if not installed():
        raise ConfigError(f"config.loader='dali' needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")


def check_dataset(style: str, channels: int) -> None:
    """DALI does the ImageNet crop and flip of RGB images; everything else stays with grain."""
    if style != "imagenet":
        raise ConfigError(
            f"config.loader='dali' does the ImageNet crop and flip, and this dataset's augmentation is "
            f"{style!r} (config.augment); use config.loader='grain' or config.augment='imagenet'"
        )
    if channels != 3:
        raise ConfigError(
            f"config.loader='dali' decodes RGB images and this dataset has {channels} channel(s); "
            "use config.loader='grain'"
        )


def encoded(image: np.ndarray | augment.EncodedImage) -> tuple[bytes, int, int]:
    """(bytes DALI decodes to RGB, height, width): a file's own bytes where it is a JPEG or PNG in a
    mode DALI reads the way PIL does, else the pixels as a lossless PNG (TFDS arrays, CMYK files)."""
    if isinstance(image, augment.EncodedImage):
        header = image.open()
        if header.format in ("JPEG", "PNG") and header.mode in ("RGB", "L"):
            width, height = header.size
            return image.data, height, width
    pixels = augment.as_array(image, 3)
    return augment.encode_png(pixels), pixels.shape[0], pixels.shape[1]


def as_uint8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8)


class TrainPrep:
    """grain's per-example transform for DALI: the bytes, and the Inception crop box and flip drawn
    as the grain path draws them (`augment.random_resized_crop_box`, then the flip)."""

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        data, height, width = encoded(example["image"])
        top, left, crop_h, crop_w = augment.random_resized_crop_box(height, width, rng)
        flip = rng.random() < 0.5
        rest = {k: v for k, v in example.items() if k != "image"}
        # x, y, width, height: DALI's "WH" axis order.
        return {
            **rest,
            "encoded": as_uint8(data),
            "box": np.int32([left, top, crop_w, crop_h]),
            "flip": np.int32(flip),
        }


class EvalPrep:
    """The eval transform for DALI: the bytes and the region that torchvision's shorter-side resize
    and center crop keep (`eval_region`), in the image's own pixels."""

    def __init__(self, size: int, crop: float = 1.0):
        self.size, self.crop = size, crop

    def __call__(self, example: Example) -> Example:
        data, height, width = encoded(example["image"])
        rest = {k: v for k, v in example.items() if k != "image"}
        region = eval_region(height, width, self.size, self.crop)
        return {**rest, "encoded": as_uint8(data), "region": np.float32(region)}


def eval_region(height: int, width: int, size: int, crop: float) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) of the original image that `augment.resize_shorter_and_center_crop` keeps:
    resizing that region to size x size samples the same points as resizing, then cropping."""
    new_h, new_w, top, left = augment.center_crop_geometry(height, width, size, crop)
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, (top + size) * sy, (left + size) * sx


def default_threads() -> int:
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


class Decoder:
    """DALI pipelines that turn grain's prepared batches into image batches: one for the process
    on the CPU, one per local device on GPUs (`device="mixed"`), all decoding at once; built on
    first use. A batch DALI cannot decode is decoded on the host instead, with a warning."""

    def __init__(self, size: int, eval_size: int, threads: int | None = None):
        self.size, self.eval_size = size, eval_size
        self.threads = threads or default_threads()
        self._pipelines: dict[tuple[bool, int | None], tuple[Any, int]] = {}

    def __getstate__(self) -> dict[str, Any]:  # grain may pickle the dataset; pipelines stay here
        return {**self.__dict__, "_pipelines": {}}

    def pipeline(self, train: bool, device_id: int | None, batch_size: int) -> Any:
        """The pipeline of (mode, device); rebuilt only for a larger batch (smaller ones are fed)."""
        pipe, capacity = self._pipelines.get((train, device_id), (None, 0))
        if batch_size > capacity:
            build = train_pipeline if train else eval_pipeline
            pipe = build(
                size=self.size if train else self.eval_size,
                device="cpu" if device_id is None else "mixed",
                batch_size=batch_size,
                num_threads=self.threads,
                device_id=device_id,
                prefetch_queue_depth=1,
                exec_dynamic=True,
            )
            pipe.build()
            self._pipelines[(train, device_id)] = (pipe, batch_size)
        return pipe

    def start(self, batch: Example, train: bool, device_id: int | None = None) -> Any:
        """Feed one (part of a) prepared batch and let its pipeline run; `finish` collects it."""
        pipe = self.pipeline(train, device_id, len(batch["encoded"]))
        pipe.feed_input("encoded", list(batch["encoded"]))
        for key in ("box", "flip") if train else ("region",):
            pipe.feed_input(key, list(batch[key]))
        pipe.schedule_run()
        return pipe

    def finish(self, pipe: Any, batch: Example, train: bool) -> Any:
        """The started batch's images: DALI's output, or host pixels where DALI failed on a file."""
        try:
            (images,) = pipe.outputs()
            return images
        except RuntimeError as e:  # a file PIL reads and DALI's decoders do not
            first = str(e).strip().splitlines()[0][:200]
            progress.warn(
                f"DALI could not decode a batch ({first}); decoding it on the host", every_process=True
            )
            return host_decode(batch, self.size if train else self.eval_size, train)

    def host_images(self, batch: Example, train: bool = False) -> np.ndarray:
        """The decoded images of a prepared batch, in host memory (decoded on the CPU)."""
        images = self.finish(self.start(batch, train), batch, train)
        return images if isinstance(images, np.ndarray) else images.as_array()  # a CPU pipeline's

    def to_global(
        self, batch: Example, sharding: Any, train: bool, global_batch_size: int | None = None
    ) -> dict[str, Any]:
        """A prepared host batch as the global, sharded batch the step takes (this process's rows
        checked against `global_batch_size` as `parallel.to_global` checks them)."""
        import jax

        rest = {k: np.asarray(v) for k, v in batch.items() if k not in PREPARED}
        devices = local_devices(sharding)
        if devices[0].platform != "gpu":
            images = self.host_images(batch, train)
            return parallel.to_global({"image": images, **rest}, sharding, global_batch_size)
        rows = np.array_split(np.arange(len(batch["encoded"])), len(devices))
        parts = [{k: [batch[k][i] for i in r] for k in batch if k in PREPARED} for r in rows]
        started = [
            self.start(part, train, d.local_hardware_id) for part, d in zip(parts, devices, strict=True)
        ]
        arrays = []
        for pipe, part, device in zip(started, parts, devices, strict=True):
            images = self.finish(pipe, part, train)
            if isinstance(images, np.ndarray):  # the host fallback
                arrays.append(jax.device_put(images, device))
            else:  # copied out of DALI's buffer before the pipeline runs again
                arrays.append(jax.dlpack.from_dlpack(images.as_tensor()).copy())
        shape = (len(batch["encoded"]) * sharding.num_devices // len(devices), *arrays[0].shape[1:])
        images = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
        return {"image": images, **parallel.to_global(rest, sharding, global_batch_size)}


def host_decode(batch: Example, size: int, train: bool) -> np.ndarray:
    """The batch decoded with PIL, crops and flips as drawn: what DALI would have given, to
    resampling, for the files it refused."""
    images = []
    for i, data in enumerate(batch["encoded"]):
        image = augment.EncodedImage(bytes(data), f"example {i}")
        if train:
            left, top, width, height = (int(v) for v in batch["box"][i])
            crop = augment.decode_crop_resize(image, (top, left, height, width), size, 3, draft=False)
            pixels = np.asarray(crop, np.uint8)
            images.append(pixels[:, ::-1] if batch["flip"][i] else pixels)
        else:
            y0, x0, y1, x1 = (float(v) for v in batch["region"][i])
            region = augment.decode_crop_resize(image, (y0, x0, y1 - y0, x1 - x0), size, 3, draft=False)
            images.append(np.asarray(region, np.uint8))
    return np.stack(images)


def local_devices(sharding: Any) -> Sequence[Any]:
    """This process's devices in the order `jax.make_array_from_process_local_data` fills them."""
    import jax

    return [d for d in sharding.mesh.devices.flat if d.process_index == jax.process_index()]


def decoder_options(device: str) -> dict[str, Any]:
    """The decoders' settings: no EXIF rotation (grain does none, and the boxes are drawn in the
    stored orientation), and on GPUs the hardware decoder's share."""
    options: dict[str, Any] = {"adjust_orientation": False}
    return options | ({"hw_decoder_load": HW_DECODER_LOAD} if device == "mixed" else {})


def train_pipeline(size: int, device: str, **options: Any) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**options)
    def pipeline() -> Any:
        data = fn.external_source(name="encoded", dtype=types.UINT8)
        box = fn.external_source(name="box", dtype=types.INT32)
        flip = fn.external_source(name="flip", dtype=types.INT32)
        images = fn.decoders.image_slice(
            data,
            fn.slice(box, 0, 2, axes=[0]),
            fn.slice(box, 2, 2, axes=[0]),
            normalized_anchor=False,
            normalized_shape=False,
            output_type=types.RGB,
            device=device,
            **decoder_options(device),
        )
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True, dtype=types.UINT8)
        return fn.flip(images, horizontal=flip)

    return pipeline()


def eval_pipeline(size: int, device: str, **options: Any) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**options)
    def pipeline() -> Any:
        data = fn.external_source(name="encoded", dtype=types.UINT8)
        region = fn.external_source(name="region", dtype=types.FLOAT)
        images = fn.decoders.image(data, output_type=types.RGB, device=device, **decoder_options(device))
        return fn.resize(
            images,
            resize_x=size,
            resize_y=size,
            roi_start=fn.slice(region, 0, 2, axes=[0]),
            roi_end=fn.slice(region, 2, 2, axes=[0]),
            roi_relative=False,
            antialias=True,
            dtype=types.UINT8,
        )

    return pipeline()
