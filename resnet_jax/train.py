"""`train_and_evaluate`: a whole run from a config, driving the steps of `resnet_jax.step`.

`CompiledSteps` jit-compiles those steps once with explicit shardings over the device mesh (batch
split on `data`, state replicated, state buffers donated); the loop around them loads data, logs,
evaluates, checkpoints and handles preemption, with its bookkeeping in `resnet_jax.loop`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from resnet_jax import (
    checkpoint,
    data,
    finetune,
    inference,
    loop,
    metrics,
    models,
    optim,
    parallel,
    peers,
    prefetch,
    progress,
    watchdog,
    writers,
)
from resnet_jax import mixing as mixing_lib
from resnet_jax.config_checks import ConfigError, check_config, complete_config
from resnet_jax.errors import UserError
from resnet_jax.progress import log
from resnet_jax.step import TrainState, eval_logits, init_state, rng_key, train_step


def run_length(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> tuple[int, int]:
    """(steps per epoch, total steps)."""
    steps_per_epoch = max(1, info.num_train // config.batch_size)
    total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def model_and_optimizer(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, platform: str
) -> tuple[Any, optax.GradientTransformation, optax.Schedule]:
    """The config's model, optimizer (frozen backbone for linear probing) and learning-rate schedule."""
    model = models.create_model(config, info.num_classes, platform)
    tx, schedule = optim.create(config, *run_length(config, info))
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


def with_saved_values(
    config: ml_collections.ConfigDict, saved: dict[str, Any], keys: list[str]
) -> ml_collections.ConfigDict:
    """`config` with `keys` set back to their values in the saved config (JSON), completed and typed."""
    return complete_config(ml_collections.ConfigDict({**config.to_dict(), **{k: saved[k] for k in keys}}))


def keys_behind_layout(
    saved: dict[str, Any],
    saved_layout: checkpoint.Layout,
    config: ml_collections.ConfigDict,
    steps: CompiledSteps,
) -> list[str]:
    """The changed config keys that, set back to their saved values, give the saved state's layout:
    each alone if one does, else all of them together if that does, else none."""

    def layout_with(keys: list[str]) -> checkpoint.Layout | None:
        try:
            candidate = with_saved_values(config, saved, keys)
            return checkpoint.leaf_layout(abstract_state(candidate, steps.info, steps.platform))
        except Exception:  # a saved value this code no longer accepts
            return None

    changed = checkpoint.changed_keys(saved, config)
    alone = [key for key in changed if layout_with([key]) == saved_layout]
    if alone or not changed:
        return alone
    return changed if layout_with(changed) == saved_layout else []


