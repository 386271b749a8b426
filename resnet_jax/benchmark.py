"""Throughput, compile time, MFU and memory of the real train (or eval) step.

What is timed is exactly what `train.py` runs: `train.CompiledSteps` builds the model,
the optimizer from the config, and the jit-compiled `train_step`/`eval_step` with
the mesh shardings and buffer donation; this module only feeds it and measures.
By default the batch is made on the devices (random uint8 images, already
sharded), so that the figure is the step's alone; `data=SPEC` feeds the same
step from the real input pipeline instead, to show whether loading keeps up.

Step times come from a loop that keeps one step queued ahead: step i's
completion is observed after step i+1 was dispatched, so the device never waits
for the host and the interval between completions is the step time.
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import data, models, parallel, targets, train
from resnet_jax.config_checks import ConfigError, check_config
from resnet_jax.errors import UserError, check_choice
from resnet_jax.step import rng_key

MODES = ("train", "eval")
DEVICE_DATA = "device"  # the `data` value of rows whose batches were made on the devices
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax.monitoring event of a persistent-cache hit


class BenchmarkError(UserError, ValueError):
    """A benchmark setting that cannot work; raised before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What to measure. Lists are swept: one row per (model, image size, dtype, batch size)."""

    models: tuple[str, ...] = ("resnet50",)
    batch_sizes: tuple[int, ...] = ()  # global, over all devices and hosts
    per_device_batch_sizes: tuple[int, ...] = ()  # alternative to batch_sizes
    image_sizes: tuple[int, ...] = (224,)
    dtypes: tuple[str, ...] = ("float32",)
    steps: int = 50
    warmup_steps: int = 5
    mode: str = "train"
    peak_tflops: float | None = None  # per device; overrides targets.ACCELERATORS
    data: str | None = None  # None: batches made on the devices; else a dataset spec
    seed: int = 0
    # Seconds for the whole sweep: a configuration that would likely end past them is skipped (and
    # said so), judged by the longest configuration so far. None: no limit.
    time_budget_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of a sweep."""

    model: str
    image_size: int
    dtype: str
    batch_size: int  # global


# ---------------------------------------------------------------- planning and checks


def parse_sizes(flag: str, values: Sequence[str] | None) -> tuple[int, ...]:
    """Command-line list values -> positive ints, with the flag named in the error."""
    sizes = []
    for value in values or ():
        try:
            size = int(value)
        except ValueError:
            raise BenchmarkError(f"{flag}={value!r} is not an integer") from None
        if size < 1:
            raise BenchmarkError(f"{flag}={value!r} must be a positive integer")
        sizes.append(size)
    return tuple(sizes)


def global_batch_sizes(options: Options, num_devices: int) -> tuple[int, ...]:
    if options.batch_sizes and options.per_device_batch_sizes:
        raise BenchmarkError("give --batch_size or --per_device_batch_size, not both")
    if options.per_device_batch_sizes:
        return tuple(b * num_devices for b in options.per_device_batch_sizes)
    if options.batch_sizes:
        return options.batch_sizes
    raise BenchmarkError("give --batch_size (global) or --per_device_batch_size")


def check_options(options: Options, mesh: jax.sharding.Mesh) -> None:
    """Raise `BenchmarkError` for the first setting that cannot work (before any compile)."""
    if not options.models or not options.dtypes or not options.image_sizes:
        raise BenchmarkError("--model, --dtype and --image_size need at least one value")
    for flag, sizes in (
        ("--batch_size", options.batch_sizes),
        ("--per_device_batch_size", options.per_device_batch_sizes),
        ("--image_size", options.image_sizes),
    ):
        for size in sizes:
            if size < 1:
                raise BenchmarkError(f"{flag}={size} must be a positive integer")
    if options.steps < 1:
        raise BenchmarkError(f"--steps={options.steps} must be a positive integer")
    if options.warmup_steps < 0:
        raise BenchmarkError(f"--warmup_steps={options.warmup_steps} must be 0 or more")
    if options.peak_tflops is not None and not options.peak_tflops > 0:
        raise BenchmarkError(f"--peak_tflops={options.peak_tflops} must be a positive number")
    if options.time_budget_s is not None and not options.time_budget_s > 0:
        raise BenchmarkError(f"--time_budget_s={options.time_budget_s} must be a positive number")
    try:
        for name in options.models:
            check_choice("--model", name, models.names())
        for dtype in options.dtypes:
            check_choice("--dtype", dtype, tuple(models.DTYPES))
        check_choice("--mode", options.mode, MODES)
        if options.data is not None:
            data.parse_spec(options.data)
        for batch_size in global_batch_sizes(options, mesh.devices.size):
            parallel.check_batch_size("--batch_size", batch_size, mesh)
    except BenchmarkError:
        raise
    except ValueError as e:
        raise BenchmarkError(str(e).replace("dataset=", "--data=")) from None


