import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models, optim
from resnet_jax.config_checks import ConfigError, check_config
from resnet_jax.step import TrainState, train_step
from tests.conftest import digits_config, fixed_digits_batch, tiny_resnet


@functools.cache
def resnet20_params():
    module = models.create("resnet20", 10)
    return jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


def flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_mask_covers_exactly_the_kernels():
    params = resnet20_params()
    mask = flat(optim.kernel_mask(params))
    kernels = {k for k, m in mask.items() if m}
    assert kernels and all(k.endswith("['kernel']") for k in kernels)
    assert all(not m for k, m in mask.items() if "'scale'" in k or "'bias'" in k)
    # 19 convolutions + 1 dense layer in ResNet-20 (option-A shortcuts have no weights).
    assert len(kernels) == 20


def step_once(config, params, grads):
    tx, _ = optim.create(config, steps_per_epoch=10, total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_weight_decay_changes_only_kernels():
    params = resnet20_params()
    config = digits_config(optimizer="sgd", learning_rate=1.0, warmup_epochs=0, lr_schedule="constant")
    config.weight_decay = 0.1
    updates = step_once(config, params, jax.tree.map(jnp.zeros_like, params))
    for update, param, is_kernel in zip(
        jax.tree.leaves(updates),
        jax.tree.leaves(params),
        jax.tree.leaves(optim.kernel_mask(params)),
        strict=True,
    ):
        expected = -0.1 * param if is_kernel else jnp.zeros_like(param)
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-8)


def test_weight_decay_mask_all_decays_batch_norm_too():
    params = resnet20_params()
    config = digits_config(optimizer="sgd", learning_rate=1.0, warmup_epochs=0, lr_schedule="constant")
    config.weight_decay, config.weight_decay_mask = 0.1, "all"
    updates = step_once(config, params, jax.tree.map(jnp.zeros_like, params))
    for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(update, -0.1 * param, rtol=1e-6, atol=1e-8)


