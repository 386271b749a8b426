"""Fine-tuning: start a run from pretrained weights (`config.init_from`), or train only its classifier.

The weights come from `python -m resnet_jax.convert` (PyTorch weights) or from another training
workdir; the classifier starts fresh when the new dataset has another number of classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from resnet_jax import checkpoint, step
from resnet_jax.inference import load_trained
from resnet_jax.weights import WeightsError

HEAD = "fc"


def transfer(
    pretrained: Mapping[str, Any], fresh: Mapping[str, Any], log: Callable[[str], None] = print
) -> Any:
    """The pretrained variables in the shapes of `fresh` (a new model's init): every backbone variable is
    taken over (shapes must agree), and the classifier too when its shape matches; otherwise the new
    head keeps its fresh initialisation."""
    result = {}
    for collection, tree in fresh.items():
        flat_fresh = traverse_util.flatten_dict(tree)
        flat_old = traverse_util.flatten_dict(dict(pretrained.get(collection, {})))
        missing = [path for path in flat_fresh if path not in flat_old]
        misshapen = [
            path
            for path in flat_fresh
            if path in flat_old and np.shape(flat_old[path]) != np.shape(flat_fresh[path])
        ]
        backbone_problems = [p for p in missing + misshapen if p[0] != HEAD]
        if backbone_problems:
            raise WeightsError(
                f"the pretrained {collection} do not fit this model: "
                + ", ".join("/".join(p) for p in backbone_problems[:12])
            )
        head_reset = any(p[0] == HEAD for p in missing + misshapen)
        if head_reset and collection == "params":
            old = flat_old.get((HEAD, "kernel"))
            new = flat_fresh[(HEAD, "kernel")]
            outputs = np.shape(old)[-1] if old is not None else "no"
            log(
                f"new classifier: the pretrained fc has {outputs} outputs and this dataset "
                f"{new.shape[-1]} classes; fc starts from a fresh initialisation"
            )
        flat = {
            path: flat_fresh[path] if path[0] == HEAD and head_reset else flat_old[path]
            for path in flat_fresh
        }
        result[collection] = traverse_util.unflatten_dict(flat)
    return result


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """The weights of `config.init_from`, read once before anything compiles: a wrong directory or
    another model is refused early, and the data is normalised like the weights' own."""

    directory: str
    model: str
    variables: dict[str, Any]  # params and batch_stats
    mean: tuple[float, ...]  # the input statistics the weights were trained with
    std: tuple[float, ...]


def load_pretrained(directory: str, model_name: str) -> Pretrained:
    """The latest checkpoint in `directory` (the output of `python -m resnet_jax.convert` or a
    training workdir), which must hold `model_name` weights; `WeightsError` otherwise."""
    try:
        trained = load_trained(directory)
    except checkpoint.CheckpointError as e:
        raise WeightsError(f"config.init_from={directory!r}: {e}") from None
    if trained.config.model != model_name:
        raise WeightsError(
            f"config.init_from={directory!r} holds {trained.config.model} weights and "
            f"config.model={model_name!r}; set config.model={trained.config.model!r}"
        )
    variables = {"params": trained.state.params, "batch_stats": trained.state.batch_stats}
    return Pretrained(directory, model_name, variables, tuple(trained.info.mean), tuple(trained.info.std))


def with_pretrained_normalization(dataset: Any, pretrained: Pretrained, log: Callable[[str], None]) -> Any:
    """`dataset` normalised like the data the `pretrained` weights were trained on.

    Pretrained features expect their own input statistics (ImageNet's mean/std for torchvision
    weights); a folder's own statistics would shift every activation, which a frozen backbone
    (linear probing) cannot undo. Keeps the dataset's statistics when the channel counts differ.
    """
    mean, std = pretrained.mean, pretrained.std
    if len(mean) != len(dataset.info.mean):
        return dataset
    log(f"normalising inputs like the pretrained weights: mean {mean}, std {std}")
    return dataclasses.replace(dataset, info=dataclasses.replace(dataset.info, mean=mean, std=std))


def start_from_pretrained(
    state: Any, pretrained: Pretrained, tx: optax.GradientTransformation, log: Callable[[str], None]
) -> Any:
    """A fresh `TrainState` whose weights come from `pretrained` (see `transfer`); the optimizer state
    (and the EMA, if the run keeps one) start from them. Arrays keep the fresh state's shardings."""
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    variables = jax.tree.map(
        lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
        transfer(pretrained.variables, fresh, log),
        fresh,
    )
    log(f"initialised from the {pretrained.model} weights in {pretrained.directory}")
    pretrained_state = step.state_from_variables(variables, tx, ema=bool(state.ema))
    return pretrained_state.replace(step=state.step, loss_scale=state.loss_scale)


def head_labels(params: Any) -> Any:
    """'train' for the classifier, 'freeze' for everything else (linear probing)."""
    return {
        key: jax.tree.map(lambda _, k=key: "train" if k == HEAD else "freeze", value)
        for key, value in params.items()
    }


def freeze_backbone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Only the classifier learns: every other parameter's update is zero (and has no optimizer state)."""
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, head_labels)
