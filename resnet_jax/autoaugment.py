"""Augmentation policies on uint8 host images: RandAugment, TrivialAugment and random erasing.

The operations are PIL's, as in torchvision and timm, so that a policy here means what it means
there. TrivialAugment is torchvision's `TrivialAugmentWide` (31 magnitude bins, nearest-neighbour
resampling, black fill). RandAugment follows timm's `rand-m9-mstd0.5[-inc1]` strings: timm's
operation list, magnitude scale (0-10), per-use magnitude noise and probability 0.5 per operation,
bilinear or bicubic resampling at random, and fill with the dataset mean. Random erasing is timm's
`RandomErasing(mode="pixel")`, but in uint8: the noise is the dataset's mean + std x N(0, 1),
rounded and clipped to 0..255, which is timm's N(0, 1) in normalised units up to that clipping.

Every random draw comes from the example's `np.random.Generator`, so a resumed run repeats it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from resnet_jax.errors import ConfigError

POLICIES = ("none", "randaugment", "trivialaugment", "rand-mM[-nN][-mstdS][-mmaxX][-inc1]")
RANDAUGMENT_DEFAULT = "rand-m9-mstd0.5"  # `randaugment` alone; timm's ImageNet default
Op = Callable[[Image.Image, float, np.random.Generator], Image.Image]

# ---------------------------------------------------------------- operations (PIL)


def _fill(image: Image.Image, fill: Sequence[int]) -> int | tuple[int, ...]:
    return fill[0] if image.mode == "L" else tuple(fill)


def affine(image: Image.Image, matrix: tuple[float, ...], resample: int, fill: Sequence[int]) -> Image.Image:
    """Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f)."""
    return image.transform(image.size, Image.AFFINE, matrix, resample, fillcolor=_fill(image, fill))


def shear_x(image, factor, resample=Image.NEAREST, fill=(0, 0, 0)):
    return affine(image, (1, factor, 0, 0, 1, 0), resample, fill)


def shear_y(image, factor, resample=Image.NEAREST, fill=(0, 0, 0)):
    return affine(image, (1, 0, 0, factor, 1, 0), resample, fill)


def translate_x(image, pixels, resample=Image.NEAREST, fill=(0, 0, 0)):
    return affine(image, (1, 0, pixels, 0, 1, 0), resample, fill)


def translate_y(image, pixels, resample=Image.NEAREST, fill=(0, 0, 0)):
    return affine(image, (1, 0, 0, 0, 1, pixels), resample, fill)


def rotate(image, degrees, resample=Image.NEAREST, fill=(0, 0, 0)):
    return image.rotate(degrees, resample=resample, fillcolor=_fill(image, fill))


def posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` high bits; 0 bits is black (Pillow >= 12 refuses 0, which timm can ask for)."""
    if bits >= 8:
        return image
    return (
        ImageOps.posterize(image, int(bits)) if bits > 0 else image.point([0] * 256 * len(image.getbands()))
    )


def solarize(image: Image.Image, threshold: float) -> Image.Image:
    """Invert every pixel >= threshold (PIL's rule, and torchvision's)."""
    return ImageOps.solarize(image, threshold)


def solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """timm's SolarizeAdd: brighten pixels below the threshold by `add`."""
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, factor: kind(image).enhance(factor)


brightness, color, contrast, sharpness = map(
    enhance, (ImageEnhance.Brightness, ImageEnhance.Color, ImageEnhance.Contrast, ImageEnhance.Sharpness)
)
ENHANCE = {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness}

# ---------------------------------------------------------------- TrivialAugment (torchvision)

TRIVIAL_BINS = 31


def trivial_magnitudes(bins: int = TRIVIAL_BINS) -> dict[str, tuple[np.ndarray, bool]]:
    """torchvision's `TrivialAugmentWide._augmentation_space`: op -> (magnitude bins, signed)."""
    linear = lambda lo, hi: np.linspace(lo, hi, bins)
    return {
        "Identity": (np.zeros(1), False),
        "ShearX": (linear(0.0, 0.99), True),
        "ShearY": (linear(0.0, 0.99), True),
        "TranslateX": (linear(0.0, 32.0), True),
        "TranslateY": (linear(0.0, 32.0), True),
        "Rotate": (linear(0.0, 135.0), True),
        "Brightness": (linear(0.0, 0.99), True),
        "Color": (linear(0.0, 0.99), True),
        "Contrast": (linear(0.0, 0.99), True),
        "Sharpness": (linear(0.0, 0.99), True),
        "Posterize": (8 - np.round(np.arange(bins) / ((bins - 1) / 6)).astype(int), False),
        "Solarize": (linear(255.0, 0.0), False),
        "AutoContrast": (np.zeros(1), False),
        "Equalize": (np.zeros(1), False),
    }