def test_coupled_and_decoupled_decay_differ_as_expected_under_adam():
    """With a zero gradient, Adam normalises coupled L2 decay to about -lr * sign(w) (the decay is
    just another gradient); decoupled decay stays -lr * wd * w (AdamW)."""
    params = {"dense": {"kernel": jnp.array([[2.0, -0.5], [0.25, -4.0]]), "bias": jnp.array([1.0, -1.0])}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    base = dict(
        optimizer="adam", learning_rate=0.01, warmup_epochs=0, lr_schedule="constant", weight_decay=0.1
    )
    coupled = step_once(digits_config(**base, weight_decay_mode="coupled"), params, zeros)
    decoupled = step_once(digits_config(**base, weight_decay_mode="decoupled"), params, zeros)
    kernel = params["dense"]["kernel"]
    np.testing.assert_allclose(coupled["dense"]["kernel"], -0.01 * jnp.sign(kernel), rtol=1e-4)
    np.testing.assert_allclose(decoupled["dense"]["kernel"], -0.01 * 0.1 * kernel, rtol=1e-5)
    for updates in (coupled, decoupled):  # biases are never decayed
        np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def test_adamw_is_adam_with_decoupled_decay():
    params = resnet20_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    base = dict(learning_rate=0.01, warmup_epochs=0, lr_schedule="constant", weight_decay=0.05)
    adamw = step_once(digits_config(optimizer="adamw", **base), params, grads)
    adam = step_once(digits_config(optimizer="adam", weight_decay_mode="decoupled", **base), params, grads)
    reference, _ = optax.adamw(0.01, weight_decay=0.05, mask=optim.kernel_mask).update(
        grads, optax.adamw(0.01, weight_decay=0.05, mask=optim.kernel_mask).init(params), params
    )
    for ours in (adamw, adam):
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9), ours, reference)
    with pytest.raises(ConfigError, match="weight_decay_mode='coupled' with optimizer='adamw'"):
        check_config(digits_config(optimizer="adamw", weight_decay_mode="coupled"))


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trust_ratio_skips_batch_norm_and_biases(name):
    """LARS/LAMB scale kernel updates by ||w|| / ||update|| (times eta) but leave BatchNorm and bias
    updates as the base rule makes them (the MLPerf recipe)."""
    params = {
        "conv": {"kernel": jnp.full((3, 3, 2, 2), 0.5)},
        "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), params)
    config = digits_config(optimizer=name, learning_rate=1.0, warmup_epochs=0, lr_schedule="constant")
    config.weight_decay = 0.0
    updates = step_once(config, params, grads)
    eta = optim.DEFAULT_TRUST_COEFFICIENTS[name]
    base = grads if name == "lars" else jax.tree.map(lambda g: jnp.sign(g), grads)  # Adam's first step
    kernel_ratio = eta * optax.global_norm(params["conv"]) / optax.global_norm(base["conv"])
    np.testing.assert_allclose(updates["conv"]["kernel"], -kernel_ratio * base["conv"]["kernel"], rtol=1e-4)
    np.testing.assert_allclose(updates["bn"]["scale"], -base["bn"]["scale"], rtol=1e-4)
    np.testing.assert_allclose(updates["bn"]["bias"], -base["bn"]["bias"], rtol=1e-4)


def test_unset_learning_rate_and_weight_decay_take_the_optimizers_defaults():
    for name in optim.OPTIMIZERS:
        config = digits_config(optimizer=name)
        config.learning_rate = config.weight_decay = None
        assert optim.learning_rate(config) == optim.DEFAULT_LEARNING_RATES[name]
        assert optim.weight_decay(config) == optim.DEFAULT_WEIGHT_DECAYS[name]
    config = digits_config(optimizer="adam", learning_rate=None, warmup_epochs=0, lr_schedule="constant")
    assert float(optim.create_schedule(config, 10, 100)(3)) == pytest.approx(1e-3)


def test_gradient_clipping_bounds_the_global_norm():
    params = resnet20_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    config = digits_config(optimizer="sgd", learning_rate=1.0, warmup_epochs=0, lr_schedule="constant")
    config.weight_decay, config.grad_clip_norm = 0.0, 0.5
    assert float(optax.global_norm(step_once(config, params, grads))) == pytest.approx(0.5, rel=1e-5)


def short_run_schedule(schedule, peak, warmup, total):
    """What `schedule` should give at steps 0..total, from the textbook formulas: a linear warmup
    from 0 over `warmup` steps, then the decay to 0 over the rest; onecycle's cosine rise from
    peak / 25 to the peak at `warmup` steps (30 % of the run without a warmup) and its cosine fall
    to peak / 25e4."""
    values = []
    for s in range(total + 1):
        if schedule == "onecycle":
            top = warmup or int(0.3 * total)
            low, end = peak / 25, peak / 25 / 1e4
            if s <= top:
                values.append(peak + (low - peak) * (1 + np.cos(np.pi * s / top)) / 2)
            else:
                values.append(end + (peak - end) * (1 + np.cos(np.pi * (s - top) / (total - top))) / 2)
            continue
        if s < warmup:
            values.append(peak * s / warmup)
            continue
        done = (s - warmup) / (total - warmup)  # fraction of the decay
        values.append(
            {
                "constant": peak,
                "step": peak,  # its first decay (epoch 30) is after the run
                "cosine": peak * (1 + np.cos(np.pi * done)) / 2,
                "linear": peak * (1 - done),
                "polynomial": peak * (1 - done) ** 2,
            }[schedule]
        )
    return np.array(values)


@pytest.mark.parametrize("warmup_epochs", [0.0, 5.0, 1000.0])
@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_warmup_is_clipped_so_short_runs_work(warmup_epochs, schedule):
    """A 20-step run: a warmup of 5 or 1000 epochs (110 or 22,000 steps) is clipped to 19 steps, so
    the schedule still rises to its peak (at step 19) and the decays still end at 0 (at step 20).
    Every step's value is compared with the formula: warmup start and end, mid-decay, the end."""
    peak, total = 0.4, 20
    config = digits_config(
        warmup_epochs=warmup_epochs,
        lr_schedule=schedule,
        learning_rate=peak,
        warmup_style="linear",
        warmup_factor=0.0,
        lr_end_factor=0.0,
        lr_power=2.0,
        lr_step_epochs=(30,),
        lr_decay_factor=0.1,
    )
    fn = optim.create_schedule(config, steps_per_epoch=22, total_steps=total)
    values = np.array([float(fn(s)) for s in range(total + 1)])
    warmup = 0 if warmup_epochs == 0.0 else total - 1
    expected = short_run_schedule(schedule, peak, warmup, total)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    assert values.max() == pytest.approx(peak, rel=1e-6)


def schedule_of(steps_per_epoch=10, total_steps=110, **overrides):
    config = digits_config(learning_rate=0.1, **overrides)
    return optim.create_schedule(config, steps_per_epoch, total_steps)


def test_cosine_schedule_follows_its_formula():
    fn = schedule_of(warmup_epochs=1.0, lr_schedule="cosine")
    assert float(fn(0)) == 0.0
    assert float(fn(5)) == pytest.approx(0.05)
    assert float(fn(10)) == pytest.approx(0.1)
    assert float(fn(60)) == pytest.approx(0.05, rel=1e-5)  # half-way through the decay
    assert float(fn(110)) == pytest.approx(0.0, abs=1e-7)
    ended = schedule_of(warmup_epochs=0.0, lr_schedule="cosine", lr_end_factor=0.1)
    assert float(ended(110)) == pytest.approx(0.01, rel=1e-5)


def test_step_schedule_decays_at_the_given_epochs():
    """He et al.'s CIFAR schedule: x0.1 at epochs 3 and 6 (steps 30 and 60), after a warmup epoch
    held at 0.1 x lr (their ResNet-110 warmup)."""
    fn = schedule_of(
        warmup_epochs=1.0,
        warmup_style="constant",
        warmup_factor=0.1,
        lr_schedule="step",
        lr_step_epochs=(3, 6),
        lr_decay_factor=0.1,
    )
    expected = {0: 0.01, 9: 0.01, 10: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001, 110: 0.001}
    for step, value in expected.items():
        assert float(fn(step)) == pytest.approx(value, rel=1e-6), step


def test_linear_warmup_from_a_factor_and_linear_decay():
    fn = schedule_of(warmup_epochs=1.0, warmup_factor=0.1, lr_schedule="linear")
    assert float(fn(0)) == pytest.approx(0.01)
    assert float(fn(5)) == pytest.approx(0.055)
    assert float(fn(60)) == pytest.approx(0.05)
    assert float(fn(110)) == pytest.approx(0.0, abs=1e-8)


def test_polynomial_schedule_is_the_mlperf_lars_decay():
    fn = schedule_of(warmup_epochs=1.0, lr_schedule="polynomial", lr_power=2.0, lr_end_factor=0.01)
    for step in (10, 35, 60, 85, 110):
        progress = (step - 10) / 100
        expected = (0.1 - 0.001) * (1 - progress) ** 2 + 0.001
        assert float(fn(step)) == pytest.approx(expected, rel=1e-5), step


def test_onecycle_rises_over_the_warmup_then_falls():
    fn = schedule_of(warmup_epochs=2.0, lr_schedule="onecycle")
    values = np.array([float(fn(s)) for s in range(111)])
    assert values[0] == pytest.approx(0.1 / 25)
    assert values.argmax() == 20 and values.max() == pytest.approx(0.1)
    assert values[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)
    assert (np.diff(values[:21]) > 0).all() and (np.diff(values[20:]) <= 0).all()


# Hyperparameters for the two-step test, all set (none left to the defaults): eps large enough that
# where it enters (outside or inside the square root) shows, and a trust coefficient that is not 1.
HYPER = dict(momentum=0.9, b1=0.9, b2=0.999, eps=1e-3, rmsprop_decay=0.9, adagrad_initial_accumulator=0.1)
TRUST_COEFFICIENT = 0.5


def textbook_updates(name, params, grads, lr):
    """Each step's update by the optimizer's textbook rule, in float64 NumPy, the params moving by
    each update in turn. `params` and each of `grads` are flat {path: array}, as `flat` makes them."""
    h = HYPER
    params = {k: np.float64(v) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}  # momentum, Adam's first moment, LARS's trace
    v = {k: np.zeros_like(p) for k, p in params.items()}  # RMSprop's and Adam's second moment
    acc = {k: np.full_like(p, h["adagrad_initial_accumulator"]) for k, p in params.items()}
    steps = []
    for t, grad in enumerate(grads, start=1):
        updates = {}
        for k, w in params.items():
            g = np.float64(grad[k])
            if name in ("momentum", "nesterov"):
                m[k] = g + h["momentum"] * m[k]
                u = g + h["momentum"] * m[k] if name == "nesterov" else m[k]
            elif name == "adagrad":
                acc[k] = acc[k] + g**2
                u = g / np.sqrt(acc[k] + h["eps"])
            elif name == "rmsprop":
                v[k] = h["rmsprop_decay"] * v[k] + (1 - h["rmsprop_decay"]) * g**2
                u = g / np.sqrt(v[k] + h["eps"])
            elif name in ("adam", "adamw", "lamb"):
                m[k] = h["b1"] * m[k] + (1 - h["b1"]) * g
                v[k] = h["b2"] * v[k] + (1 - h["b2"]) * g**2
                u = (m[k] / (1 - h["b1"] ** t)) / (np.sqrt(v[k] / (1 - h["b2"] ** t)) + h["eps"])
            else:  # sgd, lars
                u = g
            if name in ("lars", "lamb") and k.endswith("['kernel']"):  # ||w|| / ||u||, kernels only
                u = TRUST_COEFFICIENT * np.linalg.norm(w) / np.linalg.norm(u) * u
            u = -lr * u
            if name == "lars":  # LARS's momentum comes after the learning rate
                m[k] = u + h["momentum"] * m[k]
                u = m[k]
            updates[k] = u
        params = {k: params[k] + updates[k] for k in params}
        steps.append(updates)
    return steps


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_takes_its_first_two_steps_by_its_formula(name):
    """Two updates from a fresh state, for two different random gradients and no weight decay, against
    `textbook_updates`. Two steps, because the first alone cannot tell SGD from momentum, LARS with
    its momentum from without, or Adam's b1 from its b2 (bias correction cancels them)."""
    rng = np.random.default_rng(0)
    shapes = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}}
    shapes["dense"] = {"kernel": (4, 3), "bias": (3,)}

    def draw(scale):
        def leaf(shape):
            return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

        return jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))

    params, grads = draw(1.0), [draw(0.1), draw(0.1)]
    lr = 0.1
    config = digits_config(
        optimizer=name,
        learning_rate=lr,
        weight_decay=0.0,
        grad_clip_norm=0.0,
        warmup_epochs=0.0,
        lr_schedule="constant",
        trust_coefficient=TRUST_COEFFICIENT,
        **HYPER,
    )
    tx, _ = optim.create(config, steps_per_epoch=10, total_steps=100)
    reference = textbook_updates(name, flat(params), [flat(g) for g in grads], lr)
    state = tx.init(params)
    for t, (grad, want) in enumerate(zip(grads, reference, strict=True), start=1):
        updates, state = tx.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        for path, got in flat(updates).items():
            np.testing.assert_allclose(got, want[path], rtol=1e-5, atol=1e-8, err_msg=f"step {t}: {path}")


