"""`train_and_evaluate`: a whole run from a config, driving the steps of `resnet_jax.step`.

`compiled_steps.CompiledSteps` jit-compiles those steps once over the device mesh; the loop around
them loads data, logs, evaluates, checkpoints and handles preemption, with its bookkeeping in
`resnet_jax.loop` and resuming in `resnet_jax.resume`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

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
from resnet_jax.compiled_steps import CompiledSteps
from resnet_jax.config_checks import check_config
from resnet_jax.errors import UserError
from resnet_jax.progress import log
from resnet_jax.resume import restore_or_init
from resnet_jax.step import TrainState, eval_logits


def load_dataset(
    config: ml_collections.ConfigDict,
) -> tuple[data.Dataset, finetune.Pretrained | None]:
    """The config's dataset and, when fine-tuning, the pretrained weights (read once, before
    anything compiles) with the dataset normalised like them."""
    dataset = data.load(config)
    if not config.init_from:
        return dataset, None
    pretrained = finetune.load_pretrained(config.init_from, config.model)
    return finetune.with_pretrained_normalization(dataset, pretrained, log), pretrained


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train `config` in `workdir` (resuming from its checkpoints), evaluating on the whole eval split.

    Returns the final state; on SIGTERM/SIGINT it saves, logs `preempted at step S, checkpoint
    saved` and returns the state of that step.
    """
    fresh = not os.path.exists(workdir)
    config = check_config(config, workdir)  # creates the workdir
    try:
        mesh = parallel.create_mesh()
        dataset, pretrained = load_dataset(config)
        steps = CompiledSteps(config, dataset.info, mesh)
    except UserError:
        if fresh:  # a refused run leaves no empty workdir behind
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise
    log_plan(config, steps, dataset.info, mesh)
    batches = device_batches(steps, dataset)
    if progress.is_primary():
        data.write_class_names(dataset.info, workdir)
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    dog = watchdog.Watchdog(watchdog.Bounds(config.watchdog_seconds, config.watchdog_compile_seconds))
    with dog, peers.PeerMonitor():
        return run_loop(steps, dataset, batches, checkpoints, dog, workdir, pretrained)


def run_loop(
    steps: CompiledSteps,
    dataset: data.Dataset,
    batches: prefetch.DevicePrefetch,
    checkpoints: checkpoint.Checkpoints,
    dog: watchdog.Watchdog,
    workdir: str,
    pretrained: finetune.Pretrained | None = None,
) -> TrainState:
    """Restore or initialise, then train, log, evaluate and save; every unit of work is reported to
    `dog`, which ends the process when none completes in time."""
    config = steps.config
    t0 = time.perf_counter()
    with dog.long_operation("restoring or initialising the state"):
        state, start_step = restore_or_init(steps, checkpoints, batches, pretrained)
    log(f"{models.param_count(state.params):,} parameters, ready in {time.perf_counter() - t0:.1f}s")
    if progress.is_primary():
        overview_path, total_line = writers.write_parameter_overview(state.params, workdir)
        log(f"parameter overview ({total_line}): {overview_path}")

    total, steps_per_epoch = steps.total_steps, steps.steps_per_epoch
    writer = writers.create_writer(workdir, enabled=progress.is_primary())
    # The rates the run uses (None in the config means the optimizer's default) and its real length.
    resolved = {"learning_rate": optim.learning_rate(config), "weight_decay": optim.weight_decay(config)}
    writer.write_hparams({**config.to_dict(), **resolved, "epochs": total / steps_per_epoch})
    bar = progress.Progress(
        total,
        start_step,
        steps_per_epoch,
        config.batch_size,
        mode=config.progress,
        enabled=progress.is_primary(),
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
                    scalars, history = window.summary()
                    writer.write_scalars(step, scalars, history)
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
        return skipped, dataset.to_global(local_batch, steps.batch_sharding, config.batch_size)

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
    one captioned grid (TensorBoard tag `eval/predictions`). Every process predicts (the state is
    global); process 0 writes. count 0: nothing."""
    if count <= 0:
        return lambda state, step: None
    batch = next(data.eval_batches(dataset, global_batch_size=count))
    keep = batch["mask"] > 0
    images, labels = dataset.host_images(batch)[keep], batch["label"][keep]
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
