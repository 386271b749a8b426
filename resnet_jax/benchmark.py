"""Throughput, compile time, MFU and memory of the real train (or eval) step.

What is timed is exactly what `train.py` runs: `compiled_steps.CompiledSteps` builds the model,
the optimizer from the config, and the jit-compiled `train_step`/`eval_step` with
the mesh shardings and buffer donation. This module plans the sweep, checks it before
anything compiles, and turns the times (`step_timing`) and XLA's counts (`costs`) into one row
per configuration.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from resnet_jax import costs, dali, data, models, parallel, tables, trace_report
from resnet_jax import progress as progress_lib
from resnet_jax.config_checks import ConfigError, check_config
from resnet_jax.errors import UserError, check_choice
from resnet_jax.step_timing import TimedStep, compile_step

MODES = ("train", "eval")
DEVICE_DATA = "device"  # the `data` value of rows whose batches were made on the devices


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
    # Where batches come from: "device" (made on the devices) and/or dataset specs fed through the
    # real input pipeline, each by every loader of `loaders`; one spec alone may be a string.
    data: str | tuple[str, ...] | None = None
    loaders: tuple[str, ...] = ("grain",)
    seed: int = 0
    profile: str | None = None  # a folder: trace `profile_steps` more steps of each configuration there
    profile_steps: int = 5
    # Seconds for the whole sweep: a configuration that would likely end past them is skipped (and
    # said so), judged by the longest configuration so far. None: no limit.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        sources = (self.data,) if isinstance(self.data, str) else tuple(self.data or (DEVICE_DATA,))
        object.__setattr__(self, "data", sources)


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of a sweep."""

    model: str
    image_size: int
    dtype: str
    batch_size: int  # global
    data: str = DEVICE_DATA  # or a dataset spec fed by `loader`
    loader: str = "grain"


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
    if options.profile_steps < 1:
        raise BenchmarkError(f"--profile_steps={options.profile_steps} must be a positive integer")
    if options.time_budget_s is not None and not options.time_budget_s > 0:
        raise BenchmarkError(f"--time_budget_s={options.time_budget_s} must be a positive number")
    try:
        for name in options.models:
            check_choice("--model", name, models.names())
        for dtype in options.dtypes:
            check_choice("--dtype", dtype, tuple(models.DTYPES))
        check_choice("--mode", options.mode, MODES)
        for loader in options.loaders:
            check_choice("--loader", loader, dali.LOADERS)
        for spec in options.data:
            if spec != DEVICE_DATA:
                data.parse_spec(spec)
        for batch_size in global_batch_sizes(options, mesh.devices.size):
            parallel.check_batch_size("--batch_size", batch_size, mesh)
    except BenchmarkError:
        raise
    except ValueError as e:
        raise BenchmarkError(str(e).replace("dataset=", "--data=")) from None