def plan(options: Options, mesh: jax.sharding.Mesh) -> list[Case]:
    """Every configuration of the sweep, checked."""
    check_options(options, mesh)
    return [
        Case(model, size, dtype, batch)
        for model, size, dtype, batch in itertools.product(
            options.models,
            options.image_sizes,
            options.dtypes,
            global_batch_sizes(options, mesh.devices.size),
        )
    ]


def case_config(base: ml_collections.ConfigDict, case: Case, options: Options) -> ml_collections.ConfigDict:
    """The training config of one case: `base`'s recipe (optimizer, ...) at the case's sizes."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.model = case.model
    config.dtype = case.dtype
    config.image_size = case.image_size
    config.batch_size = case.batch_size
    config.eval_batch_size = case.batch_size
    config.dataset = options.data or "synthetic"
    config.num_train_steps = options.warmup_steps + options.steps + 2
    config.seed = options.seed
    try:
        return check_config(config)
    except ConfigError as e:
        raise BenchmarkError(str(e)) from None


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
    """The dataset of `--data`, with its loading errors turned into one clear message."""
    try:
        return data.load(config)
    except (ValueError, NotImplementedError, OSError) as e:
        raise BenchmarkError(f"--data={config.dataset!r} cannot be loaded: {e}") from None


# ---------------------------------------------------------------- figures


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
    """Advertised dense peak FLOP/s of one device for `dtype` (`targets.ACCELERATORS`); None if unknown."""
    accelerator = targets.accelerator_for_kind(device_kind)
    return accelerator.peak_flops.get(dtype) if accelerator else None


def step_flops_per_device(lowered: jax.stages.Lowered, num_devices: int) -> float | None:
    """The model FLOPs of one step on one device: XLA's count of the lowered program over the devices.

    Counted before compilation (`models.xla_flops`): the lowered program is the whole step, the
    same on every backend, while a GPU's compiled cost analysis omits the cuDNN convolutions (on an
    H200 it gave 1/55 of the ResNet-50 step's FLOPs). The step is data-parallel, so each device does
    a 1/N share (the replicated optimizer update, a sliver of the total, is counted once).
    """
    flops = models.xla_flops(lowered)
    return flops / num_devices if flops else None


def mfu(flops_per_device: float | None, step_seconds: float, peak_per_device: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s of one device over its peak; None if either is unknown."""
    if not flops_per_device or not peak_per_device or step_seconds <= 0:
        return None
    return flops_per_device / step_seconds / peak_per_device


def peak_memory_bytes(devices: Sequence[jax.Device]) -> int | None:
    """The process's high-water mark of device memory (the largest over local devices), if reported.

    Backends cannot reset it, so in a sweep it is the largest of this and earlier configurations.
    """
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - not implemented on some backends
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Per-device memory the compiled step needs (arguments + outputs + temporaries - donated)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(total)


def environment(devices: Sequence[jax.Device]) -> dict[str, Any]:
    """Where the figures were taken: device kind and count, processes, library versions."""
    import flax
    import jaxlib

    kinds = sorted({d.device_kind for d in devices})
    return {
        "device_kind": kinds[0] if len(kinds) == 1 else ", ".join(kinds),
        "platform": devices[0].platform,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
    }


# ---------------------------------------------------------------- running


