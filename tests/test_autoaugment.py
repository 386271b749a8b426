"""RandAugment, TrivialAugment and random erasing: each operation against an independent numpy
definition (torchvision's and timm's conventions), the magnitude tables against their formulas, and
the policies' randomness."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from resnet_jax import augment, autoaugment
from resnet_jax.errors import ConfigError

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
PIL_IMAGE = Image.fromarray(IMAGE)
FLOAT = IMAGE.astype(np.float64)


def shifted(image, dx=0, dy=0):
    """The content moved right by dx and down by dy, black where nothing moved in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def as_array(image):
    return np.asarray(image).astype(np.int64)


# ---------------------------------------------------------------- operations


def test_pixel_operations_match_their_definitions():
    np.testing.assert_array_equal(
        as_array(autoaugment.solarize(PIL_IMAGE, 100)), np.where(IMAGE >= 100, 255 - FLOAT, FLOAT)
    )
    np.testing.assert_array_equal(as_array(autoaugment.posterize(PIL_IMAGE, 3)), IMAGE & 0b11100000)
    np.testing.assert_array_equal(as_array(autoaugment.posterize(PIL_IMAGE, 8)), IMAGE)
    np.testing.assert_array_equal(
        as_array(autoaugment.solarize_add(PIL_IMAGE, 60)),
        np.where(IMAGE < 128, np.minimum(255, FLOAT + 60), FLOAT),
    )
    invert = autoaugment.apply_rand_op("Invert", PIL_IMAGE, 0, Image.BILINEAR, (0, 0, 0))
    np.testing.assert_array_equal(as_array(invert), 255 - FLOAT)


def test_colour_operations_blend_toward_black_grey_and_greyscale_like_pil_documents():
    gray = np.asarray(PIL_IMAGE.convert("L")).astype(np.float64)[..., None]
    mean = int(gray.mean() + 0.5)
    expected = {
        "brightness": FLOAT * 1.5,
        "contrast": mean + 0.3 * (FLOAT - mean),
        "color": gray + 0.3 * (FLOAT - gray),
    }
    factors = {"brightness": 1.5, "contrast": 0.3, "color": 0.3}
    for name, want in expected.items():
        got = as_array(getattr(autoaugment, name)(PIL_IMAGE, factors[name]))
        assert np.abs(got - np.clip(np.round(want), 0, 255)).max() <= 1, name
    np.testing.assert_array_equal(as_array(autoaugment.sharpness(PIL_IMAGE, 1.0)), IMAGE)
    assert as_array(autoaugment.brightness(PIL_IMAGE, 0.0)).max() == 0


