"""Image decoding, resizing and augmentation on the host, in uint8 (HWC numpy arrays).

Train transforms take `(example, rng)` with grain's per-example generator, so
augmentation is a pure function of the seed and the example's position: a
resumed run sees exactly the same crops and flips.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

AUGMENTATIONS = ("auto", "cifar", "imagenet", "shift", "none")
IMAGENET_EVAL_CROP = 0.875  # resize to size / 0.875 (256 for 224), then center-crop
Example = dict[str, Any]  # one image and its label (and flags), as the sources and loaders pass it


def decode_image(source: str | bytes, channels: int = 3) -> np.ndarray:
    """A file path or encoded bytes -> uint8 HWC with `channels` (grayscale, palette, RGBA converted)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[..., None] if channels == 1 else array


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


def resize_shorter_and_center_crop(image: np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """The standard eval preprocessing: shorter side to size / crop, then the central size x size.

    Sizes and offsets are torchvision's (`Resize` truncates the longer side, `CenterCrop` rounds the
    offset half to even), so that imported torchvision/timm weights see the same pixels.
    """
    h, w = image.shape[:2]
    short = round(size / crop)
    if h <= w:
        new_h, new_w = short, max(short, int(w * short / h))
    else:
        new_h, new_w = max(short, int(h * short / w)), short
    image = resize(image, new_h, new_w)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return image[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_shift(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Pad with zeros by `pad` and take a random crop of the original size (a translation)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    return padded[dy : dy + h, dx : dx + w]


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: a random area fraction and aspect ratio, resized to size x size."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= w and 0 < crop_h <= h:
            top = int(rng.integers(0, h - crop_h + 1))
            left = int(rng.integers(0, w - crop_w + 1))
            return resize(image[top : top + crop_h, left : left + crop_w], size, size)
    # Fallback: the largest central crop within the ratio bounds.
    aspect = min(max(w / h, ratio[0]), ratio[1])
    crop_w, crop_h = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    crop_h, crop_w = min(crop_h, h), min(crop_w, w)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return resize(image[top : top + crop_h, left : left + crop_w], size, size)


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


class TrainTransform:
    """Picklable (for grain worker processes) train-time preprocessing of one example."""

    def __init__(self, style: str, size: int, channels: int):
        self.style, self.size, self.channels = style, size, channels

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        image = match_channels(example["image"], self.channels)
        if self.style == "imagenet":
            image = random_flip(random_resized_crop(image, rng, self.size), rng)
        else:
            image = resize_shorter_and_center_crop(image, self.size)
            if self.style == "cifar":
                image = random_flip(random_shift(image, rng, pad=max(1, self.size // 8)), rng)
            elif self.style == "shift":
                image = random_shift(image, rng, pad=max(1, self.size // 8))
        return {**example, "image": np.ascontiguousarray(image)}


class EvalTransform:
    """Deterministic eval preprocessing: shorter side to size / crop, center crop."""

    def __init__(self, size: int, channels: int, crop: float = 1.0):
        self.size, self.channels, self.crop = size, channels, crop

    def __call__(self, example: Example) -> Example:
        image = match_channels(example["image"], self.channels)
        return {**example, "image": resize_shorter_and_center_crop(image, self.size, self.crop)}