def apply_trivial_op(name: str, image: Image.Image, magnitude: float) -> Image.Image:
    """torchvision's `_apply_op` with its defaults (nearest resampling, fill 0)."""
    if name == "ShearX":
        return shear_x(image, magnitude)  # torchvision: shear angle atan(magnitude)
    if name == "ShearY":
        return shear_y(image, magnitude)
    if name == "TranslateX":
        return translate_x(image, -int(magnitude))  # torchvision moves the content by +magnitude
    if name == "TranslateY":
        return translate_y(image, -int(magnitude))
    if name == "Rotate":
        return rotate(image, magnitude)
    if name in ENHANCE:
        return ENHANCE[name](image, 1.0 + magnitude)
    if name == "Posterize":
        return posterize(image, int(magnitude))
    if name == "Solarize":
        return solarize(image, magnitude)
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    return image  # Identity


class TrivialAugment:
    """One operation, uniformly chosen, at a uniformly chosen magnitude bin with a random sign."""

    def __init__(self, bins: int = TRIVIAL_BINS):
        self.space = trivial_magnitudes(bins)
        self.names = tuple(self.space)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        name = self.names[int(rng.integers(len(self.names)))]
        magnitudes, signed = self.space[name]
        magnitude = float(magnitudes[int(rng.integers(len(magnitudes)))]) if len(magnitudes) > 1 else 0.0
        if signed and rng.integers(2):
            magnitude = -magnitude
        return apply_trivial_op(name, image, magnitude)


# ---------------------------------------------------------------- RandAugment (timm)