def test_autocontrast_stretches_each_channel_and_equalize_keeps_the_order_of_values():
    narrow = Image.fromarray((50 + IMAGE // 3).astype(np.uint8))
    stretched = as_array(autoaugment.apply_trivial_op("AutoContrast", narrow, 0))
    assert stretched.reshape(-1, 3).min(0).tolist() == [0, 0, 0]
    assert stretched.reshape(-1, 3).max(0).tolist() == [255, 255, 255]
    narrow = Image.fromarray(np.random.default_rng(1).integers(50, 136, (64, 64, 3), dtype=np.uint8))
    equalized = as_array(autoaugment.apply_trivial_op("Equalize", narrow, 0))
    for channel in range(3):  # PIL's (and torchvision's) histogram equalisation, written out
        values = np.asarray(narrow)[..., channel]
        histogram = np.bincount(values.ravel(), minlength=256)
        step = (histogram.sum() - histogram[np.nonzero(histogram)[0][-1]]) // 255
        assert step > 0  # (PIL leaves the image as it is otherwise)
        lut = np.minimum(255, (step // 2 + np.concatenate([[0], np.cumsum(histogram)[:-1]])) // step)
        np.testing.assert_array_equal(equalized[..., channel], lut[values])


def test_geometric_operations_follow_torchvisions_conventions():
    # torchvision's TranslateX by +m moves the content right by m pixels; Y moves it down.
    np.testing.assert_array_equal(
        as_array(autoaugment.apply_trivial_op("TranslateX", PIL_IMAGE, 5)), shifted(IMAGE, dx=5)
    )
    np.testing.assert_array_equal(
        as_array(autoaugment.apply_trivial_op("TranslateY", PIL_IMAGE, -3)), shifted(IMAGE, dy=-3)
    )
    square = IMAGE[:, :12]
    rotated = autoaugment.apply_trivial_op("Rotate", Image.fromarray(square), 90)
    np.testing.assert_array_equal(np.asarray(rotated), np.rot90(square))  # counter-clockwise
    # Shear about the top-left corner, nearest-neighbour: output (x, y) samples input x + f y.
    factor = 0.5
    ys, xs = np.mgrid[0:12, 0:16]
    source_x = np.floor(xs + 0.5 + factor * (ys + 0.5)).astype(int)
    inside = (source_x >= 0) & (source_x < 16)
    expected = np.where(inside[..., None], IMAGE[ys, np.clip(source_x, 0, 15)], 0)
    np.testing.assert_array_equal(
        as_array(autoaugment.apply_trivial_op("ShearX", PIL_IMAGE, factor)), expected
    )
    expected_y = np.swapaxes(
        np.asarray(autoaugment.shear_x(Image.fromarray(np.swapaxes(IMAGE, 0, 1).copy()), factor)), 0, 1
    )
    np.testing.assert_array_equal(
        as_array(autoaugment.apply_trivial_op("ShearY", PIL_IMAGE, factor)), expected_y
    )


def test_posterize_to_zero_bits_is_black():
    assert as_array(autoaugment.posterize(PIL_IMAGE, 0)).max() == 0


def test_randaugment_fills_with_the_dataset_mean_and_handles_greyscale():
    out = autoaugment.apply_rand_op("TranslateXRel", PIL_IMAGE, 0.5, Image.BILINEAR, (124, 116, 104))
    np.testing.assert_array_equal(np.asarray(out)[:, -1], np.tile([124, 116, 104], (12, 1)))
    gray = Image.fromarray(IMAGE[..., 0])
    for name in autoaugment.RAND_INCREASING_OPS:
        result = autoaugment.apply_rand_op(
            name, gray, autoaugment.rand_op_argument(name, 5, RNG), Image.BICUBIC, (9,)
        )
        assert result.mode == "L" and result.size == gray.size, name


# ---------------------------------------------------------------- magnitudes


def test_trivialaugment_bins_are_torchvisions():
    space = autoaugment.trivial_magnitudes()
    assert list(space) == [
        "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
        "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
    ]  # fmt: skip
    posterize = space["Posterize"][0]
    assert posterize.tolist()[:9] == [8, 8, 8, 7, 7, 7, 7, 7, 6] and posterize[-1] == 2
    assert space["Solarize"][0][1] == pytest.approx(246.5) and space["Rotate"][0][-1] == 135.0
    assert space["TranslateX"][0][-1] == 32.0 and space["ShearX"][0][-1] == pytest.approx(0.99)
    signed = {name for name, (_, is_signed) in space.items() if is_signed}
    assert signed == {
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
        "Brightness",
        "Color",
        "Contrast",
        "Sharpness",
    }


@pytest.mark.parametrize(
    "name, level, allowed",
    [
        ("Rotate", 9, {27.0, -27.0}),
        ("ShearX", 10, {0.3, -0.3}),
        ("TranslateYRel", 10, {0.45, -0.45}),
        ("Color", 5, {1.0}),
        ("Sharpness", 10, {1.9}),
        ("ColorIncreasing", 10, {0.1, 1.9}),
        ("ContrastIncreasing", 0, {1.0}),
        ("Posterize", 10, {4}),
        ("PosterizeIncreasing", 0, {4}),
        ("PosterizeIncreasing", 10, {0}),
        ("Solarize", 10, {256}),
        ("SolarizeIncreasing", 10, {0}),
        ("SolarizeAdd", 10, {110}),
    ],
)
def test_randaugment_levels_map_to_timms_arguments(name, level, allowed):
    values = {
        round(autoaugment.rand_op_argument(name, level, np.random.default_rng(s)), 6) for s in range(20)
    }
    assert values == allowed


def test_timm_strings_parse_and_bad_ones_name_the_value():
    policy = autoaugment.create_policy("rand-m7-n3-mstd0.5-inc1-mmax10-p0.7", fill=(1, 2, 3))
    assert (policy.magnitude, policy.num_ops, policy.magnitude_std, policy.prob) == (7, 3, 0.5, 0.7)
    assert policy.names == autoaugment.RAND_INCREASING_OPS and policy.fill == (1, 2, 3)
    default = autoaugment.create_policy("randaugment", fill=(0, 0, 0))
    assert (default.magnitude, default.num_ops, default.magnitude_std) == (9, 2, 0.5)
    assert default.names == autoaugment.RAND_OPS
    assert isinstance(autoaugment.create_policy("trivialaugment", (0, 0, 0)), autoaugment.TrivialAugment)
    assert autoaugment.create_policy("none", (0, 0, 0)) is None
    for bad, fragment in [
        ("rand-x9", "'x9'"),
        ("rand-n2", "needs a magnitude"),
        ("autoaugment", "is not a policy"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            autoaugment.create_policy(bad, (0, 0, 0))


# ---------------------------------------------------------------- policies


def test_policies_are_seeded_and_trivialaugment_draws_every_operation(monkeypatch):
    for policy in (autoaugment.TrivialAugment(), autoaugment.create_policy("rand-m9-mstd0.5", (0, 0, 0))):
        for seed in range(5):
            a = np.asarray(policy(PIL_IMAGE, np.random.default_rng(seed)))
            b = np.asarray(policy(PIL_IMAGE, np.random.default_rng(seed)))
            np.testing.assert_array_equal(a, b)
    used = Counter()
    original = autoaugment.apply_trivial_op
    monkeypatch.setattr(
        autoaugment, "apply_trivial_op", lambda n, i, m: used.update([n]) or original(n, i, m)
    )
    policy = autoaugment.TrivialAugment()
    for seed in range(700):
        policy(PIL_IMAGE, np.random.default_rng(seed))
    assert set(used) == set(autoaugment.trivial_magnitudes()) and min(used.values()) > 25  # ~50 each


def test_randaugment_applies_each_op_with_its_probability_and_magnitude_noise(monkeypatch):
    calls = []
    monkeypatch.setattr(autoaugment, "rand_op_argument", lambda name, level, rng: calls.append(level) or 0.0)
    policy = autoaugment.RandAugment(magnitude=9, num_ops=2, magnitude_std=0.5, prob=0.5)
    for seed in range(500):
        policy(PIL_IMAGE, np.random.default_rng(seed))
    assert 400 < len(calls) < 600  # 1000 draws, half applied
    assert abs(np.mean(calls) - 9) < 0.1 and 0.4 < np.std(calls) < 0.6 and max(calls) <= 10
    calls.clear()
    never = autoaugment.RandAugment(prob=0.0)
    np.testing.assert_array_equal(np.asarray(never(PIL_IMAGE, np.random.default_rng(0))), IMAGE)
    assert calls == []


def test_random_erasing_replaces_one_box_by_noise_with_the_dataset_statistics():
    image = np.full((64, 64, 3), 7, np.uint8)
    eraser = autoaugment.RandomErasing(1.0, mean=(120, 110, 100), std=(30, 20, 10))
    areas = []
    for seed in range(40):
        out = eraser(image, np.random.default_rng(seed))
        changed = np.any(out != image, axis=-1)
        rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        areas.append(h * w / 64**2)
        assert 0.3 / 1.1 < h / w < 1.1 / 0.3
        box = out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].reshape(-1, 3).astype(float)
        if len(box) > 300:  # the noise: mean and std of the data, within 5 standard errors
            assert np.all(
                np.abs(box.mean(0) - (120, 110, 100)) < 5 * np.array([30, 20, 10]) / len(box) ** 0.5
            )
            assert np.allclose(box.std(0), (30, 20, 10), rtol=0.25)
        np.testing.assert_array_equal(out[~changed], image[~changed])  # outside the box: untouched
    assert min(areas) > 0.015 and max(areas) < 1 / 3 + 0.02
    np.testing.assert_array_equal(autoaugment.RandomErasing(0.0, (0,) * 3, (1,) * 3)(image, RNG), image)


def test_train_transform_runs_policy_then_erasing_in_uint8_for_rgb_and_greyscale():
    eraser = autoaugment.RandomErasing(1.0, mean=(128,) * 3, std=(40,) * 3)
    outputs = {}
    for channels in (3, 1):
        transform = augment.TrainTransform(
            "imagenet", 24, channels, policy=autoaugment.TrivialAugment(), erase=eraser
        )
        example = {"image": IMAGE if channels == 3 else IMAGE[..., :1], "label": 3}
        outputs[channels] = transform(example, np.random.default_rng(4))["image"]
        again = transform(example, np.random.default_rng(4))["image"]
        assert outputs[channels].shape == (24, 24, channels) and outputs[channels].dtype == np.uint8
        np.testing.assert_array_equal(outputs[channels], again)
    plain = augment.TrainTransform("imagenet", 24, 3)({"image": IMAGE}, np.random.default_rng(4))["image"]
    assert np.any(plain != outputs[3])