def test_bad_optimizer_settings_are_rejected_up_front():
    with pytest.raises(ConfigError, match="optimizer='adamax'.*nesterov"):
        check_config(digits_config(optimizer="adamax"))
    bad = {
        "lr_schedule": ("exponential", "lr_schedule='exponential'.*onecycle"),
        "weight_decay_mode": ("l2", "weight_decay_mode='l2'.*decoupled"),
        "weight_decay_mask": ("bn", "weight_decay_mask='bn'.*kernels"),
        "warmup_style": ("cosine", "warmup_style='cosine'.*constant"),
        "ema_decay": (1.0, r"ema_decay=1.0 must be in \[0, 1\)"),
        "mixup_alpha": (-0.2, "mixup_alpha=-0.2"),
        "learning_rate": (0.0, "learning_rate=0.0"),
        "lr_step_epochs": ((60, 30), r"lr_step_epochs=\(60, 30\) must be increasing"),
    }
    for key, (value, message) in bad.items():
        config = digits_config(lr_schedule="step") if key == "lr_step_epochs" else digits_config()
        config[key] = value
        with pytest.raises(ConfigError, match=message):
            check_config(config)


@pytest.fixture(scope="module")
def tiny_digits_setup():
    """A fixed digits batch and a 6-layer CIFAR ResNet's initial variables (shared: only the
    optimizer differs between the cases, and init compiles slowly on a CPU)."""
    info, batch = fixed_digits_batch()
    model = tiny_resnet()
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), batch["image"][:1] * 0.0
    )
    return info, batch, model, variables


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_lowers_the_digits_loss(name, tiny_digits_setup):
    """Each optimizer with its default learning rate and weight decay, 30 steps on a fixed digits
    batch through the project's train step: the loss must fall clearly below its start (measured
    here: to 0.06-0.85 of it; the adaptive methods at their 1e-3 defaults are the slow ones)."""
    info, batch, model, variables = tiny_digits_setup
    config = digits_config(optimizer=name, learning_rate=None, weight_decay=None, warmup_epochs=0.0)
    config.lr_schedule = "constant"
    tx, schedule = optim.create(config, steps_per_epoch=30, total_steps=30)
    params = variables["params"]
    state = TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], tx.init(params))
    step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, mean=info.mean, std=info.std)
    )
    losses = []
    for _ in range(30):
        state, step_metrics = step(state, batch)
        losses.append(float(step_metrics.compute()["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:5]), losses


def test_the_steps_global_norm_equals_optaxs():
    from resnet_jax import step

    params = resnet20_params()
    for concatenate in (False, True):
        np.testing.assert_allclose(
            step.global_norm(params, concatenate), optax.global_norm(params), rtol=1e-6
        )


def test_config_grad_norm_picks_the_concatenated_form_where_it_says():
    from resnet_jax import step
    from resnet_jax.config_checks import ConfigError, check_config
    from tests.conftest import digits_config

    picks = {
        (setting, platform): step.concatenates_grad_norm(setting, platform)
        for setting in step.GRAD_NORMS
        for platform in ("cpu", "gpu", "tpu")
    }
    assert {key for key, concatenates in picks.items() if concatenates} == {
        ("auto", "cpu"),
        ("concatenated", "cpu"),
        ("concatenated", "gpu"),
        ("concatenated", "tpu"),
    }
    with pytest.raises(ConfigError) as error:
        check_config(digits_config(grad_norm="flat"))
    assert str(error.value) == (
        "config.grad_norm='flat' is not valid; choose one of: auto, per_leaf, concatenated"
    )