def progress(message: str) -> None:
    """Progress goes to stderr (process 0), so that stdout holds only the table."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


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


def device_batches(steps: train.CompiledSteps, batch_size: int, seed: int, mask: bool) -> Iterator[dict]:
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
    steps: train.CompiledSteps, dataset: data.Dataset, config: ml_collections.ConfigDict, mode: str
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
    return (parallel.to_global(batch, steps.batch_sharding) for batch in local)


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
                progress(f"    step {i}/{steps}: {times[-1] * 1e3:.1f} ms")
                report = now
        pending = out
    jax.block_until_ready(pending)
    times.append(time.perf_counter() - last)
    return state, times


@dataclasses.dataclass
class CompiledCase:
    """One configuration compiled and ready to time; `state` is replaced by every timed run."""

    case: Case
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


def compile_case(
    case: Case,
    options: Options,
    config: ml_collections.ConfigDict,
    dataset: data.Dataset,
    mesh: jax.sharding.Mesh,
) -> CompiledCase:
    """Build the compiled steps, initialise the state, make the input, and lower + compile the step."""
    steps = train.CompiledSteps(config, dataset.info, mesh)
    t0 = time.perf_counter()
    state = jax.block_until_ready(steps.init(rng_key(options.seed)))
    init_seconds = time.perf_counter() - t0

    train_mode = options.mode == "train"
    if options.data is None:
        batches = device_batches(steps, case.batch_size, options.seed, mask=not train_mode)
    else:
        batches = pipeline_batches(steps, dataset, config, options.mode)
    first = next(batches)

    jitted = steps.train_step if train_mode else steps.eval_step
    cpu0, t0 = time.process_time(), time.perf_counter()
    lowered = jitted.lower(state, first)
    t1 = time.perf_counter()
    with count_cache_hits() as hits:
        compiled = lowered.compile()
    t2, cpu2 = time.perf_counter(), time.process_time()
    return CompiledCase(
        case=case,
        step=compiled if train_mode else (lambda s, b: (s, compiled(s, b))),
        state=state,
        batches=itertools.chain([first], batches),
        compiled=compiled,
        flops_per_device=step_flops_per_device(lowered, mesh.devices.size),
        num_params=models.param_count(state.params),
        init_seconds=init_seconds,
        lowering_seconds=t1 - t0,
        xla_compile_seconds=t2 - t1,
        compile_cache_hit=bool(hits),
        compile_cpu_seconds=cpu2 - cpu0,
    )


def figures(
    compiled: CompiledCase,
    times: Sequence[float],
    options: Options,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    """The row of one configuration from its compiled step and its step times."""
    case = compiled.case
    seconds = np.asarray(times)
    step_seconds = float(seconds.mean())
    devices = mesh.devices.size
    flops = compiled.flops_per_device
    env = environment(list(mesh.devices.flat))
    peak = options.peak_tflops * 1e12 if options.peak_tflops else None
    if peak is None and "," not in env["device_kind"]:
        peak = peak_flops_per_device(env["device_kind"], case.dtype)
    images_per_sec = case.batch_size / step_seconds
    return {
        "model": case.model,
        "mode": options.mode,
        "batch_size": case.batch_size,
        "per_device_batch_size": case.batch_size // devices,
        "image_size": case.image_size,
        "dtype": case.dtype,
        "data": options.data or DEVICE_DATA,
        "optimizer": config.optimizer,
        "num_params": int(compiled.num_params),
        "steps": len(times),
        "warmup_steps": options.warmup_steps,
        "images_per_sec": images_per_sec,
        "images_per_sec_per_device": images_per_sec / devices,
        "step_time_median_ms": float(np.median(seconds)) * 1e3,
        "step_time_p90_ms": float(np.percentile(seconds, 90)) * 1e3,
        "step_time_mean_ms": step_seconds * 1e3,
        "compile_seconds": compiled.lowering_seconds + compiled.xla_compile_seconds,
        "lowering_seconds": compiled.lowering_seconds,
        "xla_compile_seconds": compiled.xla_compile_seconds,
        "compile_cache_hit": compiled.compile_cache_hit,
        "compile_cpu_seconds": compiled.compile_cpu_seconds,
        "init_seconds": compiled.init_seconds,
        "flops_per_step_per_device": flops,
        "flops_per_image": flops * devices / case.batch_size if flops else None,
        "tflops_per_sec_per_device": flops / step_seconds / 1e12 if flops else None,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": mfu(flops, step_seconds, peak),
        "peak_memory_bytes": peak_memory_bytes(jax.local_devices()),
        "compiled_memory_bytes": compiled_memory_bytes(compiled.compiled),
        **env,
    }


def run_case(
    case: Case,
    options: Options,
    config: ml_collections.ConfigDict,
    dataset: data.Dataset,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    """Compile, warm up and time one configuration; return its row of figures."""
    compiled = compile_case(case, options, config, dataset, mesh)
    progress(
        f"    {'loaded from the compilation cache' if compiled.compile_cache_hit else 'compiled'} in "
        f"{compiled.lowering_seconds + compiled.xla_compile_seconds:.1f}s "
        f"(lowering {compiled.lowering_seconds:.1f}s); {options.warmup_steps} warmup steps"
    )
    if options.warmup_steps:
        compiled.run(options.warmup_steps)
    progress(f"    timing {options.steps} steps")
    return figures(compiled, compiled.run(options.steps), options, config, mesh)


def describe_case(case: Case, options: Options, mesh: jax.sharding.Mesh) -> str:
    return (
        f"{case.model} {options.mode}, batch {case.batch_size} "
        f"({case.batch_size // mesh.devices.size}/device), {case.image_size}px, {case.dtype}, "
        f"data {options.data or DEVICE_DATA}"
    )


def run(
    options: Options,
    base_config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Check every configuration first, then measure each; one row per configuration.

    `on_row` sees each row as soon as it is measured (so that a long sweep cut short keeps what
    it measured). With `options.time_budget_s`, a configuration that would likely end past the
    budget is skipped with a message: its expected duration is the longest one so far.
    """
    start = time.perf_counter()
    mesh = parallel.create_mesh() if mesh is None else mesh
    cases = plan(options, mesh)
    configs = [case_config(base_config, case, options) for case in cases]
    datasets: dict[tuple[str, int], data.Dataset] = {}
    for config in configs:
        key = (config.dataset, config.image_size)
        if key not in datasets:
            datasets[key] = load_dataset(config)
    progress(f"{len(cases)} configuration(s) on {parallel.describe(mesh)}")
    rows: list[dict[str, Any]] = []
    longest = 0.0
    for i, (case, config) in enumerate(zip(cases, configs, strict=True)):
        elapsed = time.perf_counter() - start
        if options.time_budget_s is not None and rows and elapsed + longest > options.time_budget_s:
            progress(
                f"[{i + 1}/{len(cases)}] {describe_case(case, options, mesh)}: skipped, the time budget "
                f"of {options.time_budget_s:.0f}s has {options.time_budget_s - elapsed:.0f}s left and the "
                f"longest configuration so far took {longest:.0f}s"
            )
            continue
        progress(f"[{i + 1}/{len(cases)}] {describe_case(case, options, mesh)}: compiling")
        case_start = time.perf_counter()
        row = run_case(case, options, config, datasets[(config.dataset, config.image_size)], mesh)
        longest = max(longest, time.perf_counter() - case_start)
        progress(f"    {row['images_per_sec']:.1f} img/s, median step {row['step_time_median_ms']:.1f} ms")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------- output

