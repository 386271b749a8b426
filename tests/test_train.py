import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import compiled_steps, data, inference, models, parallel, train
from resnet_jax.step import cross_entropy
from tests.conftest import digits_config

CONFIG = dict(
    batch_size=32, num_train_steps=30, warmup_epochs=0.0, lr_schedule="constant", label_smoothing=0.0
)


@pytest.fixture(scope="module")
def dataset():
    return data.load(digits_config(**CONFIG))


@pytest.fixture(scope="module")
def steps(dataset):
    return compiled_steps.CompiledSteps(digits_config(**CONFIG), dataset.info, parallel.create_mesh())


@pytest.fixture(scope="module")
def fixed_batch(dataset):
    images = np.stack([dataset.train_source[i]["image"] for i in range(32)])
    labels = np.array([dataset.train_source[i]["label"] for i in range(32)])
    return {"image": images, "label": labels}


def test_jit_train_step_lowers_the_loss_on_a_fixed_batch(steps, fixed_batch):
    state = steps.init(jax.random.key(0))
    losses = []
    for _ in range(30):
        state, m = steps.train_step(state, parallel.to_global(fixed_batch, steps.batch_sharding))
        losses.append(float(m.loss.compute()))
    assert int(state.step) == 30
    # 30 steps at lr 0.1 at least halve the loss.
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < losses[len(losses) // 2] < losses[0], losses


def test_train_step_donates_the_state(steps, fixed_batch):
    state = steps.init(jax.random.key(0))
    old_leaf = jax.tree.leaves(state.params)[0]
    steps.train_step(state, parallel.to_global(fixed_batch, steps.batch_sharding))
    assert old_leaf.is_deleted()


def test_eval_step_counts_every_unmasked_example_once(steps, dataset):
    state = steps.init(jax.random.key(0))
    # 360 eval images in batches of 32: the last one is padded
    result = inference.evaluate(steps.eval_step, state, dataset, batch_size=32, mesh=steps.mesh)
    assert int(result.accuracy.count) == dataset.info.num_eval == 360
    assert 0.0 <= float(result.accuracy.compute()) <= 1.0


def test_cross_entropy_with_label_smoothing_matches_its_formula():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    labels = jnp.array([0, 2])
    log_p = jax.nn.log_softmax(logits)
    plain = cross_entropy(logits, labels)
    np.testing.assert_allclose(plain, -log_p[jnp.arange(2), labels], rtol=1e-6)
    eps = 0.3
    smoothed = cross_entropy(logits, labels, eps)
    targets = jax.nn.one_hot(labels, 3) * (1 - eps) + eps / 3
    np.testing.assert_allclose(smoothed, -(targets * log_p).sum(-1), rtol=1e-6)
    # Smoothing penalises confident correct predictions: the loss goes up for them.
    assert (smoothed > plain).all()


def test_autodiff_gradient_matches_finite_differences():
    # The gradient of the loss w.r.t. conv kernels, against central differences, in float64.
    with jax.enable_x64(True):
        model = models.create("resnet20", 10, dtype=jnp.float64, zero_init_residual=False)
        x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1), jnp.float64)
        labels = jnp.arange(8) % 10
        variables = model.init(jax.random.key(0), x)
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)

        def loss(params):
            logits = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )[0]
            return cross_entropy(logits.astype(jnp.float64), labels).mean()

        params = variables["params"]
        grads = jax.grad(loss)(params)
        h = 1e-5
        for layer, index in [("conv1", (0, 0, 0, 0)), ("conv1", (2, 1, 0, 15)), ("layer2_1", (1, 1, 3, 7))]:

            def shifted(delta, layer=layer, index=index):
                if layer == "conv1":
                    return loss(
                        {**params, "conv1": {"kernel": params["conv1"]["kernel"].at[index].add(delta)}}
                    )
                block = params[layer]
                conv = {"kernel": block["conv1"]["kernel"].at[index].add(delta)}
                return loss({**params, layer: {**block, "conv1": conv}})

            numeric = (shifted(h) - shifted(-h)) / (2 * h)
            analytic = (
                grads[layer]["kernel"][index] if layer == "conv1" else grads[layer]["conv1"]["kernel"][index]
            )
            assert math.isclose(float(analytic), float(numeric), rel_tol=1e-5, abs_tol=1e-9), (layer, index)


@pytest.mark.slow
def test_train_and_evaluate_from_a_plain_script_writes_the_contract_metrics(tmp_path):
    config = digits_config(num_train_steps=24, log_every_steps=10, eval_every_steps=20, batch_size=32)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 24
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 24]  # every log_every_steps and the last step
    assert [r["step"] for r in eval_rows] == [20, 24]
    for row in train_rows:
        assert {"train_loss", "train_accuracy", "learning_rate"} <= set(row)
    for row in eval_rows:
        assert {"eval_loss", "eval_accuracy"} <= set(row) and 0 <= row["eval_accuracy"] <= 1
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert list((tmp_path / "tensorboard").iterdir())
