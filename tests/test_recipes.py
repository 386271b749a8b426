"""Training recipes: mixup/cutmix, EMA, stochastic depth, mixed precision, and the reference configs."""

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpoint, compiled_steps, data, mixing, models, optim, parallel, train
from resnet_jax import step as step_lib
from resnet_jax.config_checks import check_config
from resnet_jax.step import TrainState, rng_key, state_from_variables, train_step, update_loss_scale
from tests.conftest import digits_config, fixed_digits_batch, tiny_resnet


def fake_images(batch=6, size=8):
    """Example i is the constant image i, so that every output pixel tells where it came from."""
    return jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None, None], (batch, size, size, 3))


@pytest.mark.parametrize(
    "options",
    [
        dict(mixup_alpha=0.2),
        dict(cutmix_alpha=1.0),
        dict(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5),
        dict(mixup_alpha=0.4, prob=0.5),
    ],
)
def test_mixed_targets_keep_label_mass_one_and_match_the_pixels(options):
    images, labels = fake_images(), jnp.arange(6)
    for seed in range(8):
        mixed, targets, lam = mixing.mix_batch(
            jax.random.key(seed), images, labels, 10, mixing.Mixing(**options)
        )
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        assert 0.0 <= float(lam) <= 1.0
        # Example i mixes with example 5 - i: its target weight on its own label is lam, and the
        # share of its pixels (mixup: the value) that come from itself is lam as well.
        np.testing.assert_allclose(targets[jnp.arange(6), labels], lam, rtol=1e-6)
        if bool(jnp.any(jnp.abs(mixed - jnp.round(mixed)) > 1e-6)):  # mixup: lam * i + (1 - lam) * (5 - i)
            share = ((mixed - images[::-1]) / (images - images[::-1])).mean(axis=(1, 2, 3))
        else:  # cutmix (or not mixed): the share of the example's own pixels
            share = jnp.isclose(mixed, images).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(share, lam, atol=1e-5)


def test_cutmix_box_matches_its_corrected_lambda():
    for seed in range(20):
        mask, lam = mixing.cutmix_mask(jax.random.key(seed), jnp.float32(0.3), 16, 12)
        assert mask.shape == (16, 12)
        assert float(lam) == pytest.approx(1.0 - float(mask.mean()))
        rows, cols = np.nonzero(np.asarray(mask))
        if rows.size:  # a solid rectangle
            assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_mixing_off_returns_the_batch_and_one_hot_targets():
    images = fake_images()
    mixed, targets, lam = mixing.mix_batch(jax.random.key(0), images, jnp.arange(6), 10, mixing.Mixing())
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, jax.nn.one_hot(jnp.arange(6), 10))
    assert float(lam) == 1.0


@pytest.fixture(scope="module")
def tiny_setup():
    """A digits batch and the tiny ResNet's initial variables, shared: the compute dtype, dropout
    and stochastic depth leave the variables as they are, and init compiles slowly on a CPU."""
    info, batch = fixed_digits_batch(size=32)
    init = jax.jit(functools.partial(tiny_resnet().init, train=False))
    return info, batch, init(jax.random.key(0), jnp.zeros((1, *info.image_shape)))


def make_step(model, setup, config, **options):
    info, _, variables = setup
    tx, schedule = optim.create(config, steps_per_epoch=10, total_steps=10)
    state = state_from_variables(variables, tx, **options)
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, mean=info.mean, std=info.std)
    return state, step


def constant_sgd(**overrides):
    return digits_config(
        optimizer="momentum", learning_rate=0.05, warmup_epochs=0.0, lr_schedule="constant", **overrides
    )