class CompiledSteps:
    """A run's model, optimizer and schedule, and its init, train and eval steps jit-compiled over the
    mesh: what `train.py`, the benchmark and the preflight run. `config` must be checked
    (`check_config`); the dataset enters only through its `DatasetInfo`."""

    def __init__(self, config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh):
        self.config, self.info, self.mesh = config, info, mesh
        try:
            parallel.check_batch_size(
                "config.batch_size",
                config.batch_size,
                mesh,
                grad_accum_steps=config.grad_accum_steps,
                bn_group_size=config.bn_group_size,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.eval_batch_size = inference.eval_batch_size(config, mesh)
        self.steps_per_epoch, self.total_steps = run_length(config, info)
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
                label_smoothing=config.label_smoothing,
                loss=config.loss,
                bce_target_threshold=config.bce_target_threshold,
                skip_nonfinite=config.skip_nonfinite_steps,
                grad_accum_steps=config.grad_accum_steps,
                mixing=mixing_lib.Mixing.from_config(config),
                ema_decay=config.ema_decay,
                loss_scale_period=config.loss_scale_period,
                seed=config.seed,
                mean=info.mean,
                std=info.std,
                concat_grad_norm=mesh.devices.flat[0].platform == "cpu",
            ),
            in_shardings=(replicated, self.batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        self.eval_step = inference.compile_eval_step(self.model, info, mesh)


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
    """The config's dataset, normalised like the pretrained weights when fine-tuning."""
    dataset = data.load(config)
    if config.init_from:
        dataset = finetune.with_pretrained_normalization(dataset, config.init_from, log)
    return dataset


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train `config` in `workdir` (resuming from its checkpoints), evaluating on the whole eval split.

    Returns the final state; on SIGTERM/SIGINT it saves, logs `preempted at step S, checkpoint
    saved` and returns the state of that step.
    """
    fresh = not os.path.exists(workdir)
    config = check_config(config, workdir)  # creates the workdir
    try:
        mesh = parallel.create_mesh()
        dataset = load_dataset(config)
        steps = CompiledSteps(config, dataset.info, mesh)
    except UserError:
        if fresh:  # a refused run leaves no empty workdir behind
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise
    log_plan(config, steps, dataset.info, mesh)
    batches = device_batches(steps, dataset)
    if parallel.is_primary():
        data.write_class_names(dataset.info, workdir)
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    dog = watchdog.Watchdog(watchdog.Bounds(config.watchdog_seconds, config.watchdog_compile_seconds))
    with dog, peers.PeerMonitor():
        return run_loop(steps, dataset, batches, checkpoints, dog, workdir)


def run_loop(
    steps: CompiledSteps,
    dataset: data.Dataset,
    batches: prefetch.DevicePrefetch,
    checkpoints: checkpoint.Checkpoints,
    dog: watchdog.Watchdog,
    workdir: str,
) -> TrainState:
    """Restore or initialise, then train, log, evaluate and save; every unit of work is reported to
    `dog`, which ends the process when none completes in time."""
    config = steps.config
    t0 = time.perf_counter()
    with dog.long_operation("restoring or initialising the state"):
        state, start_step = restore_or_init(steps, checkpoints, batches)
    log(f"{models.param_count(state.params):,} parameters, ready in {time.perf_counter() - t0:.1f}s")
    if parallel.is_primary():
        overview_path, total_line = writers.write_parameter_overview(state.params, workdir)
        log(f"parameter overview ({total_line}): {overview_path}")

    total, steps_per_epoch = steps.total_steps, steps.steps_per_epoch
    writer = writers.create_writer(workdir, enabled=parallel.is_primary())
    writer.write_hparams(config.to_dict())
    bar = progress.Progress(
        total,
        start_step,
        steps_per_epoch,
        config.batch_size,
        mode=config.progress,
        enabled=parallel.is_primary(),
    )
    profiler = progress.StepProfiler(config.profile_steps, os.path.join(workdir, "profile"))
    with dog.long_operation("reading the eval images for TensorBoard"):
        write_eval_images = eval_image_writer(steps, dataset, config.eval_images, writer)
    log_cadence, eval_cadence, save_cadence = (
        loop.Cadence.from_config(every, steps_per_epoch, total)
        for every in (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
    )
    window = loop.ThroughputWindow(config.batch_size)
    # float16 overflows are expected: loss scaling skips those steps and adapts instead of stopping.
    guard = loop.NonFiniteGuard(enabled=not (config.skip_nonfinite_steps or steps.loss_scaling))
    skipped = loop.SkippedImages(loop.Cadence.from_config(0, steps_per_epoch, total))
    evaluated = False

    def save(step: int, eval_scalars: dict[str, float] | None) -> None:
        guard.check(checkpoints)
        with dog.long_operation(f"saving the checkpoint of step {step}"):
            checkpoints.save(
                step,
                state,
                config=config,
                dataset_info=dataset.info,
                data_iterator=batches,
                eval_metrics=eval_scalars,
            )

    peer_lost = None
    try:
        with checkpoint.PreemptionWatcher() as preemption:
            for step in range(start_step + 1, total + 1):
                first = step == start_step + 1
                # The first batch starts the loader's workers, and the first step compiles.
                phase = "loading the first batch and compiling the train step"
                with dog.long_operation(phase) if first else contextlib.nullcontext():
                    skipped_images, batch = next(batches)
                    skipped.add(skipped_images)
                    profiler.before_step(step)
                    state, step_metrics = steps.train_step(state, batch)
                    if first:
                        jax.block_until_ready(state)
                dog.track(f"train step {step}", step_metrics)
                bar.step(step)
                if profiler.finishes(step):
                    with dog.long_operation("writing the profile"):
                        profiler.after_step(step, state)
                    log(f"profile of steps {profiler.start}-{step} written to {profiler.directory}")
                window.add(step_metrics)
                guard.add(step, step_metrics)
                if first:
                    log(f"step {step} done: compile + first step {window.restart_clock():.1f}s")
                last = step == total
                if count := skipped.take(step):
                    progress.warn(f"epoch {step / steps_per_epoch:.0f}: skipped {count} unreadable image(s)")
                    writer.write_scalars(step, {"train_skipped_images": count})
                if log_cadence.due(step):
                    scalars = window.summary()
                    writer.write_scalars(step, scalars)
                    log(format_train_line(step, total, steps_per_epoch, scalars) + bar.eta_text(step))
                eval_scalars = None
                if eval_cadence.due(step):
                    eval_start = time.perf_counter()
                    bar.pause()
                    with (
                        dog.long_operation("the first evaluation")
                        if not evaluated
                        else contextlib.nullcontext()
                    ):
                        eval_scalars = evaluate_and_log(steps, dataset, state, step, last, dog)
                        writer.write_scalars(step, eval_scalars)
                        write_eval_images(state, step)
                    evaluated = True
                    bar.resume()
                    window.exclude(time.perf_counter() - eval_start)
                if save_cadence.due(step):
                    save(step, eval_scalars)
                if not last and preemption.should_stop(step):
                    save(step, None)
                    with dog.long_operation(f"finishing the checkpoint of step {step}"):
                        checkpoints.wait()
                    log(f"preempted at step {step}, checkpoint saved")
                    break
    except jax.errors.JaxRuntimeError as e:
        peer_lost = peers.lost_peer(e)
        if peer_lost is None:
            raise
        raise peer_lost from None
    finally:
        if peer_lost is None:  # a save in flight when a peer died can never complete
            with dog.long_operation("finishing the checkpoint writes"):
                checkpoints.close()  # finish in-flight saves, also when the run stops on an error
        bar.close()
        profiler.stop()
        writer.close()
        batches.close()  # stops grain's worker processes and frees their shared memory
    if start_step >= total:
        log(f"already trained to step {start_step} of {total}")
        with dog.long_operation("the first evaluation"):
            evaluate_and_log(steps, dataset, state, start_step, True, dog)
    return state


def device_batches(steps: CompiledSteps, dataset: data.Dataset) -> prefetch.DevicePrefetch:
    """(skipped image count, global batch) pairs, `config.device_prefetch` batches ahead on the
    devices; checkpoint-safe (`prefetch.DevicePrefetch`)."""
    config = steps.config
    loader = data.train_loader(
        dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=data.resolve_workers(config.num_workers, dataset),
        repeats=config.repeated_aug,
    )

    def to_device(local_batch: dict[str, np.ndarray]) -> tuple[Any, dict[str, jax.Array]]:
        skipped = local_batch.pop("skipped", None)
        return skipped, parallel.to_global(local_batch, steps.batch_sharding, config.batch_size)

    return prefetch.DevicePrefetch(loader, to_device, config.device_prefetch)


def log_plan(
    config: ml_collections.ConfigDict, steps: CompiledSteps, info: data.DatasetInfo, mesh: jax.sharding.Mesh
) -> None:
    log(
        f"{config.model} on {info.name}: {info.num_train} train / {info.num_eval} eval images "
        f"{'x'.join(map(str, info.image_shape))}, {info.num_classes} classes; {parallel.describe(mesh)}"
    )
    log(
        f"{steps.total_steps} steps ({steps.total_steps / steps.steps_per_epoch:.1f} epochs of "
        f"{steps.steps_per_epoch}), global batch {config.batch_size}, "
        f"{config.optimizer} lr {optim.learning_rate(config):g} ({config.lr_schedule}), "
        f"weight decay {optim.weight_decay(config):g} ({optim.weight_decay_mode(config)}), {config.dtype}"
    )


def restore_or_init(
    steps: CompiledSteps, checkpoints: checkpoint.Checkpoints, batches: Any
) -> tuple[TrainState, int]:
    """The latest good checkpoint of the workdir (checked against the config), or a fresh state."""
    config = steps.config
    key = rng_key(config.seed)
    abstract = checkpoint.with_sharding(jax.eval_shape(steps.init, key), parallel.replicated(steps.mesh))
    restored = checkpoints.restore_latest(
        abstract,
        batches,
        config,
        explain_layout=lambda saved, layout: keys_behind_layout(saved, layout, config, steps),
    )
    if restored is None:
        state = steps.init(key)
        if config.init_from:  # fine-tuning; a checkpoint of this workdir takes precedence
            state = finetune.start_from_pretrained(state, config.init_from, config.model, steps.tx, log)
        return state, 0
    step, items = restored
    changes = checkpoint.check_compatible(items["config"], config, step, checkpoints.directory)
    log(f"resumed from the checkpoint of step {step} in {checkpoints.directory}")
    for change in changes:
        log(f"  config changed since that checkpoint: {change}")
    if line := schedule_change(items["config"], config, steps.info, step):
        log(f"  {line}")
    return items["state"], step


def schedule_change(
    saved: dict[str, Any], config: ml_collections.ConfigDict, info: data.DatasetInfo, step: int
) -> str | None:
    """One line when the resumed run's learning-rate schedule differs from the saved run's at `step`:
    the keys that changed it, the rate before and after, and the new length (a finished run that is
    extended does not go on from its last rate; its schedule is stretched over the new length)."""

    def rate(cfg: ml_collections.ConfigDict) -> tuple[float, int]:
        steps_per_epoch, total = run_length(cfg, info)
        return float(optim.create_schedule(cfg, steps_per_epoch, total)(step)), total

    try:
        before = complete_config(ml_collections.ConfigDict(saved))
        (old, old_total), (new, new_total) = rate(before), rate(config)
    except Exception:  # a saved config this code no longer reads
        return None
    if np.isclose(old, new, rtol=1e-6, atol=0.0) and old_total == new_total:
        return None
    causes = []
    for key in checkpoint.changed_keys(saved, config):
        with contextlib.suppress(Exception):  # a saved value this code no longer accepts
            if rate(with_saved_values(config, saved, [key])) != (new, new_total):
                causes.append(f"{key} {saved[key]!r} -> {config[key]!r}")
    return (
        f"the learning-rate schedule changed ({', '.join(causes) or 'config'}): it now spans {new_total} "
        f"steps instead of {old_total}, and the rate at step {step} is {new:.4g} instead of {old:.4g}"
    )


def evaluate_and_log(
    steps: CompiledSteps,
    dataset: data.Dataset,
    state: TrainState,
    step: int,
    final: bool,
    dog: watchdog.Watchdog | None = None,
) -> dict[str, float]:
    start = time.perf_counter()
    track = (lambda i, outputs: dog.track(f"eval batch {i} at step {step}", outputs)) if dog else None
    result = inference.evaluate(
        steps.eval_step, state, dataset, batch_size=steps.eval_batch_size, mesh=steps.mesh, track=track
    )
    scalars = metrics.summarize(result, "eval")
    count = int(result.accuracy.count)
    log(
        f"{'final eval' if final else 'eval'} at step {step}: accuracy {scalars['eval_accuracy']:.2%} "
        f"({round(scalars['eval_accuracy'] * count)}/{count}), top-5 {scalars['eval_top5_accuracy']:.2%}, "
        f"loss {scalars['eval_loss']:.4f} [{time.perf_counter() - start:.1f}s]"
    )
    return scalars


def eval_image_writer(
    steps: CompiledSteps, dataset: data.Dataset, count: int, writer: writers.MultiWriter
) -> Any:
    """`write(state, step)`: the first `count` eval images with their predicted and true labels, as
    one captioned grid (TensorBoard tag `eval_predictions`). Every process predicts (the state is
    global); process 0 writes. count 0: nothing."""
    if count <= 0:
        return lambda state, step: None
    batch = next(data.eval_batches(dataset, global_batch_size=count))
    keep = batch["mask"] > 0
    images, labels = batch["image"][keep], batch["label"][keep]
    info = dataset.info
    logits = functools.partial(eval_logits, model=steps.model, mean=info.mean, std=info.std)
    predict = jax.jit(lambda state, images: logits(state, images).argmax(-1))

    def write(state: TrainState, step: int) -> None:
        predicted = np.asarray(jax.device_get(predict(state.for_eval(), images)))
        grid = writers.prediction_grid(images, labels.tolist(), predicted.tolist(), info.class_names)
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
