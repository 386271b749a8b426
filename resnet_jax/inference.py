"""Inference without an optimizer: the compiled eval step, a whole-split evaluation, and loading a
trained run back from its checkpoints for `evaluate` and `predict`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from resnet_jax import checkpoint, data, metrics, models, parallel
from resnet_jax.cli import apply_config_overrides
from resnet_jax.config_checks import check_config, complete_config
from resnet_jax.step import TrainState, eval_step

EvalStep = Callable[[TrainState, dict[str, jax.Array]], metrics.EvalMetrics]


def eval_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> int:
    """`config.eval_batch_size`, or `batch_size` when it is 0; checked to split over `mesh` if given."""
    size = config.eval_batch_size or config.batch_size
    if mesh is not None:
        parallel.check_batch_size("config.eval_batch_size", size, mesh)
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
    track: Callable[[int, metrics.EvalMetrics], None] | None = None,
) -> metrics.EvalMetrics:
    """Metrics over the whole eval split (each image once, padding masked) of `state.for_eval()`.

    `track(i, outputs)` hears of each dispatched batch (the training loop's watchdog).
    """
    batches = data.eval_batches(
        dataset,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_state, sharding = state.for_eval(), parallel.data_sharding(mesh)
    results = []
    for i, batch in enumerate(batches):
        results.append(compiled_eval_step(eval_state, dataset.to_global(batch, sharding, train=False)))
        if track is not None:
            track(i, results[-1])
        parallel.in_order(results[-1])
    return metrics.merge_all(results)


@dataclasses.dataclass
class TrainedModel:
    step: int
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    model: Any
    state: TrainState  # params and batch_stats (their EMA if the run kept one); no optimizer state


def replicated_target(checkpoints: checkpoint.Checkpoints, step: int) -> Any:
    """The saved state's shapes, replicated over this machine's devices.

    Restoring onto the saved shardings would fail when the checkpoint was written by another device
    layout (8 GPUs, two hosts) than the one evaluating it.
    """
    path = os.path.join(checkpoints.directory, str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata
    return checkpoint.with_sharding(tree, parallel.replicated(parallel.create_mesh()))


def load_trained(workdir: str, which: str | int = "latest", overrides: Sequence[str] = ()) -> TrainedModel:
    """One checkpoint's params and batch_stats, with the config and dataset metadata saved beside them.

    `overrides` (`--config.KEY=VALUE`, such as `--config.dtype=bfloat16`) change the saved config
    before the model is built from it.
    """
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
    if overrides:
        config = check_config(apply_config_overrides(config, overrides))
    saved = items["state"]
    weights = saved.get("ema") or saved  # a run with config.ema_decay evaluated its average
    state = TrainState(
        step=jax.numpy.asarray(step),
        params=weights["params"],
        batch_stats=weights.get("batch_stats", {}),
        opt_state=None,
    )
    return TrainedModel(step, config, info, models.create_model(config, info.num_classes), state)
