"""Inference without an optimizer: the compiled eval step, a whole-split evaluation, and loading a
trained run back from its checkpoints for `evaluate` and `predict`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from resnet_jax import checkpoint, data, metrics, models, parallel
from resnet_jax.config_checks import complete_config
from resnet_jax.errors import ConfigError, did_you_mean
from resnet_jax.step import TrainState, eval_step

EvalStep = Callable[[TrainState, dict[str, jax.Array]], metrics.EvalMetrics]


def eval_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> int:
    """`config.eval_batch_size`, or `batch_size` when it is 0; checked to split over `mesh` if given."""
    size = config.eval_batch_size or config.batch_size
    if mesh is not None:
        try:
            parallel.check_batch_size("config.eval_batch_size", size, mesh)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return size


def compile_eval_step(model: flax.linen.Module, info: data.DatasetInfo, mesh: jax.sharding.Mesh) -> EvalStep:
    """`step.eval_step` jit-compiled over `mesh`: state replicated, batch split over `data`."""
    return jax.jit(
        functools.partial(eval_step, model=model, mean=info.mean, std=info.std),
        in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def evaluate(
    compiled_eval_step: EvalStep,
    state: TrainState,
    dataset: data.Dataset,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> metrics.EvalMetrics:
    """Metrics over the whole eval split (each image once, padding masked) of `state.for_eval()`."""
    batches = data.eval_batches(
        dataset,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_state, sharding = state.for_eval(), parallel.data_sharding(mesh)
    return metrics.merge_all(
        [parallel.in_order(compiled_eval_step(eval_state, parallel.to_global(b, sharding))) for b in batches]
    )


@dataclasses.dataclass
class TrainedModel:
    step: int
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    model: Any
    state: TrainState  # params and batch_stats (their EMA if the run kept one); no optimizer state


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """`--config.key=value` strings, typed like the saved value (as absl's config flags do)."""
    for item in overrides:
        key, sep, text = item.removeprefix("--config.").partition("=")
        if not sep or key not in config:
            hint = did_you_mean(key, config) if sep else ""
            raise ConfigError(
                f"{item!r}: expected --config.KEY=VALUE{hint} with one of: {', '.join(sorted(config))}"
            )
        old = config[key]
        try:
            if isinstance(old, bool):
                value = text.lower() in ("1", "true", "yes")
            elif isinstance(old, int | float) and old is not None:
                value = type(old)(text)
            else:
                value = None if text == "None" else text
            config[key] = value
        except (TypeError, ValueError):
            raise ConfigError(f"{item!r}: config.{key} takes a {type(old).__name__}, like {old!r}") from None


def replicated_target(checkpoints: checkpoint.Checkpoints, step: int) -> Any:
    """The saved state's shapes, replicated over this machine's devices.

    Restoring onto the saved shardings would fail when the checkpoint was written by another device
    layout (8 GPUs, two hosts) than the one evaluating it.
    """
    path = os.path.join(checkpoints.directory, str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata
    return checkpoint.with_sharding(tree, parallel.replicated(parallel.create_mesh()))


def load_trained(workdir: str, which: str | int = "latest") -> TrainedModel:
    """One checkpoint's params and batch_stats, with the config and dataset metadata saved beside them."""
    checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
    step = checkpoints.resolve(which)
    items = checkpoints.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(replicated_target(checkpoints, step)),
            config=ocp.args.JsonRestore(),
            dataset=ocp.args.JsonRestore(),
        ),
    )
    info_fields = dict(items["dataset"])
    for key in ("image_shape", "eval_image_shape", "mean", "std", "class_names"):
        if info_fields.get(key) is not None:  # eval_image_shape: absent before it existed
            info_fields[key] = tuple(info_fields[key])
    info = data.DatasetInfo(**info_fields)
    config = complete_config(ml_collections.ConfigDict(items["config"]))
    saved = items["state"]
    weights = saved.get("ema") or saved  # a run with config.ema_decay evaluated its average
    state = TrainState(
        step=jax.numpy.asarray(step),
        params=weights["params"],
        batch_stats=weights.get("batch_stats", {}),
        opt_state=None,
    )
    return TrainedModel(step, config, info, models.create_model(config, info.num_classes), state)
