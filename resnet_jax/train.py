"""Train state, the jit-compiled train and eval steps, and `train_and_evaluate`.

Gradients come from `jax.value_and_grad` only; the step is one `jax.jit` with
explicit shardings over the device mesh (batch split on `data`, state
replicated) and the state buffers donated.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax import checkpoint, data, metrics, models, optim, parallel, sources
from resnet_jax.config_checks import ConfigError, check_config


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> flax.linen.Module:
    return models.create(
        config.model,
        num_classes,
        dtype=config.dtype,
        zero_init_residual=config.get("zero_init_residual", True),
        bn_group_size=config.get("bn_group_size", 0),
        activation=config.get("activation", "relu"),
    )


def init_state(
    model: flax.linen.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], rng: jax.Array
) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 NHWC -> float32 standardised per channel (on the device, inside the step)."""
    return (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy(logits, targets)


def all_finite(tree: Any) -> jax.Array:
    """True when no leaf holds inf/NaN (a norm would overflow on large but finite values)."""
    return jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) with micro-batch i = examples i, i + k, i + 2k, ...

    Strided rather than contiguous, so that a batch sharded over devices stays where it is: each
    device's rows form its share of every micro-batch (the batch check makes them divide by k).
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def join_micro_batches(x: jax.Array) -> jax.Array:
    """The inverse of `split_micro_batches`: (k, B/k, ...) -> (B, ...) in the batch's order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulate_gradients(
    loss_and_grads: Any, state: TrainState, images: jax.Array, labels: jax.Array, k: int
) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], Any]:
    """`loss_and_grads` over k micro-batches, one after the other in a `lax.scan`.

    Returns what one call on the whole batch returns: the mean loss and gradient (the micro-batches
    are equal in size), the logits in the batch's order, and the batch_stats after the last
    micro-batch. BatchNorm normalises each micro-batch with its own statistics, and its running
    averages take k momentum updates per step.
    """

    def micro_step(carry, micro_batch):
        batch_stats, grad_sum = carry
        (loss, (logits, batch_stats)), grads = loss_and_grads(batch_stats, *micro_batch)
        return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads)), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    micro_batches = (split_micro_batches(images, k), split_micro_batches(labels, k))
    (batch_stats, grad_sum), (losses, logits) = jax.lax.scan(
        micro_step, (state.batch_stats, zeros), micro_batches
    )
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return (losses.mean(), (join_micro_batches(logits), batch_stats)), grads


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, metrics.TrainMetrics]:
    """One optimizer step; a non-finite loss or gradient is counted (and skipped if asked).

    With `grad_accum_steps` k > 1 the batch runs as k micro-batches (see `accumulate_gradients`)
    and the optimizer steps once on their mean gradient.
    """
    images = normalize(batch["image"], mean, std)

    def loss_and_grads(batch_stats, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = cross_entropy(logits, labels, label_smoothing).mean()
            return loss, (logits, updates["batch_stats"])

        return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    if grad_accum_steps == 1:
        (loss, (logits, batch_stats)), grads = loss_and_grads(state.batch_stats, images, batch["label"])
    else:
        (loss, (logits, batch_stats)), grads = accumulate_gradients(
            loss_and_grads, state, images, batch["label"], grad_accum_steps
        )
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(updates)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    if skip_nonfinite:
        keep_old = lambda new, old: jnp.where(finite, new, old)
        new_state = new_state.replace(
            params=jax.tree.map(keep_old, new_state.params, state.params),
            batch_stats=jax.tree.map(keep_old, new_state.batch_stats, state.batch_stats),
            opt_state=jax.tree.map(keep_old, new_state.opt_state, state.opt_state),
        )
    step_metrics = metrics.TrainMetrics.single_from_model_output(
        loss=loss,
        logits=logits,
        labels=batch["label"],
        learning_rate=schedule(state.step),
        grad_norm=grad_norm,
        nonfinite=(~finite).astype(jnp.int32),
    )
    return new_state, step_metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> metrics.EvalMetrics:
    """Running BatchNorm statistics; padded examples (mask 0) do not count."""
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        normalize(batch["image"], mean, std),
        train=False,
    )
    return metrics.EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, batch["label"]),
        logits=logits,
        labels=batch["label"],
        top5_correct=metrics.top5_correct(logits, batch["label"]),
        mask=batch["mask"],
    )


def cadence(every: int, steps_per_epoch: int) -> int:
    """Config cadences: 0 means once per epoch."""
    return every if every > 0 else steps_per_epoch


class Trainer:
    """Everything compiled and loaded for one run; `train_and_evaluate` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, dataset: data.Dataset, mesh: jax.sharding.Mesh):
        self.config, self.dataset, self.mesh = config, dataset, mesh
        info = dataset.info
        self.eval_batch_size = config.get("eval_batch_size", 0) or config.batch_size
        try:
            parallel.check_batch_size(
                "config.batch_size",
                config.batch_size,
                mesh,
                grad_accum_steps=config.get("grad_accum_steps", 1),
                bn_group_size=config.get("bn_group_size", 0),
            )
            parallel.check_batch_size("config.eval_batch_size", self.eval_batch_size, mesh)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.steps_per_epoch = max(1, info.num_train // config.batch_size)
        self.total_steps = (
            config.num_train_steps
            if config.num_train_steps > 0
            else int(config.num_epochs * self.steps_per_epoch)
        )
        self.model = create_model(config, info.num_classes)
        self.tx, self.schedule = optim.create(config, self.steps_per_epoch, self.total_steps)

        replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharding(mesh)
        self.batch_sharding = batch_sharding
        stats = dict(mean=info.mean, std=info.std)
        self.init = jax.jit(
            functools.partial(init_state, self.model, self.tx, info.image_shape), out_shardings=replicated
        )
        self.train_step = jax.jit(
            functools.partial(
                train_step,
                model=self.model,
                tx=self.tx,
                schedule=self.schedule,
                label_smoothing=config.label_smoothing,
                skip_nonfinite=config.get("skip_nonfinite_steps", False),
                grad_accum_steps=config.get("grad_accum_steps", 1),
                **stats,
            ),
            in_shardings=(replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            functools.partial(eval_step, model=self.model, **stats),
            in_shardings=(replicated, batch_sharding),
            out_shardings=replicated,
        )

    def evaluate(self, state: TrainState) -> metrics.EvalMetrics:
        batches = data.eval_batches(
            self.dataset,
            global_batch_size=self.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return metrics.merge_all(
            [
                parallel.in_order(self.eval_step(state, parallel.to_global(b, self.batch_sharding)))
                for b in batches
            ]
        )


class NonFiniteError(RuntimeError):
    """The loss or a gradient became inf/NaN; the message names the step and the last good checkpoint."""


def first_nonfinite_step(window: list[tuple[int, metrics.TrainMetrics]]) -> int | None:
    counts = jax.device_get([m.nonfinite_steps.total for _, m in window])
    return next((step for (step, _), count in zip(window, counts, strict=True) if count), None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train `config` in `workdir` (resuming from its checkpoints), evaluating on the whole eval split.

    Returns the final state; on SIGTERM/SIGINT it saves, logs `preempted at step S, checkpoint
    saved` and returns the state of that step.
    """
    check_config(config, workdir)
    mesh = parallel.create_mesh()
    dataset = data.load(config)
    trainer = Trainer(config, dataset, mesh)
    info = dataset.info
    log(
        f"{config.model} on {info.name}: {info.num_train} train / {info.num_eval} eval images "
        f"{'x'.join(map(str, info.image_shape))}, {info.num_classes} classes; {parallel.describe(mesh)}"
    )
    log(
        f"{trainer.total_steps} steps ({trainer.total_steps / trainer.steps_per_epoch:.1f} epochs of "
        f"{trainer.steps_per_epoch}), global batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate}"
    )
    num_workers = data.resolve_workers(config.get("num_workers", 0), dataset)
    batches = data.train_loader(
        dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=num_workers,
    )
    if parallel.is_primary():
        data.write_class_names(info, workdir)
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.get("keep_checkpoints", 3))
    t0 = time.perf_counter()
    state, start_step = restore_or_init(trainer, checkpoints, batches)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(f"{num_params:,} parameters, ready in {time.perf_counter() - t0:.1f}s")

    writer = metrics.MetricWriter(workdir, enabled=parallel.is_primary())
    writer.write_hparams(config.to_dict())
    log_every = cadence(config.log_every_steps, trainer.steps_per_epoch)
    eval_every = cadence(config.eval_every_steps, trainer.steps_per_epoch)
    save_every = cadence(config.checkpoint_every_steps, trainer.steps_per_epoch)
    skip_nonfinite = config.get("skip_nonfinite_steps", False)

    def save(step: int, eval_scalars: dict[str, float] | None) -> None:
        if not skip_nonfinite:
            bad = first_nonfinite_step(unchecked)
            if bad is not None:
                checkpoints.wait()
                saved = checkpoints.steps()
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {bad}; the run stopped and this state was not "
                    f"saved. Last good checkpoint: {f'step {saved[-1]}' if saved else 'none'} in "
                    f"{checkpoints.directory}. Lower the learning rate, set config.grad_clip_norm, or "
                    "set config.skip_nonfinite_steps=True"
                )
        unchecked.clear()
        checkpoints.save(
            step, state, config=config, dataset_info=info, data_iterator=batches, eval_metrics=eval_scalars
        )

    pending: list[metrics.TrainMetrics] = []
    unchecked: list[tuple[int, metrics.TrainMetrics]] = []
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    skipped = 0  # unreadable files the loader passed over this epoch (folder datasets)
    try:
        with checkpoint.PreemptionWatcher() as preemption:
            for step in range(start_step + 1, trainer.total_steps + 1):
                local_batch = next(batches)
                skipped += int(local_batch.pop("skipped", np.zeros(1)).sum())
                batch = parallel.to_global(local_batch, trainer.batch_sharding, config.batch_size)
                state, step_metrics = trainer.train_step(state, batch)
                pending.append(step_metrics)
                unchecked.append((step, step_metrics))
                window_steps += 1
                if step == start_step + 1:
                    jax.block_until_ready(state)
                    log(f"step {step} done: compile + first step {time.perf_counter() - window_start:.1f}s")
                    window_start, window_steps = time.perf_counter(), 0
                last = step == trainer.total_steps
                if skipped and (step % trainer.steps_per_epoch == 0 or last):
                    epoch = step / trainer.steps_per_epoch
                    metrics.warn(f"epoch {epoch:.0f}: skipped {skipped} unreadable image(s)")
                    writer.write_scalars(step, {"train_skipped_images": skipped})
                    skipped = 0
                if step % log_every == 0 or last:
                    scalars = metrics.summarize(metrics.merge_all(pending), "train")
                    elapsed = time.perf_counter() - window_start
                    if window_steps:
                        scalars["steps_per_sec"] = window_steps / elapsed
                        scalars["images_per_sec"] = window_steps * config.batch_size / elapsed
                    writer.write_scalars(step, scalars)
                    log(format_train_line(step, trainer.total_steps, trainer.steps_per_epoch, scalars))
                    pending, window_start, window_steps = [], time.perf_counter(), 0
                eval_scalars = None
                if step % eval_every == 0 or last:
                    eval_start = time.perf_counter()
                    eval_scalars = evaluate_and_log(trainer, state, step, last)
                    writer.write_scalars(step, eval_scalars)
                    window_start += time.perf_counter() - eval_start
                if step % save_every == 0 or last:
                    save(step, eval_scalars)
                if not last and preemption.should_stop(step):
                    save(step, None)
                    checkpoints.wait()
                    log(f"preempted at step {step}, checkpoint saved")
                    break
    finally:
        checkpoints.close()  # finish in-flight saves, also when the run stops on an error
        writer.close()
        batches.close()  # stops grain's worker processes and frees their shared memory
    if start_step >= trainer.total_steps:
        log(f"already trained to step {start_step} of {trainer.total_steps}")
        evaluate_and_log(trainer, state, start_step, True)
    return state


def restore_or_init(
    trainer: Trainer, checkpoints: checkpoint.Checkpoints, batches: Any
) -> tuple[TrainState, int]:
    """The latest good checkpoint of the workdir (checked against the config), or a fresh state."""
    key = jax.random.key(trainer.config.seed)
    abstract = checkpoint.with_sharding(jax.eval_shape(trainer.init, key), parallel.replicated(trainer.mesh))
    restored = checkpoints.restore_latest(abstract, batches, trainer.config)
    if restored is None:
        return trainer.init(key), 0
    step, items = restored
    changes = checkpoint.check_compatible(items["config"], trainer.config, step, checkpoints.directory)
    log(f"resumed from the checkpoint of step {step} in {checkpoints.directory}")
    for change in changes:
        log(f"  config changed since that checkpoint: {change}")
    return items["state"], step


def evaluate_and_log(trainer: Trainer, state: TrainState, step: int, final: bool) -> dict[str, float]:
    start = time.perf_counter()
    result = trainer.evaluate(state)
    scalars = metrics.summarize(result, "eval")
    count = int(result.accuracy.count)
    log(
        f"{'final eval' if final else 'eval'} at step {step}: accuracy {scalars['eval_accuracy']:.2%} "
        f"({round(scalars['eval_accuracy'] * count)}/{count}), top-5 {scalars['eval_top5_accuracy']:.2%}, "
        f"loss {scalars['eval_loss']:.4f} [{time.perf_counter() - start:.1f}s]"
    )
    return scalars


def format_train_line(step: int, total: int, steps_per_epoch: int, scalars: dict[str, float]) -> str:
    line = (
        f"step {step}/{total} (epoch {step / steps_per_epoch:.1f}) | loss {scalars['train_loss']:.4f} "
        f"| accuracy {scalars['train_accuracy']:.2%} | lr {scalars['learning_rate']:.4g}"
    )
    if "steps_per_sec" in scalars:
        line += f" | {scalars['steps_per_sec']:.1f} steps/s, {scalars['images_per_sec']:.0f} img/s"
    return line


log = metrics.log
# Errors whose message is the whole story: the CLI prints them without a traceback.
USER_ERRORS = (ConfigError, sources.DatasetError, checkpoint.CheckpointError, NonFiniteError)
