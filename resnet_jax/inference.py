"""Loading a trained run back from its checkpoints, for evaluation and prediction."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from resnet_jax import checkpoint, data, parallel
from resnet_jax.step import TrainState
from resnet_jax.train import create_model


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
            raise checkpoint.CheckpointError(
                f"{item!r}: expected --config.KEY=VALUE with one of: {', '.join(sorted(config))}"
            )
        old = config[key]
        if isinstance(old, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(old, int | float) and old is not None:
            value = type(old)(text)
        else:
            value = None if text == "None" else text
        config[key] = value


def replicated_target(checkpoints: checkpoint.Checkpoints, step: int) -> Any:
    """The saved state's shapes, replicated over this machine's devices.

    Restoring onto the saved shardings would fail when the checkpoint was written by another device
    layout (8 GPUs, two hosts) than the one evaluating it.
    """
    path = os.path.join(checkpoints.directory, str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata
    sharding = parallel.replicated(parallel.create_mesh())
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


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
    for key in ("image_shape", "mean", "std", "class_names"):
        info_fields[key] = tuple(info_fields[key])
    info = data.DatasetInfo(**info_fields)
    config = ml_collections.ConfigDict(items["config"])
    saved = items["state"]
    weights = saved.get("ema") or saved  # a run with config.ema_decay evaluated its average
    state = TrainState(
        step=jax.numpy.asarray(step),
        params=weights["params"],
        batch_stats=weights.get("batch_stats", {}),
        opt_state=None,
    )
    return TrainedModel(step, config, info, create_model(config, info.num_classes), state)
