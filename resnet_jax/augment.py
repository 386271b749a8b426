"""Image decoding, resizing and augmentation on the host, in uint8 (HWC numpy arrays).

Train transforms take `(example, rng)` with grain's per-example generator, so
augmentation is a pure function of the seed and the example's position: a
resumed run sees exactly the same crops and flips.

Sources of image files (folders, TFDS) hand over `EncodedImage` bytes rather than pixels: the
ImageNet-style train transform chooses its crop from the header's size first, then decodes a JPEG
at the smallest DCT scale that keeps the crop at least as large as the output
(`decode_crop_resize`), and resizes straight from the decoded image to the output size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax import autoaugment
from resnet_jax.errors import ImageError

AUGMENTATIONS = ("auto", "cifar", "imagenet", "shift", "none")
IMAGENET_EVAL_CROP = 0.875  # resize to size / 0.875 (256 for 224), then center-crop
Example = dict[str, Any]  # one image and its label (and flags), as the sources and loaders pass it
DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly


PIL_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises on a bad or truncated file


@contextlib.contextmanager
def decoding(name: str) -> Iterator[None]:
    """PIL's errors on a bad image, as one `ImageError` that names the file or record."""
    try:
        yield
    except ImageError:
        raise
    except PIL_ERRORS as e:
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # PIL names its buffer
        raise ImageError(f"cannot decode {name}: {reason}", reason) from None


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, decoded by the transform only as far as its crop needs.

    `header` is the PIL image a source already opened to check the file: the transform takes it
    (once) instead of parsing the header a second time. It never crosses a process boundary.
    """

    data: bytes
    name: str  # the file or record, for messages
    header: Image.Image | None = dataclasses.field(default=None, compare=False, repr=False)

    def open(self) -> Image.Image:
        """A PIL image, parsed up to its header only, that the caller may decode once."""
        header = self.header
        if header is not None:
            object.__setattr__(self, "header", None)  # a one-shot cache: PIL decodes an image once
            return header
        with decoding(self.name):
            return Image.open(io.BytesIO(self.data))

    def __getstate__(self) -> dict[str, object]:
        return {"data": self.data, "name": self.name, "header": None}


def is_complete(data: bytes, kind: str | None) -> bool:
    """Whether a JPEG or PNG file ends with its end marker (a truncated download does not)."""
    tail = data.rstrip(b"\0")
    return (kind == "JPEG" and tail.endswith(b"\xff\xd9")) or (kind == "PNG" and tail[-8:-4] == b"IEND")


def encoded_or_decoded(data: bytes, name: str, channels: int = 3) -> EncodedImage | np.ndarray:
    """A complete JPEG or PNG file as `EncodedImage` (decoded later, lazily, from the header parsed
    here), anything else decoded now. Raises `ImageError` when the file cannot be read, so that the
    source can skip it: a truncated JPEG or PNG lacks its end marker and is decoded here to find out."""
    with decoding(name):
        image = Image.open(io.BytesIO(data))  # parses the header only
        if is_complete(data, image.format):
            return EncodedImage(data, name, image)
        return pil_to_array(image, channels)


def open_image(image: np.ndarray | EncodedImage) -> Image.Image:
    """A PIL image to crop from; an `EncodedImage` is only parsed up to its header here."""
    if isinstance(image, EncodedImage):
        return image.open()
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def decode_crop_resize(
    image: np.ndarray | EncodedImage | Image.Image,
    box: tuple[int, int, int, int],
    size: int,
    channels: int,
    draft: bool = True,
    name: str = "image",
) -> Image.Image:
    """The (top, left, height, width) `box` of the image, resized to size x size (bilinear,
    antialiased when shrinking) in one PIL pass.

    A JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps the box at least
    `size` pixels on both sides, so the pixels cover the same region at no less than the output's
    resolution. Other formats and arrays are used as they are. A PIL `image` must not be loaded yet.
    """
    pil = image if isinstance(image, Image.Image) else open_image(image)
    top, left, height, width = box
    full_width, full_height = pil.size
    scale = 1
    if draft and pil.format == "JPEG":
        scale = next((s for s in DCT_SCALES if min(height, width) >= s * size), 1)
        if scale > 1:
            pil.draft(None, (full_width // scale, full_height // scale))
            scale = full_width / pil.size[0]  # what libjpeg chose (its sizes round up)
            scale = 2 ** round(math.log2(scale))
    with decoding(getattr(image, "name", name)):
        pil = to_mode(pil, channels)
        region = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        return pil.resize((size, size), Image.BILINEAR, box=region)


def pixels(image: Image.Image, channels: int) -> np.ndarray:
    """A PIL image's uint8 HWC pixels."""
    return np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], channels)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def as_array(image: np.ndarray | EncodedImage, channels: int) -> np.ndarray:
    """Decoded uint8 HWC pixels with `channels` channels."""
    if isinstance(image, EncodedImage):
        with decoding(image.name):
            return pil_to_array(image.open(), channels)
    return match_channels(image, channels)


def pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Decode a PIL image to uint8 HWC with `channels` (grayscale, palette, RGBA converted)."""
    with image:
        array = np.asarray(to_mode(image, channels), dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def decode_image(source: str | bytes, channels: int = 3) -> np.ndarray:
    """A file path or encoded bytes -> uint8 HWC with `channels` (grayscale, palette, RGBA converted)."""
    return pil_to_array(Image.open(io.BytesIO(source) if isinstance(source, bytes) else source), channels)


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == channels:
        return image
    if channels == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return decode_image(encode_png(image), channels)  # RGBA or RGB -> L through PIL's conversions


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 HWC image (PIL, antialiased when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    squeezed = image[..., 0] if image.shape[-1] == 1 else image
    out = np.asarray(Image.fromarray(squeezed).resize((width, height), Image.BILINEAR), dtype=np.uint8)
    return out.reshape(height, width, image.shape[-1])


def center_crop_geometry(height: int, width: int, size: int, crop: float = 1.0) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of the standard eval preprocessing: the shorter
    side to size / crop, then the central size x size.

    Sizes and offsets are torchvision's (`Resize` truncates the longer side, `CenterCrop` rounds the
    offset half to even), so that imported torchvision/timm weights see the same pixels.
    """
    short = round(size / crop)
    if height <= width:
        new_h, new_w = short, max(short, int(width * short / height))
    else:
        new_h, new_w = max(short, int(height * short / width)), short
    return new_h, new_w, round((new_h - size) / 2), round((new_w - size) / 2)


