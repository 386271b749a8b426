"""The training loop's bookkeeping, one small piece per concern, each testable without a run.

`train.train_and_evaluate` composes them: when to log, evaluate and save (`Cadence`), the
images/s of the last logging window (`ThroughputWindow`), stopping at the first non-finite step
before it can be saved (`NonFiniteGuard`), and the count of images the loader skipped
(`SkippedImages`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from resnet_jax import metrics
from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Every how many steps something happens; a config cadence of 0 means once per epoch.

    The last step of the run always counts, so a run ends logged, evaluated and saved.
    """

    every: int
    total_steps: int

    @classmethod
    def from_config(cls, every: int, steps_per_epoch: int, total_steps: int) -> Cadence:
        return cls(every if every > 0 else steps_per_epoch, total_steps)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps


class ThroughputWindow:
    """Train metrics and wall time since the last log line, without the time spent evaluating.

    The first step (which compiles) is reported on its own and starts the first window, so that
    rates are those of the steady state.
    """

    def __init__(self, batch_size: int, clock: Callable[[], float] = time.perf_counter):
        self.batch_size, self.clock = batch_size, clock
        self.pending: list[metrics.TrainMetrics] = []
        self.start, self.steps = clock(), 0

    def add(self, step_metrics: metrics.TrainMetrics) -> None:
        self.pending.append(step_metrics)
        self.steps += 1

    def restart_clock(self) -> float:
        """Seconds since the window started; the clock (not the metrics) starts again from now."""
        now = self.clock()
        elapsed = now - self.start
        self.start, self.steps = now, 0
        return elapsed

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint) out of the window's time."""
        self.start += seconds

    def summary(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """`train_*` means of the window plus steps/s and images/s, and the learning rate of each of
        its steps (a writer's `history`: the log step's rate alone makes a curve too sparse to read);
        then a new window starts."""
        fetched = jax.device_get(self.pending)
        scalars = metrics.summarize(metrics.merge_all(fetched), "train")
        history = {"learning_rate": [float(m.learning_rate.compute()) for m in fetched]}
        elapsed = self.clock() - self.start
        if self.steps and elapsed > 0:
            scalars["steps_per_sec"] = self.steps / elapsed
            scalars["images_per_sec"] = self.steps * self.batch_size / elapsed
        self.pending = []
        self.restart_clock()
        return scalars, history


class NonFiniteError(UserError, RuntimeError):
    """The loss or a gradient became inf/NaN; the message names the step and the last good checkpoint."""


class NonFiniteGuard:
    """Keeps a non-finite state out of the checkpoints.

    Each step's metrics count its non-finite losses/gradients on the device; reading them every step
    would stall the pipeline, so they are read only before a save (`check`), which raises
    `NonFiniteError` naming the first bad step. Disabled (`enabled=False`) when non-finite steps
    are skipped by the step itself (config.skip_nonfinite_steps, float16 loss scaling).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.unchecked: list[tuple[int, metrics.TrainMetrics]] = []

    def add(self, step: int, step_metrics: metrics.TrainMetrics) -> None:
        if self.enabled:
            self.unchecked.append((step, step_metrics))

    def first_bad_step(self) -> int | None:
        counts = jax.device_get([m.nonfinite_steps.total for _, m in self.unchecked])
        return next((step for (step, _), count in zip(self.unchecked, counts, strict=True) if count), None)

    def check(self, checkpoints: Any) -> None:
        """Raise if a step since the last check was non-finite, naming the last good checkpoint of
        `checkpoints` (a `checkpoint.Checkpoints`: its saves in flight are finished first)."""
        bad = self.first_bad_step() if self.unchecked else None
        self.unchecked.clear()
        if bad is None:
            return
        checkpoints.wait()
        saved = checkpoints.steps()
        raise NonFiniteError(
            f"non-finite loss or gradient at step {bad}; the run stopped and this state was not "
            f"saved. Last good checkpoint: {f'step {saved[-1]}' if saved else 'none'} in "
            f"{checkpoints.directory}. Lower the learning rate, set config.grad_clip_norm, or "
            "set config.skip_nonfinite_steps=True"
        )


class SkippedImages:
    """Unreadable files the loader passed over (folder datasets), reported once per epoch."""

    def __init__(self, epochs: Cadence):
        self.epochs, self.count = epochs, 0

    def add(self, skipped: np.ndarray | None) -> None:
        """`skipped`: the batch's per-example flags (absent for sources that cannot skip)."""
        if skipped is not None:
            self.count += int(np.sum(skipped))

    def take(self, step: int) -> int:
        """The count to report at an epoch's end (or the run's) and reset; 0 at other steps."""
        if not self.epochs.due(step):
            return 0
        count, self.count = self.count, 0
        return count
