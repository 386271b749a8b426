"""The training loop's bookkeeping, piece by piece, without a training run."""

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import loop, metrics


def train_metrics(loss: float, nonfinite: bool = False, learning_rate: float = 0.1) -> metrics.TrainMetrics:
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    return metrics.TrainMetrics.single_from_model_output(
        loss=jnp.float32(loss),
        logits=logits,
        labels=jnp.array([0, 2]),
        learning_rate=jnp.float32(learning_rate),
        grad_norm=jnp.float32(1.0),
        nonfinite=jnp.int32(nonfinite),
    )


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeCheckpoints:
    def __init__(self, saved):
        self.saved, self.directory, self.waited = saved, "/runs/x/checkpoints", False

    def wait(self):
        self.waited = True

    def steps(self):
        return self.saved


def test_cadence_of_zero_is_once_per_epoch_and_the_last_step_always_counts():
    per_epoch = loop.Cadence.from_config(0, steps_per_epoch=22, total_steps=50)
    assert [s for s in range(1, 51) if per_epoch.due(s)] == [22, 44, 50]
    every_ten = loop.Cadence.from_config(10, steps_per_epoch=22, total_steps=35)
    assert [s for s in range(1, 36) if every_ten.due(s)] == [10, 20, 30, 35]


def test_throughput_window_rates_leave_out_the_excluded_time():
    clock = FakeClock()
    window = loop.ThroughputWindow(batch_size=64, clock=clock)
    clock.now += 30.0  # compile + first step
    window.add(train_metrics(2.0, learning_rate=0.1))
    assert window.restart_clock() == pytest.approx(30.0)
    for loss, rate in ((1.0, 0.2), (3.0, 0.3)):
        window.add(train_metrics(loss, learning_rate=rate))
    clock.now += 4.0 + 10.0  # two steps in 4 s, then a 10 s evaluation
    window.exclude(10.0)
    scalars, history = window.summary()
    assert scalars["steps_per_sec"] == pytest.approx(0.5)
    assert scalars["images_per_sec"] == pytest.approx(32.0)
    # The first step's metrics stay in the window (only its clock restarted): mean of 2, 1, 3.
    assert scalars["train_loss"] == pytest.approx(2.0)
    assert scalars["train_accuracy"] == pytest.approx(0.5)
    # The learning rate is the last step's, and each step's for TensorBoard (not a mean).
    assert scalars["learning_rate"] == pytest.approx(0.3)
    assert history == {"learning_rate": [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]}
    clock.now += 1.0
    window.add(train_metrics(0.5))
    scalars, history = window.summary()  # a new window
    assert scalars["train_loss"] == pytest.approx(0.5) and len(history["learning_rate"]) == 1


def test_nonfinite_guard_names_the_first_bad_step_and_the_last_good_checkpoint():
    guard = loop.NonFiniteGuard(enabled=True)
    for step in (1, 2):
        guard.add(step, train_metrics(1.0))
    checkpoints = FakeCheckpoints([2])
    guard.check(checkpoints)  # all finite: nothing happens, nothing is waited for
    assert not checkpoints.waited
    for step, bad in ((3, False), (4, True), (5, True)):
        guard.add(step, train_metrics(1.0, nonfinite=bad))
    with pytest.raises(loop.NonFiniteError) as err:
        guard.check(checkpoints)
    assert checkpoints.waited
    assert str(err.value).startswith("non-finite loss or gradient at step 4; the run stopped")
    assert "Last good checkpoint: step 2 in /runs/x/checkpoints" in str(err.value)
    guard.check(FakeCheckpoints([]))  # the bad window was consumed


def test_nonfinite_guard_without_a_checkpoint_says_none_and_disabled_guard_never_raises():
    guard = loop.NonFiniteGuard(enabled=True)
    guard.add(1, train_metrics(1.0, nonfinite=True))
    with pytest.raises(loop.NonFiniteError, match="Last good checkpoint: none in"):
        guard.check(FakeCheckpoints([]))
    skipping = loop.NonFiniteGuard(enabled=False)
    skipping.add(1, train_metrics(1.0, nonfinite=True))
    skipping.check(FakeCheckpoints([]))


def test_skipped_images_are_reported_at_epoch_ends_and_at_the_last_step():
    skipped = loop.SkippedImages(loop.Cadence.from_config(0, steps_per_epoch=10, total_steps=23))
    skipped.add(np.array([0, 1, 0, 1]))
    skipped.add(None)  # sources that cannot skip
    assert skipped.take(5) == 0
    skipped.add(np.array([1, 0]))
    assert skipped.take(10) == 3
    assert skipped.take(20) == 0  # reset after the report
    skipped.add(np.array([1]))
    assert skipped.take(23) == 1