def test_ema_moves_by_the_decay_formula_and_evaluation_uses_it(tiny_setup):
    _, batch, _ = tiny_setup
    state, step = make_step(tiny_resnet(), tiny_setup, constant_sgd(), ema=True)
    step = jax.jit(functools.partial(step, options=step_lib.StepOptions(ema_decay=0.9)))
    jax.tree.map(
        np.testing.assert_array_equal, state.ema, {"params": state.params, "batch_stats": state.batch_stats}
    )
    before = jax.device_get(state)
    for _ in range(2):
        previous = jax.device_get(state)
        state, _ = step(state, batch)
        expected = jax.tree.map(
            lambda old, new: 0.9 * old + 0.1 * new,
            previous.ema,
            {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)},
        )
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), state.ema, expected)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.ema["params"], before.params)
    assert max(jax.tree.leaves(moved)) > 0
    evaluated = state.for_eval()
    assert evaluated.params is state.ema["params"] and evaluated.batch_stats is state.ema["batch_stats"]
    plain = TrainState(state.step, state.params, state.batch_stats, state.opt_state)
    assert plain.for_eval() is plain


def test_compute_dtype_never_changes_the_parameter_tree():
    def tree(name, dtype):
        module = models.create(name, 10, dtype=dtype)
        shapes = jax.eval_shape(
            functools.partial(module.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
        return jax.tree.map(lambda x: (x.shape, x.dtype), shapes)

    for name in ("resnet20", "resnet50"):
        reference = tree(name, "float32")
        assert all(
            dtype == jnp.float32
            for _, dtype in jax.tree.leaves(reference, is_leaf=lambda x: isinstance(x, tuple))
        )
        for dtype in ("bfloat16", "float16"):
            assert tree(name, dtype) == reference


def run_steps(dtype, setup, steps=6):
    model = tiny_resnet(dtype=models.DTYPES[dtype])
    state, step = make_step(model, setup, constant_sgd(), loss_scale=2.0**15 if dtype == "float16" else 0.0)
    step, batch = jax.jit(step), setup[1]
    losses, collected = [], []
    for _ in range(steps):
        state, step_metrics = step(state, batch)
        collected.append(step_metrics.compute())
        losses.append(float(collected[-1]["loss"]))
    return state, np.array(losses), collected


@pytest.mark.accelerator
def test_bfloat16_and_float16_steps_track_float32(tiny_setup):
    _, reference, _ = run_steps("float32", tiny_setup)
    for dtype, tolerance in (("bfloat16", 0.05), ("float16", 0.01)):
        state, losses, collected = run_steps(dtype, tiny_setup)
        assert np.isfinite(losses).all()
        np.testing.assert_allclose(losses, reference, rtol=tolerance, err_msg=dtype)
        assert losses[-1] < losses[0]
        assert all(jnp.asarray(p).dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert float(collected[-1]["loss_scale"]) == 2.0**15  # float16: scale logged, no overflow here
    assert sum(int(c["nonfinite_steps"]) for c in collected) == 0


@pytest.mark.accelerator
def test_float16_loss_scaling_skips_overflows_and_recovers(tiny_setup):
    """Start at a scale that overflows float16's gradients (max 65504): those steps are skipped
    (params unchanged) and the scale halves until the steps go through and the loss falls."""
    _, batch, _ = tiny_setup
    model = tiny_resnet(dtype=jnp.float16)
    state, step = make_step(model, tiny_setup, constant_sgd(), loss_scale=2.0**30)
    step = jax.jit(functools.partial(step, options=step_lib.StepOptions(loss_scale_period=1000)))
    scales, skipped, losses = [], [], []
    for _ in range(24):
        before = jax.device_get(state.params)
        state, step_metrics = step(state, batch)
        result = step_metrics.compute()
        scales.append(float(result["loss_scale"]))
        skipped.append(int(result["nonfinite_steps"]))
        unchanged = all(jax.tree.leaves(jax.tree.map(np.array_equal, before, jax.device_get(state.params))))
        assert unchanged == bool(skipped[-1])
        losses.append(float(result["loss"]))
    assert skipped[0] == 1 and 1 <= sum(skipped) < 20
    first_good = skipped.index(0)
    assert scales[first_good] == 2.0**30 / 2**first_good  # halved once per overflow
    assert float(state.loss_scale["scale"]) == scales[-1] < 2.0**30
    assert losses[-1] < losses[first_good]
    assert int(state.step) == 24


def test_loss_scale_doubles_after_a_period_of_finite_steps():
    scale = {"scale": jnp.float32(8.0), "good_steps": jnp.int32(0)}
    for finite, expected in ((True, 8.0), (True, 8.0), (True, 16.0), (False, 8.0), (True, 8.0)):
        scale = update_loss_scale(scale, jnp.bool_(finite), period=3)
        assert float(scale["scale"]) == expected


def test_stochastic_depth_and_dropout_draw_from_the_seed_and_step(tiny_setup):
    """The step's randomness is a function of (seed, step): the same step repeats exactly (a resumed
    run retraces it), other steps draw other masks; without the rates nothing is random."""
    _, batch, _ = tiny_setup

    def first_losses(model, steps):
        state, step = make_step(model, tiny_setup, constant_sgd())
        step = jax.jit(step)
        return [float(step(state.replace(step=jnp.int32(s)), batch)[1].compute()["loss"]) for s in steps]

    regularised = first_losses(tiny_resnet(drop_path_rate=0.5, dropout_rate=0.5), [0, 0, 1, 2, 3])
    assert regularised[0] == regularised[1]
    assert len(set(regularised[1:])) > 1
    assert len(set(first_losses(tiny_resnet(), [0, 1, 2]))) == 1


def test_a_recipe_run_with_every_trick_resumes(tmp_path):
    """train_and_evaluate with mixup, cutmix, label smoothing, EMA, stochastic depth, dropout,
    float16 and a step schedule; then resume it: the EMA and the loss scale come back."""
    workdir = str(tmp_path)
    config = digits_config(
        model="resnet20",
        image_size=8,
        num_train_steps=6,
        batch_size=32,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        ema_decay=0.5,
        drop_path_rate=0.1,
        dropout_rate=0.1,
        dtype="float16",
        lr_schedule="step",
        lr_step_epochs=(0.1,),
        log_every_steps=2,
        checkpoint_every_steps=3,
    )
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 6 and state.ema and state.loss_scale
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert all(np.isfinite(r["train_loss"]) for r in train_rows)
    assert all("train_loss_scale" in r for r in train_rows)
    assert any("eval_accuracy" in r for r in rows)
    config.num_train_steps = 8
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 8
    config.ema_decay = 0.0
    with pytest.raises(checkpoint.CheckpointError, match="config.ema_decay changed from 0.5 to 0.0"):
        train.train_and_evaluate(config, workdir)


# name -> {step: learning rate} at the real dataset's steps per epoch (CIFAR-10: 50,000 train
# images; ImageNet: 1,281,167).
REFERENCE_CONFIGS = {
    "cifar10_resnet20": (50_000, {0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001}),
    "cifar10_resnet56": (50_000, {0: 0.1, 32_000: 0.01, 48_000: 0.001}),
    "cifar10_resnet110": (50_000, {0: 0.01, 399: 0.01, 400: 0.1, 32_000: 0.01, 48_000: 0.001}),
    "cifar10_resnet18": (50_000, {0: 0.1, 390 * 100: 0.05}),
    "imagenet_resnet50": (1_281_167, {0: 0.0, 1251 * 5: 0.4, 1251 * 5 + (1251 * 85) // 2: 0.2}),
    "imagenet_resnet50_lars": (1_281_167, {400 * 3: 9.0, 400 * 37: 1e-4}),
    "imagenet_resnet50_strong": (1_281_167, {0: 0.005, 1251 * 5: 0.5}),
    # ResNet strikes back: 625 steps per epoch at batch 2048; warmup from 1e-4 x lr, cosine to 1e-6.
    "imagenet_resnet50_rsb_a1": (1_281_167, {0: 5e-7, 625 * 5: 5e-3, 625 * 600: 1e-6}),
    "imagenet_resnet50_rsb_a2": (1_281_167, {0: 5e-7, 625 * 5: 5e-3, 625 * 300: 1e-6}),
    "imagenet_resnet50_rsb_a3": (1_281_167, {0: 8e-7, 625 * 5: 8e-3, 625 * 100: 1e-6}),
}


# One config per distinct train step (optimizer, mixing, EMA, dtype, label smoothing): the other
# CIFAR configs differ from cifar10_resnet20's only in the network and the schedule's constants.
RUN_STEPS = (
    "cifar10_resnet20",
    "imagenet_resnet50",
    "imagenet_resnet50_lars",
    "imagenet_resnet50_strong",
    "imagenet_resnet50_rsb_a1",
    "imagenet_resnet50_rsb_a2",
    "imagenet_resnet50_rsb_a3",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_config_builds_and_runs_with_its_schedule(name):
    """Each reference config: its checks pass, its schedule has the recipe's values at the real
    dataset's size, and (for each distinct train step, `RUN_STEPS`) its train step runs 3 steps on
    synthetic data. The network runs as ResNet-20 at 8 px there, to keep CPU compile times small;
    the architectures themselves are tested in test_models."""
    config = importlib.import_module(f"configs.{name}").get_config()
    check_config(config)
    num_train, expected = REFERENCE_CONFIGS[name]
    steps_per_epoch = num_train // config.batch_size
    total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    schedule = optim.create_schedule(config, steps_per_epoch, total)
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-4, abs=1e-7), (name, step)
    models.create(config.model, 10)  # the config's own network exists
    if name not in RUN_STEPS:
        return

    small = config.copy_and_resolve_references()
    small.dataset, small.batch_size, small.num_train_steps = "synthetic", 8, 3
    small.image_size, small.model = 8, "resnet20"
    dataset = data.load(small)
    steps = compiled_steps.CompiledSteps(small, dataset.info, parallel.create_mesh())
    state = steps.init(rng_key(0))
    assert bool(state.ema) == (config.ema_decay > 0)
    rng = np.random.default_rng(0)
    for step in range(3):
        batch = {
            "image": rng.integers(0, 256, (8, *dataset.info.image_shape), dtype=np.uint8),
            "label": rng.integers(0, dataset.info.num_classes, 8).astype(np.int32),
        }
        state, step_metrics = steps.train_step(state, parallel.to_global(batch, steps.batch_sharding))
        result = step_metrics.compute()
        assert np.isfinite(float(result["loss"]))
        assert float(result["learning_rate"]) == pytest.approx(float(steps.schedule(step)), rel=1e-6)
    assert int(state.step) == 3


def test_cifar_resnet18_is_the_common_cifar10_network():
    """kuangliu/pytorch-cifar's ResNet-18 (3x3 stem, no max-pool) has 11,173,962 parameters."""
    module = models.create("cifar_resnet18", 10)
    assert models.count_params(module, 32) == 11_173_962
    out = jax.eval_shape(
        functools.partial(module.init_with_output, train=False), jax.random.key(0), jnp.zeros((2, 32, 32, 3))
    )
    assert out[0].shape == (2, 10)


# ---------------------------------------------------------------- strong augmentation and BCE


def test_binary_cross_entropy_matches_timms_formula_with_smoothing_and_threshold():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = jnp.array([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0]])  # a mixed row and a one-hot row

    def reference(t):
        p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
        return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(-1)

    t = np.asarray(targets, np.float64)
    np.testing.assert_allclose(step_lib.binary_cross_entropy(logits, targets), reference(t), rtol=1e-6)
    smoothed = t * 0.9 + 0.1 / 3  # timm: on = 1 - 0.1 + 0.1 / 3, off = 0.1 / 3
    np.testing.assert_allclose(
        step_lib.binary_cross_entropy(logits, targets, 0.1), reference(smoothed), rtol=1e-6
    )
    thresholded = (smoothed > 0.2).astype(np.float64)  # 0.3 x 0.9 + 0.033 > 0.2: both mixed classes on
    assert thresholded[0].tolist() == [1, 1, 0]
    np.testing.assert_allclose(
        step_lib.binary_cross_entropy(logits, targets, 0.1, 0.2), reference(thresholded), rtol=1e-6
    )
    loss = step_lib.example_loss("bce", 0.0, None)
    np.testing.assert_allclose(loss(logits, targets), reference(t), rtol=1e-6)
    softmax = step_lib.example_loss("softmax", 0.0, None)
    np.testing.assert_allclose(softmax(logits, targets), step_lib.soft_cross_entropy(logits, targets))


def test_bce_gradient_is_autodiff_of_the_formula():
    logits = jnp.array([[2.0, -1.0, 0.5]])
    targets = jnp.array([[1.0, 0.0, 0.0]])
    grad = jax.grad(lambda x: step_lib.binary_cross_entropy(x, targets).sum())(logits)
    np.testing.assert_allclose(grad, (jax.nn.sigmoid(logits) - targets) / 3, rtol=1e-6)


def test_a_digits_run_with_the_rsb_ingredients_learns_and_evaluates_at_a_larger_size(tmp_path):
    """RandAugment (timm string), random erasing, repeated augmentation, BCE with a threshold,
    mixup/CutMix and LAMB on digits at 12 px, tested at 16 px with a 0.9 crop: it learns."""
    config = digits_config(
        image_size=12,
        eval_image_size=16,
        eval_crop_pct=0.9,
        auto_augment="rand-m7-mstd0.5-inc1",
        random_erase_prob=0.25,
        repeated_aug=3,
        loss="bce",
        bce_target_threshold=0.2,
        mixup_alpha=0.1,
        cutmix_alpha=1.0,
        optimizer="lamb",
        learning_rate=0.02,
        weight_decay=0.02,
        label_smoothing=0.0,
        num_epochs=8.0,
        warmup_epochs=1.0,
    )
    train.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_accuracy" in r][-1]
    assert final["eval_accuracy"] > 0.6, final  # chance is 0.1
    dataset, _ = train.load_dataset(check_config(config))
    assert dataset.info.eval_image_shape == (16, 16, 1) and dataset.info.image_shape == (12, 12, 1)
    assert next(data.eval_batches(dataset, global_batch_size=8))["image"].shape == (8, 16, 16, 1)


def test_rsb_a3_runs_three_steps_on_a_folder_of_jpegs_through_train_py(tmp_path):
    """The A3 config's data path as a user runs it: train.py on a folder of JPEG files, lazily
    decoded, RandAugment, 160 -> 224 px replaced by 32 -> 48 px to keep the CPU compile small."""
    from PIL import Image

    from tests.conftest import run_script

    rng = np.random.default_rng(0)
    for i in range(24):
        path = tmp_path / "photos" / f"class{i % 3}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60 + i, 80, 3), dtype=np.uint8)).save(path, quality=90)
    result = run_script(
        "train.py",
        "--config",
        "configs/imagenet_resnet50_rsb_a3.py",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.dataset=folder:{tmp_path / 'photos'}",
        "--config.model=resnet18",
        "--config.dtype=float32",
        "--config.batch_size=8",
        "--config.num_train_steps=3",
        "--config.image_size=32",
        "--config.eval_image_size=48",
        "--config.num_workers=0",
        "--config.checkpoint_every_steps=3",
        "--config.eval_every_steps=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows) and all(
        np.isfinite(r.get("train_loss", 0.0)) for r in rows
    )
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/dataset/metadata")).read_text())
    assert saved["eval_image_shape"] == [48, 48, 3] and saved["eval_crop"] == 0.95
