"""A config's model, optimizer and schedule, and its init, train and eval steps jit-compiled once
over the device mesh: the batch split on `data`, the state replicated, its buffers donated.

What `train.py`, the benchmark and the preflight run; resuming (`resume`) rebuilds the abstract
state of a changed config from the same pieces to say which keys reshaped it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from resnet_jax import data, finetune, inference, models, optim, parallel
from resnet_jax.step import StepOptions, TrainState, concatenates_grad_norm, init_state, rng_key, train_step


def run_sizes(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh | None = None
) -> parallel.RunSizes:
    """`parallel.run_sizes` of this run (over `mesh`, or for the schedule alone without one)."""
    if mesh is None:
        return parallel.run_sizes(config, info.num_train)
    return parallel.run_sizes(config, info.num_train, mesh.devices.size, jax.process_count())


def model_and_optimizer(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, platform: str
) -> tuple[Any, optax.GradientTransformation, optax.Schedule]:
    """The config's model, optimizer (frozen backbone for linear probing) and learning-rate schedule."""
    model = models.create_model(config, info.num_classes, platform)
    sizes = run_sizes(config, info)
    tx, schedule = optim.create(config, sizes.steps_per_epoch, sizes.total_steps)
    if config.freeze_backbone:  # linear probing: only the classifier is updated
        tx = finetune.freeze_backbone(tx)
    return model, tx, schedule


def state_initializer(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, model: Any, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    """`init(rng)`: a fresh state with the parts the config asks for (EMA, float16's loss scale)."""
    return functools.partial(
        init_state,
        model,
        tx,
        info.image_shape,
        ema=config.ema_decay > 0,
        loss_scale=config.loss_scale_init if config.dtype == "float16" else 0.0,
    )


def abstract_state(config: ml_collections.ConfigDict, info: data.DatasetInfo, platform: str) -> TrainState:
    """The shapes and dtypes of the config's train state, without computing it."""
    model, tx, _ = model_and_optimizer(config, info, platform)
    return jax.eval_shape(state_initializer(config, info, model, tx), rng_key(config.seed))


class CompiledSteps:
    """A run's model, optimizer and schedule, and its init, train and eval steps jit-compiled over the
    mesh: what `train.py`, the benchmark and the preflight run. `config` must be checked
    (`check_config`); the dataset enters only through its `DatasetInfo`."""

    def __init__(self, config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh):
        self.config, self.info, self.mesh = config, info, mesh
        self.sizes = run_sizes(config, info, mesh)
        self.steps_per_epoch, self.total_steps = self.sizes.steps_per_epoch, self.sizes.total_steps
        self.eval_batch_size = inference.eval_batch_size(config, mesh)
        self.platform = mesh.devices.flat[0].platform
        self.model, self.tx, self.schedule = model_and_optimizer(config, info, self.platform)

        replicated, self.batch_sharding = parallel.replicated(mesh), parallel.data_sharding(mesh)
        self.loss_scaling = config.dtype == "float16"
        self.init = jax.jit(state_initializer(config, info, self.model, self.tx), out_shardings=replicated)
        self.train_step = jax.jit(
            functools.partial(
                train_step,
                model=self.model,
                tx=self.tx,
                schedule=self.schedule,
                mean=info.mean,
                std=info.std,
                options=StepOptions.from_config(config),
                concat_grad_norm=concatenates_grad_norm(config.grad_norm, mesh.devices.flat[0].platform),
            ),
            in_shardings=(replicated, self.batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        self.eval_step = inference.compile_eval_step(self.model, info, mesh)
