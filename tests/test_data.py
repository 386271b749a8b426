import numpy as np
import pytest

from resnet_jax import data, sources


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(image_size=8)


def test_digits_split_is_fixed_stratified_and_uint8(digits):
    info = digits.info
    assert (info.num_train, info.num_eval, info.num_classes) == (1437, 360, 10)
    ex = digits.train_source[0]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (8, 8, 1)
    labels = np.array([digits.eval_source[i]["label"] for i in range(360)])
    assert np.bincount(labels).min() >= 35  # every class in the test split
    again = data.load_digits(image_size=8)
    np.testing.assert_array_equal(again.eval_source.images, digits.eval_source.images)


def test_digits_resize_to_the_configured_size():
    ds = data.load_digits(image_size=16)
    assert ds.info.image_shape == (16, 16, 1) and ds.train_source[3]["image"].shape == (16, 16, 1)


@pytest.mark.parametrize(
    "spec,parsed",
    [
        ("digits", ("digits", "")),
        ("synthetic", ("synthetic", "")),
        ("tfds:cifar10", ("tfds", "cifar10")),
        ("tfds:imagenette/320px-v2", ("tfds", "imagenette/320px-v2")),
        ("folder:/x", ("folder", "/x")),
        ("folder:/data/a:b", ("folder", "/data/a:b")),
    ],
)
def test_valid_specs_parse_into_kind_and_argument(spec, parsed):
    assert data.parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["mnist", "tfds:", "folder:", "", "digits:8"])
def test_bad_specs_name_the_valid_forms(spec):
    with pytest.raises(ValueError, match="tfds:NAME"):
        data.parse_spec(spec)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_order_is_deterministic_and_reshuffled_each_epoch(digits):
    a = take(data.train_loader(digits, global_batch_size=479, seed=3), 6)
    b = take(data.train_loader(digits, global_batch_size=479, seed=3), 6)
    c = take(data.train_loader(digits, global_batch_size=479, seed=4), 1)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    # 479 * 3 = 1437: batches 0-2 are epoch 1, 3-5 epoch 2; each epoch is a permutation of the split.
    for epoch in (a[:3], a[3:]):
        labels = np.concatenate([batch["label"] for batch in epoch])
        assert np.array_equal(np.bincount(labels), np.bincount(digits.train_source.labels))
    assert not np.array_equal(a[0]["label"], a[3]["label"])


def test_two_processes_read_disjoint_halves_of_each_global_batch(digits):
    # Labels alone are not unique; tag each example with its index to compare identities.
    tagged = data.Dataset(
        digits.info,
        sources.ArraySource(np.arange(1437, dtype=np.int64)[:, None, None, None], np.arange(1437)),
        digits.eval_source,
        lambda example, rng: example,
        lambda example: example,
    )
    whole = take(data.train_loader(tagged, global_batch_size=64, seed=0), 5)
    parts = [
        take(data.train_loader(tagged, global_batch_size=64, seed=0, process_index=p, process_count=2), 5)
        for p in range(2)
    ]
    for step in range(5):
        p0, p1 = parts[0][step]["label"], parts[1][step]["label"]
        assert len(p0) == len(p1) == 32 and not set(p0) & set(p1)
        assert set(p0) | set(p1) == set(whole[step]["label"])


@pytest.mark.parametrize("batch,processes", [(40, 1), (64, 1), (360, 1), (64, 2), (48, 4)])
def test_padded_eval_counts_every_example_exactly_once(digits, batch, processes):
    seen = []
    for p in range(processes):
        for b in data.eval_batches(digits, global_batch_size=batch, process_index=p, process_count=processes):
            assert len(b["label"]) == batch // processes
            seen.extend(zip(b["mask"], b["label"], strict=False))
    real = [label for mask, label in seen if mask == 1]
    assert len(real) == 360
    assert np.array_equal(np.bincount(real), np.bincount(digits.eval_source.labels))


def test_augmentation_keeps_shape_dtype_and_range(digits):
    batch = next(data.train_loader(digits, global_batch_size=64, seed=0))
    assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0 and batch["label"].max() <= 9


def test_synthetic_is_a_pure_function_of_the_index():
    ds = data.load_synthetic(16)
    np.testing.assert_array_equal(ds.train_source[5]["image"], ds.train_source[5]["image"])
    assert not np.array_equal(ds.train_source[5]["image"], ds.train_source[6]["image"])
    assert ds.info.num_classes == 1000 and ds.train_source[0]["image"].shape == (16, 16, 3)


def test_augmentation_does_not_depend_on_the_number_of_processes(digits):
    whole = take(data.train_loader(digits, global_batch_size=64, seed=0), 3)
    for p in range(2):
        part = take(
            data.train_loader(digits, global_batch_size=64, seed=0, process_index=p, process_count=2), 3
        )
        for step in range(3):
            np.testing.assert_array_equal(part[step]["image"], whole[step]["image"][p::2])
