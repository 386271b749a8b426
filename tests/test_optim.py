import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models, optim
from tests.conftest import digits_config


def resnet20_params():
    module = models.create("resnet20", 10)
    return module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


def test_weight_decay_mask_covers_exactly_the_kernels():
    params = resnet20_params()
    mask = optim.kernel_mask(params)
    flat = {jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_leaves_with_path(mask)}
    kernels = {k for k, m in flat.items() if m}
    assert kernels and all(k.endswith("['kernel']") for k in kernels)
    assert all(not m for k, m in flat.items() if "'scale'" in k or "'bias'" in k)
    # 19 convolutions + 1 dense layer in ResNet-20 (option-A shortcuts have no weights).
    assert len(kernels) == 20


def test_weight_decay_changes_only_kernels():
    params = resnet20_params()
    config = digits_config(optimizer="sgd", learning_rate=1.0, warmup_epochs=0, lr_schedule="constant")
    config.weight_decay = 0.1
    tx, _ = optim.create(config, steps_per_epoch=10, total_steps=100)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    mask = optim.kernel_mask(params)
    for update, param, is_kernel in zip(
        jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(mask), strict=False
    ):
        expected = -0.1 * param if is_kernel else jnp.zeros_like(param)
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("warmup_epochs", [0.0, 5.0, 1000.0])
@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_warmup_is_clipped_so_short_runs_work(warmup_epochs, schedule):
    config = digits_config(warmup_epochs=warmup_epochs, lr_schedule=schedule, learning_rate=0.4)
    fn = optim.create_schedule(config, steps_per_epoch=22, total_steps=20)
    values = np.array([fn(s) for s in range(21)])
    assert np.isfinite(values).all() and values.max() <= 0.4 + 1e-6
    if warmup_epochs == 0.0:
        assert values[0] == pytest.approx(0.4)


def test_cosine_schedule_follows_its_formula():
    config = digits_config(warmup_epochs=1.0, lr_schedule="cosine", learning_rate=0.1)
    fn = optim.create_schedule(config, steps_per_epoch=10, total_steps=110)
    assert float(fn(0)) == 0.0
    assert float(fn(5)) == pytest.approx(0.05)
    assert float(fn(10)) == pytest.approx(0.1)
    assert float(fn(60)) == pytest.approx(0.05, rel=1e-5)  # half-way through the decay
    assert float(fn(110)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name):
    params = resnet20_params()
    tx, _ = optim.create(digits_config(optimizer=name), steps_per_epoch=10, total_steps=30)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
    assert optax.global_norm(updates) >= 0


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer='adamax'.*nesterov"):
        optim.create(digits_config(optimizer="adamax"), 10, 30)
