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
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from resnet_jax import progress
from resnet_jax.errors import UserError, first_line

# Changing any of these makes a checkpoint another run's (other parameter tree, data or data order),
# whatever the state's layout. Other keys that change the layout (clipping, EMA, float16's loss
# scale, ...) are found by comparing the saved state with the config's (`layout_difference`).
INCOMPATIBLE_KEYS = ("model", "dataset", "image_size", "optimizer", "batch_size", "seed")

Layout = dict[str, tuple[tuple[int, ...], str]]


class _ExpectedReadWarnings(logging.Filter):
    """Orbax warns on every read-only open of a checkpoint directory, which `evaluate`, `predict`,
    `export` and fine-tuning do by design; those warnings only bury real ones."""

    EXPECTED = (
        "CheckpointManagerOptions.read_only=True",
        "Given directory is read only",
        "Metadata file does not exist",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_ExpectedReadWarnings())


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
            hint = ""
            if os.path.basename(self.workdir) == "checkpoints":  # given WORKDIR/checkpoints for WORKDIR
                hint = f"; --workdir is the run's directory: did you mean {os.path.dirname(self.workdir)}?"
            raise CheckpointError(f"no checkpoint in {self.directory}{hint}")
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

    def saved_layout(self, step: int) -> Layout:
        """The saved state's layout; raises when its metadata is missing (a broken checkpoint)."""
        layout = leaf_layout(self.manager.item_metadata(step)["state"])
        if not layout:
            raise ValueError(f"the state's metadata is missing from {self.directory}/{step}/state")
        return layout

    def restore_latest(
        self,
        abstract_state: Any,
        data_iterator: Any | None = None,
        config: Any | None = None,
        explain_layout: Callable[[dict[str, Any], Layout], list[str]] | None = None,
    ) -> tuple[int, dict] | None:
        """Restore the newest readable checkpoint; broken ones are moved aside with a warning.

        With `config`, the saved config (`check_compatible`) and the saved state's layout are
        checked first, so that a checkpoint of another model, or one whose optimizer state a config
        change reshaped, is refused with a clear error instead of being mistaken for a broken one.
        `explain_layout(saved_config, saved_layout)` names the config keys behind a layout change.
        The restored items then hold "config_changes": the changes `check_compatible` allowed.
        """
        for step in reversed(self.steps()):
            try:
                saved_config = self.read_json(step, "config")
                saved_layout = self.saved_layout(step)
            except Exception as e:
                self._report_broken(step, e)
                continue
            changes = None
            if config is not None:
                changes = check_compatible(saved_config, config, step, self.directory)
                difference = layout_difference(saved_layout, leaf_layout(abstract_state))
                if difference:
                    keys = explain_layout(saved_config, saved_layout) if explain_layout else []
                    raise layout_error(step, self.workdir, difference, keys, saved_config, config)
            try:
                items = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # truncated, deleted or garbled files
                self._report_broken(step, e)
                continue
            if changes is not None:
                items["config_changes"] = changes
            return step, items
        return None

    def _report_broken(self, step: int, error: Exception) -> None:
        aside = self._move_aside(step)
        progress.warn(
            f"checkpoint of step {step} is broken ({type(error).__name__}: {first_line(str(error))}); "
            f"moved to {aside}, falling back to the previous one"
        )

    def _move_aside(self, step: int) -> str:
        target = os.path.join(self.workdir, "broken_checkpoints", str(step))
        if progress.is_primary():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target


def config_to_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def changed_keys(saved: dict[str, Any], config: Any) -> list[str]:
    """Keys whose value differs from the saved config's (compared as JSON: tuples are saved as lists)."""
    current = json.loads(json.dumps(config_to_dict(config)))
    return [key for key, value in current.items() if key in saved and saved[key] != value]


def check_compatible(saved: dict[str, Any], config: Any, step: int, directory: str) -> list[str]:
    """Raise on an incompatible change; return the harmless changes (for the log)."""
    current = config_to_dict(config)
    for key in INCOMPATIBLE_KEYS:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"cannot resume from step {step} in {directory}: config.{key} was {saved[key]!r} and is "
                f"now {current.get(key)!r}; use a new --workdir, or set config.{key}={saved[key]!r}"
            )
    return [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed_keys(saved, config)]


def leaf_layout(tree: Any) -> Layout:
    """'path/to/leaf' -> (shape, dtype) of every array of a state, saved (orbax metadata) or abstract."""

    def name(entry: Any) -> str:
        for attribute in ("key", "name", "idx"):  # dict keys, dataclass fields, tuple positions
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(name, path)): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def layout_difference(saved: Layout, target: Layout) -> str:
    """'' when a restore of `saved` into `target` fits; else which parts of the state differ."""
    differing = {path for path in saved.keys() | target.keys() if saved.get(path) != target.get(path)}
    parts = sorted({"/".join(path.split("/")[:2]) for path in differing})
    return ", ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")


def override_flag(key: str, value: Any) -> str:
    """`--config.KEY=VALUE` as a shell takes it (a tuple quoted; None as config files write it)."""
    if isinstance(value, list | tuple):
        return f"'--config.{key}={tuple(value)}'"
    return f"--config.{key}={value}"


def layout_error(
    step: int, workdir: str, difference: str, keys: list[str], saved: dict[str, Any], config: Any
) -> CheckpointError:
    current = config_to_dict(config)
    if keys:
        changes = " and ".join(f"config.{k} changed from {saved[k]!r} to {current[k]!r}" for k in keys)
        cause = f"because {changes}"
        flags = " ".join(override_flag(k, saved[k]) for k in keys)
        way_back = f"set {'it' if len(keys) == 1 else 'them'} back ({flags}), "
    else:
        cause = "which no single config change explains (was the code updated since?)"
        way_back = ""
    return CheckpointError(
        f"cannot resume from step {step} in {workdir}: the saved state's layout differs from this "
        f"config's ({difference}) {cause}. No checkpoint was touched. To go on, {way_back}use a new "
        f"--workdir, or start a new run from these weights with --workdir=NEW --config.init_from={workdir}"
    )


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
