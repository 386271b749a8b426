"""Sharded train steps against references, over every device (run by tests/test_parallel.py).

XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py CASE [CASE ...]

on 8 virtual CPU devices, or on the N >= 2 devices of an accelerator host:

global_bn   the step sharded over N devices == the same step on 1 device (BatchNorm over the global batch)
bn_groups   bn_group_size=4 over N devices == plain BatchNorm run on each group of 4 by itself, averaged
grad_accum  grad_accum_steps=2 over N devices == the two micro-batches one after the other, by hand

A check that fails raises (non-zero exit) with the largest difference; each case that passes prints
`ok CASE`.
Another device count sums in another order, so results agree to float rounding, and the setup keeps
that rounding from growing: tanh, because with ReLU a pre-activation within rounding distance of 0
(there are a few in every step) takes the other side of the kink and moves a gradient by ~1%; and
random images with plain SGD, because on the digits (and with momentum) differences grow ~100x in
three steps.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import digits  # noqa: E402
from resnet_jax import compiled_steps, data, models, parallel  # noqa: E402
from resnet_jax.config_checks import ConfigError  # noqa: E402
from resnet_jax.step import TrainState, cross_entropy, normalize  # noqa: E402

STEPS = 3
# Each device's share holds whole BatchNorm groups of 4 and splits into 2 micro-batches.
BATCH = 32 if 32 % (4 * jax.device_count()) == 0 else 8 * jax.device_count()
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def make_config(**overrides):
    config = digits.get_config()
    config.update(
        image_size=8,
        batch_size=BATCH,
        num_train_steps=STEPS,
        warmup_epochs=0.0,
        lr_schedule="constant",
        optimizer="sgd",
        learning_rate=0.05,
        zero_init_residual=False,  # every BatchNorm scale non-zero: all of them matter from step 1
        activation="tanh",
        label_smoothing=0.0,  # the references below use the plain cross-entropy
    )
    config.update(overrides)
    return config


def fixed_batches(dataset):
    rng = np.random.default_rng(0)
    shape, num_classes = dataset.info.image_shape, dataset.info.num_classes
    for _ in range(STEPS):
        yield {
            "image": rng.integers(0, 256, (BATCH, *shape), dtype=np.uint8),
            "label": rng.integers(0, num_classes, BATCH),
        }


def initial_state():
    """One init for every run (on CPU it compiles slower than the train step), as host arrays."""
    config = make_config()
    steps = compiled_steps.CompiledSteps(
        config, data.load(config).info, parallel.create_mesh(jax.devices()[:1])
    )
    return jax.device_get(steps.init(jax.random.key(0)))


def sharded_run(config, devices, state):
    """`Trainer`'s jitted step, as `train_and_evaluate` runs it, on a mesh of `devices`."""
    dataset = data.load(config)
    steps = compiled_steps.CompiledSteps(config, dataset.info, parallel.create_mesh(devices))
    state = jax.device_put(state, parallel.replicated(steps.mesh))
    losses = []
    for batch in fixed_batches(dataset):
        state, step_metrics = steps.train_step(state, parallel.to_global(batch, steps.batch_sharding, BATCH))
        losses.append(step_metrics.loss.compute())
    return state, losses


def loss_and_grads(model, params, batch_stats, images, labels):
    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        return cross_entropy(logits, labels).mean(), updates["batch_stats"]

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def per_group(model, state, images, labels, size):
    """Each group of `size` consecutive examples through the global-BatchNorm model on its own."""
    grouped = [x.reshape(-1, size, *x.shape[1:]) for x in (images, labels)]
    results = jax.vmap(lambda x, y: loss_and_grads(model, state.params, state.batch_stats, x, y))(*grouped)
    return jax.tree.map(lambda x: x.mean(0), results)


def one_after_the_other(model, state, images, labels, k):
    """Micro-batch i = examples i, i + k, ...; each updates batch_stats for the next; gradients averaged."""
    batch_stats, losses, grads = state.batch_stats, [], []
    for i in range(k):
        (loss, batch_stats), g = loss_and_grads(model, state.params, batch_stats, images[i::k], labels[i::k])
        losses.append(loss)
        grads.append(g)
    return (sum(losses) / k, batch_stats), jax.tree.map(lambda *g: sum(g) / k, *grads)


def reference_run(config, state, batch_gradient, **options):
    """The optimizer steps on one device, with the loss, gradient and batch_stats of `batch_gradient`."""
    plain = make_config()  # global BatchNorm, no accumulation: the model every group / micro-batch sees
    dataset = data.load(plain)
    steps = compiled_steps.CompiledSteps(config, dataset.info, parallel.create_mesh(jax.devices()[:1]))
    model = models.create_model(plain, dataset.info.num_classes)

    @jax.jit
    def step(state, batch):
        images = normalize(batch["image"], dataset.info.mean, dataset.info.std)
        (loss, batch_stats), grads = batch_gradient(model, state, images, batch["label"], **options)
        updates, opt_state = steps.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), loss

    losses = []
    for batch in fixed_batches(dataset):
        state, loss = step(state, batch)
        losses.append(loss)
    return state, losses


def assert_same(name, got, want):
    (got_state, got_losses), (want_state, want_losses) = got, want
    for part in ("params", "batch_stats", "opt_state"):
        diffs = jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
            getattr(got_state, part),
            getattr(want_state, part),
        )
        print(f"{name} {part}: max abs difference {max(jax.tree.leaves(diffs), default=0.0):.3g}")
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOLERANCE),
            getattr(got_state, part),
            getattr(want_state, part),
        )
    np.testing.assert_allclose(np.asarray(got_losses), np.asarray(want_losses), **TOLERANCE)
    assert int(got_state.step) == int(want_state.step) == STEPS


def assert_config_error(config, message):
    try:
        compiled_steps.CompiledSteps(config, data.load(config).info, parallel.create_mesh())
    except ConfigError as e:
        assert message in str(e), str(e)
    else:
        raise AssertionError(f"no ConfigError for {message!r}")


def check(case, state):
    if case == "global_bn":
        config = make_config()
        assert_same(
            case, sharded_run(config, jax.devices(), state), sharded_run(config, jax.devices()[:1], state)
        )
    elif case == "bn_groups":
        config = make_config(bn_group_size=4)
        assert_same(
            case, sharded_run(config, jax.devices(), state), reference_run(config, state, per_group, size=4)
        )
        too_big = 2 * BATCH // jax.device_count()  # a group larger than a device's share
        assert_config_error(
            make_config(bn_group_size=too_big),
            f"config.batch_size={BATCH} does not divide over {jax.device_count()} devices x "
            f"bn_group_size={too_big}",
        )
    elif case == "grad_accum":
        config = make_config(grad_accum_steps=2)
        assert_same(
            case,
            sharded_run(config, jax.devices(), state),
            reference_run(config, state, one_after_the_other, k=2),
        )
        too_many = 2 * BATCH // jax.device_count()  # more micro-batches than a device's share of rows
        assert_config_error(
            make_config(grad_accum_steps=too_many),
            f"config.batch_size={BATCH} does not divide over {jax.device_count()} devices x "
            f"grad_accum_steps={too_many}",
        )
    else:
        raise SystemExit(f"unknown case {case!r}")
    print(f"ok {case}", flush=True)


def main(cases):
    assert jax.device_count() >= 2, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    state = initial_state()
    for case in cases:
        check(case, state)


if __name__ == "__main__":
    main(sys.argv[1:])