def plan(options: Options, mesh: jax.sharding.Mesh) -> list[Case]:
    """Every configuration of the sweep, checked."""
    check_options(options, mesh)
    feeds = [
        (spec, loader)
        for spec in options.data
        for loader in ((DEVICE_DATA,) if spec == DEVICE_DATA else options.loaders)
    ]
    return [
        Case(model, size, dtype, batch, spec, "grain" if loader == DEVICE_DATA else loader)
        for model, size, dtype, batch, (spec, loader) in itertools.product(
            options.models,
            options.image_sizes,
            options.dtypes,
            global_batch_sizes(options, mesh.devices.size),
            feeds,
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
    config.dataset = "synthetic" if case.data == DEVICE_DATA else case.data
    config.loader = case.loader
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


def figures(
    case: Case,
    compiled: TimedStep,
    times: Sequence[float],
    options: Options,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    """The row of one configuration from its compiled step and its step times."""
    seconds = np.asarray(times)
    step_seconds = float(seconds.mean())
    devices = mesh.devices.size
    flops = compiled.flops_per_device
    env = environment(list(mesh.devices.flat))
    peak = options.peak_tflops * 1e12 if options.peak_tflops else None
    if peak is None and "," not in env["device_kind"]:
        peak = costs.peak_flops_per_device(env["device_kind"], case.dtype)
    images_per_sec = case.batch_size / step_seconds
    return {
        "model": case.model,
        "mode": options.mode,
        "batch_size": case.batch_size,
        "per_device_batch_size": case.batch_size // devices,
        "image_size": case.image_size,
        "dtype": case.dtype,
        "data": case.data,
        "loader": case.loader if case.data != DEVICE_DATA else "-",
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
        "mfu": costs.mfu(flops, step_seconds, peak),
        "peak_memory_bytes": costs.peak_memory_bytes(jax.local_devices()),
        "compiled_memory_bytes": costs.compiled_memory_bytes(compiled.compiled),
        **env,
    }


def progress(message: str) -> None:
    """Progress goes to stderr (process 0), so that stdout holds only the table."""
    progress_lib.log(message, file=sys.stderr)


def run_case(
    case: Case,
    options: Options,
    config: ml_collections.ConfigDict,
    dataset: data.Dataset,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    """Compile, warm up and time one configuration; return its row of figures."""
    compiled = compile_step(
        config, dataset, mesh, mode=options.mode, seed=options.seed, pipeline=case.data != DEVICE_DATA
    )
    progress(
        f"    {'loaded from the compilation cache' if compiled.compile_cache_hit else 'compiled'} in "
        f"{compiled.lowering_seconds + compiled.xla_compile_seconds:.1f}s "
        f"(lowering {compiled.lowering_seconds:.1f}s); {options.warmup_steps} warmup steps"
    )
    if options.warmup_steps:
        compiled.run(options.warmup_steps)
    progress(f"    timing {options.steps} steps")
    row = figures(case, compiled, compiled.run(options.steps), options, config, mesh)
    if options.profile:
        directory = os.path.join(options.profile, case_label(case, options))
        progress(f"    tracing {options.profile_steps} more steps into {directory}")
        compiled.trace(directory, options.profile_steps)
        if progress_lib.is_primary():
            try:
                document = trace_report.report(directory, options.profile_steps)
            except trace_report.TraceError as e:  # no device ops traced (no CUPTI, say): keep the row
                progress(f"    no profile table: {e}")
                row["profile"] = {"directory": directory, "error": str(e)}
            else:
                progress(trace_report.format_report(document))
                row["profile"] = {"directory": directory, "rows": document["rows"]}
    return row


def case_label(case: Case, options: Options) -> str:
    """A folder name for one configuration's profile."""
    feed = "device" if case.data == DEVICE_DATA else f"{case.loader}"
    return f"{case.model}_{options.mode}_{case.dtype}_b{case.batch_size}_{case.image_size}px_{feed}"


def describe_case(case: Case, options: Options, mesh: jax.sharding.Mesh) -> str:
    return (
        f"{case.model} {options.mode}, batch {case.batch_size} "
        f"({case.batch_size // mesh.devices.size}/device), {case.image_size}px, {case.dtype}, "
        f"data {case.data}" + (f" ({case.loader})" if case.data != DEVICE_DATA else "")
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
    datasets: dict[tuple[str, int, str], data.Dataset] = {}
    for config in configs:
        key = (config.dataset, config.image_size, config.loader)
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
        dataset = datasets[(config.dataset, config.image_size, config.loader)]
        row = run_case(case, options, config, dataset, mesh)
        longest = max(longest, time.perf_counter() - case_start)
        progress(f"    {row['images_per_sec']:.1f} img/s, median step {row['step_time_median_ms']:.1f} ms")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------- output


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one line per configuration, with where it was measured underneath."""
    header, body = tables.cells(tables.BENCHMARK_COLUMNS, rows)
    lines = tables.text(header, body, left=("model", "mode", "dtype", "data", "loader")).splitlines()
    if rows:
        r = rows[0]
        lines.append(
            f"{r['device_count']} x {r['device_kind']} ({r['process_count']} process(es)), "
            f"jax {r['jax_version']}, jaxlib {r['jaxlib_version']}"
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
        if json_path and progress_lib.is_primary():
            write_json(json_path, measured, flags)

    rows = run(options, base_config, on_row=write_so_far)
    if progress_lib.is_primary():
        print(format_table(rows), flush=True)
        if json_path:
            progress(f"wrote {len(rows)} row(s) to {json_path}")
    return rows