LEVEL_MAX = 10.0  # timm's _LEVEL_DENOM: magnitudes run 0..10
TRANSLATE_FRACTION = 0.45  # timm's translate_pct for the *Rel translations
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# timm's `inc1` list: the same operations with strength that grows with the magnitude.
RAND_INCREASING_OPS = tuple(
    f"{name}Increasing"
    if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    else name
    for name in RAND_OPS
)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def rand_op_argument(name: str, level: float, rng: np.random.Generator) -> float:
    """timm's `*_level_to_arg` functions: a level in [0, 10] -> the operation's argument."""
    fraction = level / LEVEL_MAX
    if name == "Rotate":
        return _signed(fraction * 30.0, rng)
    if name in ("ShearX", "ShearY"):
        return _signed(fraction * 0.3, rng)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(fraction * TRANSLATE_FRACTION, rng)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return fraction * 1.8 + 0.1
    if name.endswith("Increasing") and name[: -len("Increasing")] in (
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
    ):
        return max(0.1, 1.0 + _signed(fraction * 0.9, rng))
    if name == "Posterize":
        return int(fraction * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(fraction * 4)
    if name == "Solarize":
        return min(256, int(fraction * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(fraction * 256))
    if name == "SolarizeAdd":
        return min(128, int(fraction * 110))
    return 0.0  # AutoContrast, Equalize, Invert


def apply_rand_op(
    name: str, image: Image.Image, argument: float, resample: int, fill: Sequence[int]
) -> Image.Image:
    base = name.removesuffix("Increasing")
    if base == "Rotate":
        return rotate(image, argument, resample, fill)
    if base == "ShearX":
        return shear_x(image, argument, resample, fill)
    if base == "ShearY":
        return shear_y(image, argument, resample, fill)
    if base == "TranslateXRel":
        return translate_x(image, argument * image.size[0], resample, fill)
    if base == "TranslateYRel":
        return translate_y(image, argument * image.size[1], resample, fill)
    if base in ENHANCE:
        return ENHANCE[base](image, argument)
    if base == "Posterize":
        return posterize(image, int(argument))
    if base == "Solarize":
        return solarize(image, argument)
    if base == "SolarizeAdd":
        return solarize_add(image, int(argument))
    if base == "AutoContrast":
        return ImageOps.autocontrast(image)
    if base == "Equalize":
        return ImageOps.equalize(image)
    return ImageOps.invert(image)  # Invert


class RandAugment:
    """timm's RandAugment: `num_ops` operations drawn with replacement, each applied with probability
    `prob` at magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max]."""

    def __init__(
        self,
        magnitude: float = 9.0,
        num_ops: int = 2,
        magnitude_std: float = 0.5,
        magnitude_max: float = LEVEL_MAX,
        increasing: bool = False,
        prob: float = 0.5,
        fill: Sequence[int] = (124, 116, 104),
    ):
        self.magnitude, self.num_ops, self.magnitude_std = magnitude, num_ops, magnitude_std
        self.magnitude_max, self.prob, self.fill = magnitude_max, prob, tuple(int(v) for v in fill)
        self.names = RAND_INCREASING_OPS if increasing else RAND_OPS

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for index in rng.integers(len(self.names), size=self.num_ops):
            if rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std == math.inf:
                level = rng.uniform(0, level)
            elif self.magnitude_std > 0:
                level = rng.normal(level, self.magnitude_std)
            level = min(max(0.0, level), self.magnitude_max)
            name = self.names[int(index)]
            resample = Image.BICUBIC if rng.random() < 0.5 else Image.BILINEAR
            image = apply_rand_op(name, image, rand_op_argument(name, level, rng), resample, self.fill)
        return image


def randaugment_settings(spec: str) -> dict[str, Any]:
    """RandAugment's arguments from a timm string, e.g. `rand-m9-mstd0.5-inc1`: m magnitude, n ops,
    mstd noise, mmax cap, inc1 the increasing operation list, p probability per operation."""
    parts = spec.split("-")
    options: dict[str, float] = {}
    pattern = re.compile(r"^(mstd|mmax|inc|m|n|p)(inf|[0-9.]+)$")
    for part in parts[1:]:
        match = pattern.match(part)
        if parts[0] != "rand" or match is None:
            raise ConfigError(
                f"config.auto_augment={spec!r}: cannot read {part if parts[0] == 'rand' else parts[0]!r}; "
                f"expected timm's form rand-m9-mstd0.5 (m magnitude 0-10, n ops, mstd magnitude noise, "
                f"mmax cap, inc1 increasing ops, p probability per op)"
            )
        options[match.group(1)] = float(match.group(2))
    if parts[0] != "rand" or "m" not in options:
        raise ConfigError(f"config.auto_augment={spec!r} needs a magnitude, e.g. rand-m9-mstd0.5")
    return dict(
        magnitude=options["m"],
        num_ops=int(options.get("n", 2)),
        magnitude_std=options.get("mstd", 0.0),
        magnitude_max=options.get("mmax", LEVEL_MAX),
        increasing=bool(options.get("inc", 0)),
        prob=options.get("p", 0.5),
    )


def policy_settings(spec: str) -> tuple[str, dict[str, Any]]:
    """`config.auto_augment` read, nothing built: ("none" | "trivialaugment" | "randaugment",
    RandAugment's arguments); `ConfigError` naming the valid forms when unreadable."""
    if spec in ("none", "trivialaugment"):
        return spec, {}
    if spec == "randaugment":
        spec = RANDAUGMENT_DEFAULT
    if spec.startswith("rand-"):
        return "randaugment", randaugment_settings(spec)
    raise ConfigError(f"config.auto_augment={spec!r} is not a policy; use one of: {', '.join(POLICIES)}")


def create_policy(
    spec: str, fill: Sequence[int]
) -> Callable[[Image.Image, np.random.Generator], Image.Image] | None:
    """`config.auto_augment` -> a policy (PIL image, rng) -> PIL image, or None for `none`."""
    kind, settings = policy_settings(spec)
    if kind == "none":
        return None
    if kind == "trivialaugment":
        return TrivialAugment()
    return RandAugment(**settings, fill=fill)


# ---------------------------------------------------------------- random erasing (timm)


class RandomErasing:
    """With probability `prob`, replace one box of 2-33 % of the image (aspect 0.3-3.3) by noise."""

    def __init__(
        self,
        prob: float,
        mean: Sequence[float],
        std: Sequence[float],
        area: tuple[float, float] = (0.02, 1 / 3),
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
    ):
        self.prob, self.area = prob, area
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.prob:
            return image
        height, width, channels = image.shape
        for _ in range(10):
            target = rng.uniform(*self.area) * height * width
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                noise = self.mean[:channels] + self.std[:channels] * rng.standard_normal(
                    (h, w, channels), np.float32
                )
                image = image.copy()
                image[top : top + h, left : left + w] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
                return image
        return image