def resize_shorter_and_center_crop(image: np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """The standard eval preprocessing (`center_crop_geometry`) applied to an image."""
    new_h, new_w, top, left = center_crop_geometry(*image.shape[:2], size, crop)
    return resize(image, new_h, new_w)[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_shift(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Pad with zeros by `pad` and take a random crop of the original size (a translation)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    return padded[dy : dy + h, dx : dx + w]


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop (torchvision's RandomResizedCrop): a random area fraction and aspect
    ratio; returns (top, left, height, width), chosen before any pixel is decoded."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    # Fallback: the largest central crop within the ratio bounds.
    aspect = min(max(width / height, ratio[0]), ratio[1])
    crop_w, crop_h = (
        (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    )
    crop_h, crop_w = min(crop_h, height), min(crop_w, width)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def random_resized_crop_and_flip(
    image: np.ndarray | EncodedImage,
    rng: np.random.Generator,
    size: int,
    channels: int = 3,
    draft: bool = True,
    flip: bool = True,
) -> Image.Image:
    """The ImageNet train crop as a PIL image: the box and the flip are drawn before any pixel is
    decoded (in `random_flip`'s order), and the flip is PIL's (a numpy flip costs a strided copy)."""
    pil = open_image(image)  # the header only
    width, height = pil.size
    box = random_resized_crop_box(height, width, rng)
    flipped = flip and rng.random() < 0.5
    crop = decode_crop_resize(pil, box, size, channels, draft, getattr(image, "name", "image"))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else crop


def choose(augment: str, dataset_name: str, source_size: int | None, image_size: int) -> str:
    """Resolve `augment='auto'`: digits shift, small images (<= 64 px) CIFAR-style, else ImageNet-style."""
    if augment != "auto":
        return augment
    if dataset_name == "digits":
        return "shift"
    if dataset_name == "synthetic":
        return "none"
    small = source_size is not None and source_size <= 64
    return "cifar" if small and image_size <= 64 else "imagenet"


Policy = Callable[[Image.Image, np.random.Generator], Image.Image]
Eraser = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class TrainTransform:
    """Picklable (for grain worker processes) train-time preprocessing of one example: the style's
    crop and flip, then the `policy` (RandAugment, TrivialAugment) and random `erase`, in timm's
    order. `draft=False` decodes JPEGs in full (the loader benchmark's "before")."""

    def __init__(
        self,
        style: str,
        size: int,
        channels: int,
        policy: Policy | None = None,
        erase: Eraser | None = None,
        draft: bool = True,
    ):
        self.style, self.size, self.channels = style, size, channels
        self.policy, self.erase, self.draft = policy, erase, draft

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        if self.style == "imagenet":  # PIL from the decoder to the policy: no numpy round trip
            crop = random_resized_crop_and_flip(example["image"], rng, self.size, self.channels, self.draft)
            image = pixels(crop if self.policy is None else self.policy(crop, rng), self.channels)
        else:
            image = resize_shorter_and_center_crop(as_array(example["image"], self.channels), self.size)
            if self.style == "cifar":
                image = random_flip(random_shift(image, rng, pad=max(1, self.size // 8)), rng)
            elif self.style == "shift":
                image = random_shift(image, rng, pad=max(1, self.size // 8))
            if self.policy is not None:
                image = pixels(self.policy(open_image(np.ascontiguousarray(image)), rng), self.channels)
        if self.erase is not None:
            image = self.erase(image, rng)
        return {**example, "image": np.ascontiguousarray(image)}


class EvalTransform:
    """Deterministic eval preprocessing: shorter side to size / crop, center crop (torchvision's
    pixels exactly: files are decoded in full)."""

    def __init__(self, size: int, channels: int, crop: float = 1.0):
        self.size, self.channels, self.crop = size, channels, crop

    def __call__(self, example: Example) -> Example:
        image = as_array(example["image"], self.channels)
        return {**example, "image": resize_shorter_and_center_crop(image, self.size, self.crop)}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The config's preprocessing in one object (`from_config`): the train augmentation's style,
    policy and erasing, and the eval resize and crop. A new knob is a field here, read by the
    transforms it makes; `data.assemble` passes it on unchanged."""

    style: str = "auto"  # one of AUGMENTATIONS
    auto_augment: str = "none"  # autoaugment.POLICIES
    random_erase_prob: float = 0.0
    eval_image_size: int = 0  # 0: the train image_size
    eval_crop_pct: float = 0.0  # 0: IMAGENET_EVAL_CROP for ImageNet-style data, else 1
    loader: str = "grain"  # dali.LOADERS: who decodes

    @classmethod
    def from_config(cls, config: Any) -> Preprocessing:
        return cls(
            style=config.augment,
            auto_augment=config.auto_augment,
            random_erase_prob=config.random_erase_prob,
            eval_image_size=config.eval_image_size,
            eval_crop_pct=config.eval_crop_pct,
            loader=config.loader,
        )

    def train_transform(
        self, style: str, size: int, channels: int, stats: tuple[Any, Any], draft: bool = True
    ) -> TrainTransform:
        """The train transform for data resolved to `style`, with its (mean, std): the policy fills
        with the mean colour, erasing draws noise of the statistics."""
        mean, std = stats
        policy = autoaugment.create_policy(self.auto_augment, fill=[round(m) for m in mean])
        erase = None
        if self.random_erase_prob > 0:
            erase = autoaugment.RandomErasing(self.random_erase_prob, mean, std)
        return TrainTransform(style, size, channels, policy, erase, draft)
