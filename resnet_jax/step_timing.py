"""Feeding and timing one compiled step: what `benchmark.py` measures, and how.

The batch is made on the devices (random uint8 images, already sharded) so that the figure is the
step's alone, or comes from the real input pipeline to show whether loading keeps up. Step times
come from a loop that keeps one step queued ahead: step i's completion is observed after step i+1
was dispatched, so the device never waits for the host and the interval between completions is
the step time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax import compiled_steps, costs, data, models, progress, train
from resnet_jax.step import rng_key

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax.monitoring event of a persistent-cache hit


def synthetic_batch(
    key: jax.Array, *, batch_size: int, image_shape: tuple[int, ...], num_classes: int, mask: bool
) -> dict[str, jax.Array]:
    """Random uint8 images and labels shaped like the loader's batches (with eval's mask if asked)."""
    image_key, label_key = jax.random.split(key)
    batch = {
        "image": jax.random.bits(image_key, (batch_size, *image_shape), jnp.uint8),
        "label": jax.random.randint(label_key, (batch_size,), 0, num_classes, jnp.int32),
    }
    if mask:
        batch["mask"] = jnp.ones((batch_size,), jnp.float32)
    return batch


def device_batches(
    steps: compiled_steps.CompiledSteps, batch_size: int, seed: int, mask: bool
) -> Iterator[dict]:
    """One batch made on the devices, already sharded like the step's input, then repeated."""
    info = steps.info
    make = jax.jit(
        functools.partial(
            synthetic_batch,
            batch_size=batch_size,
            image_shape=info.eval_image_shape if mask else info.image_shape,
            num_classes=info.num_classes,
            mask=mask,
        ),
        out_shardings=steps.batch_sharding,
    )
    return itertools.repeat(jax.block_until_ready(make(jax.random.key(seed))))


def pipeline_batches(
    steps: compiled_steps.CompiledSteps, dataset: data.Dataset, config: ml_collections.ConfigDict, mode: str
) -> Iterator[dict]:
    """Batches from the real input pipeline, turned into global arrays like `train.py` does (for
    training: its loader, workers and device prefetch)."""
    count, index = jax.process_count(), jax.process_index()
    if mode == "train":
        return (batch for _, batch in train.device_batches(steps, dataset))
    else:
        local = itertools.chain.from_iterable(
            data.eval_batches(
                dataset, global_batch_size=config.batch_size, process_index=index, process_count=count
            )
            for _ in itertools.count()
        )
    return (dataset.to_global(batch, steps.batch_sharding, train=False) for batch in local)


@contextlib.contextmanager
def count_cache_hits() -> Iterator[list[str]]:
    """The persistent compilation cache's hits while the block runs, from JAX's monitoring events."""
    hits: list[str] = []

    def listener(event: str, **_: Any) -> None:
        if event == CACHE_HIT_EVENT:
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(listener)


def time_steps(
    step: Callable[[Any, dict], tuple[Any, Any]], state: Any, batches: Iterator[dict], steps: int
) -> tuple[Any, list[float]]:
    """Run `steps` steps with one queued ahead; return the final state and each step's seconds."""
    times: list[float] = []
    if steps < 1:
        return state, times
    pending = None
    last = report = time.perf_counter()
    for i in range(steps):
        state, out = step(state, next(batches))
        if pending is not None:
            jax.block_until_ready(pending)
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if now - report > 10:
                progress.log(f"    step {i}/{steps}: {times[-1] * 1e3:.1f} ms", file=sys.stderr)
                report = now
        pending = out
    jax.block_until_ready(pending)
    times.append(time.perf_counter() - last)
    return state, times


@dataclasses.dataclass
class TimedStep:
    """One configuration compiled and ready to time; `state` is replaced by every timed run."""

    step: Callable[[Any, dict], tuple[Any, Any]]  # (state, batch) -> (state, outputs)
    state: Any
    batches: Iterator[dict]
    compiled: jax.stages.Compiled
    flops_per_device: float | None  # model FLOPs of one step on one device
    num_params: int
    init_seconds: float
    lowering_seconds: float
    xla_compile_seconds: float
    compile_cache_hit: bool = False  # loaded from the persistent cache: the compile time is a load time
    compile_cpu_seconds: float | None = None  # process CPU time of lowering + compiling (all threads)

    def run(self, steps: int) -> list[float]:
        """Time `steps` steps (carrying the state on, since the step donates it)."""
        self.state, times = time_steps(self.step, self.state, self.batches, steps)
        return times

    def trace(self, directory: str, steps: int) -> None:
        """`steps` steps traced with `jax.profiler` into `directory`, with the step's optimized HLO
        beside the trace (`trace_report` names the ops from it)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "step.hlo.txt"), "w") as f:
            f.write(self.compiled.as_text())
        jax.profiler.start_trace(directory)
        try:
            self.run(steps)
        finally:
            jax.profiler.stop_trace()
        with open(os.path.join(directory, "profile.json"), "w") as f:
            json.dump({"steps": steps}, f)


def compile_step(
    config: ml_collections.ConfigDict,
    dataset: data.Dataset,
    mesh: jax.sharding.Mesh,
    *,
    mode: str = "train",
    seed: int = 0,
    pipeline: bool = False,
) -> TimedStep:
    """Build the compiled steps, initialise the state, make the input, and lower + compile the step."""
    steps = compiled_steps.CompiledSteps(config, dataset.info, mesh)
    t0 = time.perf_counter()
    state = jax.block_until_ready(steps.init(rng_key(seed)))
    init_seconds = time.perf_counter() - t0

    train_mode = mode == "train"
    if not pipeline:
        batches = device_batches(steps, config.batch_size, seed, mask=not train_mode)
    else:
        batches = pipeline_batches(steps, dataset, config, mode)
    first = next(batches)

    jitted = steps.train_step if train_mode else steps.eval_step
    cpu0, t0 = time.process_time(), time.perf_counter()
    lowered = jitted.lower(state, first)
    t1 = time.perf_counter()
    with count_cache_hits() as hits:
        compiled = lowered.compile()
    t2, cpu2 = time.perf_counter(), time.process_time()
    return TimedStep(
        step=compiled if train_mode else (lambda s, b: (s, compiled(s, b))),
        state=state,
        batches=itertools.chain([first], batches),
        compiled=compiled,
        flops_per_device=costs.step_flops_per_device(lowered, mesh.devices.size),
        num_params=models.param_count(state.params),
        init_seconds=init_seconds,
        lowering_seconds=t1 - t0,
        xla_compile_seconds=t2 - t1,
        compile_cache_hit=bool(hits),
        compile_cpu_seconds=cpu2 - cpu0,
    )
