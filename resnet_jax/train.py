"""`train_and_evaluate`: a whole run from a config, driving the steps of `resnet_jax.step`.

`Trainer` jit-compiles those steps once with explicit shardings over the device mesh (batch
split on `data`, state replicated, state buffers donated); the loop around them loads data,
logs, evaluates, checkpoints and handles preemption.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from resnet_jax import checkpoint, data, metrics, models, optim, parallel, progress, sources, weights
from resnet_jax import mixing as mixing_lib
from resnet_jax.config_checks import ConfigError, check_config
from resnet_jax.step import (  # noqa: F401  (re-exported: train.TrainState, train.train_step, ...)
    TrainState,
    cross_entropy,
    eval_logits,
    eval_step,
    init_state,
    join_micro_batches,
    normalize,
    rng_key,
    soft_cross_entropy,
    split_micro_batches,
    state_from_variables,
    train_step,
    update_loss_scale,
)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> flax.linen.Module:
    return models.create(
        config.model,
        num_classes,
        dtype=config.dtype,
        zero_init_residual=config.get("zero_init_residual", True),
        bn_group_size=config.get("bn_group_size", 0),
        activation=config.get("activation", "relu"),
        drop_path_rate=config.get("drop_path_rate", 0.0),
        dropout_rate=config.get("dropout_rate", 0.0),
        frozen_norm=config.get("freeze_backbone", False),  # linear probing: BatchNorm stays as loaded
    )


def cadence(every: int, steps_per_epoch: int) -> int:
    """Config cadences: 0 means once per epoch."""
    return every if every > 0 else steps_per_epoch


def mixing_from_config(config: ml_collections.ConfigDict) -> mixing_lib.Mixing:
    return mixing_lib.Mixing(
        mixup_alpha=config.get("mixup_alpha", 0.0),
        cutmix_alpha=config.get("cutmix_alpha", 0.0),
        switch_prob=config.get("mixup_switch_prob", 0.5),
        prob=config.get("mixup_prob", 1.0),
    )


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
        if config.get("freeze_backbone", False):  # linear probing: only the classifier is updated
            self.tx = weights.freeze_backbone(self.tx)

        replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharding(mesh)
        self.batch_sharding = batch_sharding
        stats = dict(mean=info.mean, std=info.std)
        self.loss_scaling = config.dtype == "float16"
        self.init = jax.jit(
            functools.partial(
                init_state,
                self.model,
                self.tx,
                info.image_shape,
                ema=config.get("ema_decay", 0.0) > 0,
                loss_scale=config.get("loss_scale_init", 2.0**15) if self.loss_scaling else 0.0,
            ),
            out_shardings=replicated,
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
                mixing=mixing_from_config(config),
                ema_decay=config.get("ema_decay", 0.0),
                loss_scale_period=config.get("loss_scale_period", 2000),
                seed=config.seed,
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
        eval_state = state.for_eval()
        return metrics.merge_all(
            [
                parallel.in_order(self.eval_step(eval_state, parallel.to_global(b, self.batch_sharding)))
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
    if config.get("init_from"):
        dataset = weights.with_pretrained_normalization(dataset, config.init_from, log)
    trainer = Trainer(config, dataset, mesh)
    info = dataset.info
    log(
        f"{config.model} on {info.name}: {info.num_train} train / {info.num_eval} eval images "
        f"{'x'.join(map(str, info.image_shape))}, {info.num_classes} classes; {parallel.describe(mesh)}"
    )
    log(
        f"{trainer.total_steps} steps ({trainer.total_steps / trainer.steps_per_epoch:.1f} epochs of "
        f"{trainer.steps_per_epoch}), global batch {config.batch_size}, "
        f"{config.optimizer} lr {optim.learning_rate(config):g} ({config.lr_schedule}), "
        f"weight decay {optim.weight_decay(config):g} ({optim.weight_decay_mode(config)}), {config.dtype}"
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
    if parallel.is_primary():
        overview_path, total_line = metrics.write_parameter_overview(state.params, workdir)
        log(f"parameter overview ({total_line}): {overview_path}")

    writer = metrics.create_writer(workdir, enabled=parallel.is_primary())
    writer.write_hparams(config.to_dict())
    bar = progress.Progress(
        trainer.total_steps,
        start_step,
        trainer.steps_per_epoch,
        config.batch_size,
        mode=config.get("progress", "auto"),
        enabled=parallel.is_primary(),
    )
    profiler = progress.StepProfiler(config.get("profile_steps", ""), os.path.join(workdir, "profile"))
    write_eval_images = eval_image_writer(trainer, config.get("eval_images", 8), writer)
    log_every = cadence(config.log_every_steps, trainer.steps_per_epoch)
    eval_every = cadence(config.eval_every_steps, trainer.steps_per_epoch)
    save_every = cadence(config.checkpoint_every_steps, trainer.steps_per_epoch)
    # float16 overflows are expected: loss scaling skips those steps and adapts instead of stopping.
    skip_nonfinite = config.get("skip_nonfinite_steps", False) or trainer.loss_scaling

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
                profiler.before_step(step)
                state, step_metrics = trainer.train_step(state, batch)
                bar.step(step)
                if profiler.after_step(step, state):
                    log(f"profile of steps {profiler.start}-{step} written to {profiler.directory}")
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
                    line = format_train_line(step, trainer.total_steps, trainer.steps_per_epoch, scalars)
                    log(line + bar.eta_text(step))
                    pending, window_start, window_steps = [], time.perf_counter(), 0
                eval_scalars = None
                if step % eval_every == 0 or last:
                    eval_start = time.perf_counter()
                    bar.pause()
                    eval_scalars = evaluate_and_log(trainer, state, step, last)
                    writer.write_scalars(step, eval_scalars)
                    write_eval_images(state, step)
                    bar.resume()
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
        bar.close()
        profiler.stop()
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
    key = rng_key(trainer.config.seed)
    abstract = checkpoint.with_sharding(jax.eval_shape(trainer.init, key), parallel.replicated(trainer.mesh))
    restored = checkpoints.restore_latest(abstract, batches, trainer.config)
    if restored is None:
        state = trainer.init(key)
        if trainer.config.get("init_from"):  # fine-tuning; a checkpoint of this workdir takes precedence
            state = weights.start_from_pretrained(
                state, trainer.config.init_from, trainer.config.model, trainer.tx, log
            )
        return state, 0
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


def eval_image_writer(trainer: Trainer, count: int, writer: metrics.MultiWriter) -> Any:
    """`write(state, step)`: the first `count` eval images with their predicted and true labels, as
    one captioned grid (TensorBoard tag `eval_predictions`). Every process predicts (the state is
    global); process 0 writes. count 0: nothing."""
    if count <= 0:
        return lambda state, step: None
    batch = next(data.eval_batches(trainer.dataset, global_batch_size=count))
    keep = batch["mask"] > 0
    images, labels = batch["image"][keep], batch["label"][keep]
    info = trainer.dataset.info
    logits = functools.partial(eval_logits, model=trainer.model, mean=info.mean, std=info.std)
    predict = jax.jit(lambda state, images: logits(state, images).argmax(-1))

    def write(state: TrainState, step: int) -> None:
        predicted = np.asarray(jax.device_get(predict(state.for_eval(), images)))
        grid = metrics.prediction_grid(images, labels.tolist(), predicted.tolist(), info.class_names)
        writer.write_images(step, {"eval_predictions": grid})

    return write


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
USER_ERRORS = (
    ConfigError,
    sources.DatasetError,
    checkpoint.CheckpointError,
    NonFiniteError,
    weights.WeightsError,
)