TABLE_COLUMNS = [
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("batch", "batch_size", "{}"),
    ("/dev", "per_device_batch_size", "{}"),
    ("px", "image_size", "{}"),
    ("dtype", "dtype", "{}"),
    ("img/s", "images_per_sec", "{:.1f}"),
    ("img/s/dev", "images_per_sec_per_device", "{:.1f}"),
    ("median ms", "step_time_median_ms", "{:.1f}"),
    ("p90 ms", "step_time_p90_ms", "{:.1f}"),
    ("compile s", "compile_seconds", "{:.1f}"),
    ("cached", "compile_cache_hit", "yesno"),
    ("TFLOP/s/dev", "tflops_per_sec_per_device", "{:.2f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("peak mem GiB", "peak_memory_bytes", "gib"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "gib":
        return f"{value / 2**30:.2f}"
    if fmt == "yesno":
        return "yes" if value else "no"
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one line per configuration, with where it was measured underneath."""
    header = [title for title, _, _ in TABLE_COLUMNS]
    body = [[_cell(row.get(key), fmt) for _, key, fmt in TABLE_COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    align = lambda cells: "  ".join(
        c.ljust(w) if i < 2 or header[i] == "dtype" else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    lines = [align(header), *(align(r) for r in body)]
    if rows:
        r = rows[0]
        lines.append(
            f"{r['device_count']} x {r['device_kind']} ({r['process_count']} process(es)), "
            f"jax {r['jax_version']}, jaxlib {r['jaxlib_version']}, data: {r['data']}"
        )
    return "\n".join(lines)


def check_json_path(path: str | None) -> None:
    """Fail before measuring, not after an hour of it, when the JSON cannot be written."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise BenchmarkError(f"--json={path!r}: directory {directory!r} does not exist or is not writable")


def write_json(path: str, rows: Sequence[dict[str, Any]], flags: dict[str, Any]) -> None:
    """A list of rows, each self-contained (with the flags), so that runs can be concatenated."""
    with open(path, "w") as f:
        json.dump([{**row, "flags": flags} for row in rows], f, indent=1, default=str)
        f.write("\n")


def main(
    options: Options,
    base_config: ml_collections.ConfigDict,
    *,
    json_path: str | None = None,
    flags: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Measure, print the table on stdout and write the JSON (process 0 only); return the rows.

    The JSON is rewritten after every row, so that a sweep stopped half-way keeps its rows.
    """
    check_json_path(json_path)
    flags = flags if flags is not None else dataclasses.asdict(options)
    measured: list[dict[str, Any]] = []

    def write_so_far(row: dict[str, Any]) -> None:
        measured.append(row)
        if json_path and parallel.is_primary():
            write_json(json_path, measured, flags)

    rows = run(options, base_config, on_row=write_so_far)
    if parallel.is_primary():
        print(format_table(rows), flush=True)
        if json_path:
            progress(f"wrote {len(rows)} row(s) to {json_path}")
    return rows
