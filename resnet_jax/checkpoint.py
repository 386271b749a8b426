"""Checkpoints (orbax) for exact resume, plus preemption handling.

A checkpoint holds the train state (params, batch_stats, optimizer state,
step), the data iterator's position (grain), the config it was trained with and
the dataset's metadata (class names, normalisation), so that training resumes
bit for bit and `evaluate`/`predict` need nothing else. Orbax writes each step
to a temporary directory and renames it when complete: a half-written
checkpoint is never taken as the latest.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from resnet_jax import progress
from resnet_jax.errors import UserError

# Changing any of these makes a checkpoint unusable (other parameter tree, data or optimizer state).
INCOMPATIBLE_KEYS = ("model", "dataset", "image_size", "optimizer", "batch_size", "seed")
# Keys that decide whether a part of the state exists: changing their value within a side is fine.
STATE_LAYOUT = {
    "ema_decay": lambda c: c.get("ema_decay", 0.0) > 0,
    "dtype": lambda c: c.get("dtype") == "float16",  # the loss scale
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or used; the message says which and why."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpoints:
    """The run's checkpoints: keeps the last `keep` plus the best by eval accuracy."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        self.workdir = os.path.abspath(workdir)
        policy = preservation_policy.AnyPreservationPolicy(
            [
                preservation_policy.LatestN(n=max(1, keep)),
                preservation_policy.BestN(
                    get_metric_fn=lambda m: m["eval_accuracy"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "dataset": ocp.JsonCheckpointHandler(),
                "metrics": ocp.JsonCheckpointHandler(),
            },
        )

    # ------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Any,
        dataset_info: Any,
        data_iterator: Any | None = None,
        eval_metrics: dict[str, float] | None = None,
    ) -> None:
        """Start an (asynchronous) save; errors of the previous save surface here."""
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config_to_dict(config)),
            "dataset": ocp.args.JsonSave(dataclasses.asdict(dataset_info)),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if eval_metrics is not None:
            items["metrics"] = ocp.args.JsonSave(eval_metrics)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=eval_metrics, force=True)
        except OSError as e:
            raise self._save_error(step, e) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise self._save_error(None, e) from None

    def _save_error(self, step: int | None, error: OSError) -> CheckpointError:
        kept = self.steps()
        return CheckpointError(
            f"could not write the checkpoint{f' of step {step}' if step is not None else ''} to "
            f"{self.directory}: {error.strerror or error} (is the disk full or read-only?); "
            f"the previous checkpoints are intact: steps {kept or 'none'}"
        )

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # ------------------------------------------------------------ reading

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def read_json(self, step: int, item: str) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def best_step(self) -> int | None:
        """The step with the highest saved eval accuracy (None when no checkpoint has one)."""
        scored = []
        for step in self.steps():
            try:
                scored.append((self.read_json(step, "metrics")["eval_accuracy"], step))
            except Exception:  # no eval at that step
                continue
        return max(scored)[1] if scored else None

    def resolve(self, which: str | int) -> int:
        """'latest', 'best' or a step number -> a step that exists (clear error otherwise)."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(f"no checkpoint in {self.directory} has an eval accuracy; use latest")
            return best
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(f"--checkpoint={which!r}: use best, latest or a step number") from None
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; steps: {steps}")
        return step

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> dict[str, Any]:
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "config": ocp.args.JsonRestore(),
            "dataset": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return dict(self.manager.restore(step, args=ocp.args.Composite(**items)))

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None = None, config: Any | None = None
    ) -> tuple[int, dict] | None:
        """Restore the newest readable checkpoint; broken ones are moved aside with a warning.

        With `config`, the saved config is checked first (`check_compatible`), so that a checkpoint
        of another model is refused with a clear error instead of being mistaken for a broken one.
        """
        for step in reversed(self.steps()):
            try:
                saved_config = self.read_json(step, "config")
            except Exception as e:
                self._report_broken(step, e)
                continue
            if config is not None:
                check_compatible(saved_config, config, step, self.directory)
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # truncated, deleted or garbled files
                self._report_broken(step, e)
        return None

    def _report_broken(self, step: int, error: Exception) -> None:
        aside = self._move_aside(step)
        progress.warn(
            f"checkpoint of step {step} is broken ({type(error).__name__}: {str(error)[:200]}); "
            f"moved to {aside}, falling back to the previous one"
        )

    def _move_aside(self, step: int) -> str:
        target = os.path.join(self.workdir, "broken_checkpoints", str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target


def config_to_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def check_compatible(saved: dict[str, Any], config: Any, step: int, directory: str) -> list[str]:
    """Raise on an incompatible change; return the harmless changes (for the log)."""
    current = config_to_dict(config)
    for key, in_state in STATE_LAYOUT.items():  # saved state trees with or without the EMA / loss scale
        if key in saved and in_state(saved) != in_state(current):
            raise CheckpointError(
                f"cannot resume from step {step} in {directory}: config.{key} was {saved[key]!r} and is "
                f"now {current.get(key)!r}, which {'adds' if in_state(current) else 'removes'} part of the "
                f"saved state; use a new --workdir, or set config.{key}={saved[key]!r}"
            )
    for key in INCOMPATIBLE_KEYS:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"cannot resume from step {step} in {directory}: config.{key} was {saved[key]!r} and is "
                f"now {current.get(key)!r}; use a new --workdir, or set config.{key}={saved[key]!r}"
            )
    return [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if key in saved and saved[key] != value
    ]


def with_sharding(abstract: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


class PreemptionWatcher:
    """Turns SIGTERM / SIGINT (and JAX's multi-host preemption notice) into a request to stop cleanly.

    The train loop polls `should_stop(step)`, saves, and returns. A second Ctrl-C exits at once.
    On multi-process runs JAX's own preemption service owns SIGTERM, and all hosts agree on the
    step through `reached_preemption_sync_point`.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            print(f"second {name}: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = name
        print(f"{name} received: saving a checkpoint at the end of this step", file=sys.stderr, flush=True)

    def should_stop(self, step: int) -> bool:
        if self.requested:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # preemption service not running (no jax.distributed coordinator)
                return False
        return False
