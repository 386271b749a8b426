"""Compile the real train and eval steps for TPU slices and NVIDIA GPU hosts, on a CPU, before renting.

    python -m resnet_jax.preflight --config configs/imagenet_resnet50.py --target v5e-8 --target h100x8 \\
        [--config.key=value ...] [--max_batch] [--json FILE]

JAX compiles for devices that are not there: libtpu describes TPU slices, the CUDA plugin compiles
for a GPU described by a target config (`resnet_jax/gpu_specs`). Each target compiles in its own
process (the TPU and CUDA backends must not share one), building the steps exactly as `train.py`
does for that mesh (`train.CompiledSteps`: model, optimizer, shardings, donation), from abstract states
and uint8 batch shapes. Reported per device: memory against HBM, FLOPs and HBM bytes per image
where the backend counts them, a roofline bound on images/s, and whether it fits. Nothing runs,
so nothing is timed; GPU memory is XLA's plan before autotuning picks convolution algorithms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from resnet_jax import cli, data, sources, targets
from resnet_jax.config_checks import check_config
from resnet_jax.errors import UserError

# JAX's GPU allocator takes this fraction of device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says.
JAX_GPU_MEMORY_FRACTION = 0.75
MAX_PROBES = 6  # compiles per target that --max_batch may spend beyond the config's own
PLUGINS = {"tpu": ("libtpu",), "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin")}
EXTRA_HINT = "pip install -e '.[preflight]' (libtpu and the CUDA plugin that match the installed jax)"


class PreflightError(UserError, ValueError):
    """A target, extra or dataset the preflight cannot use; the message says what would work."""


@dataclasses.dataclass
class Compiled:
    """One step compiled (or refused) for one target at one global batch size."""

    batch_size: int
    compiled: bool
    fits: bool
    reason: str = ""  # why it did not compile or fit: one line
    compile_seconds: float | None = None
    state_bytes: int | None = None  # per device: parameters, optimizer state, batch_stats, EMA
    batch_bytes: int | None = None  # per device: this device's share of the uint8 batch
    temp_bytes: int | None = None
    total_bytes: int | None = None  # arguments + outputs + temporaries - donated
    flops_per_device: float | None = None
    bytes_accessed_per_device: float | None = None  # HBM traffic, where the backend counts it


# ---------------------------------------------------------------- what the targets need


def check_extras(chosen: Sequence[targets.Target]) -> None:
    """One line naming every missing package and the targets that need it, before anything compiles."""
    missing = []
    for platform in sorted({t.platform for t in chosen}):
        if not any(importlib.util.find_spec(name) for name in PLUGINS[platform]):
            names = [t.name for t in chosen if t.platform == platform]
            package = "libtpu" if platform == "tpu" else "the JAX CUDA plugin"
            missing.append(f"{', '.join(names)} {'needs' if len(names) == 1 else 'need'} {package}")
    if missing:
        verb = "which is" if len(missing) == 1 else "which are"
        raise PreflightError(f"{' and '.join(missing)}, {verb} not installed: {EXTRA_HINT}")


def usable_bytes(target: targets.Target) -> int:
    """Device memory a run may use: TPU HBM; on GPUs JAX's allocator share of it."""
    hbm = target.accelerator.hbm_bytes
    if target.platform != "cuda":
        return hbm
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEMORY_FRACTION))
    return int(hbm * fraction)


def dataset_info(config: ml_collections.ConfigDict, num_classes: int | None) -> tuple[data.DatasetInfo, str]:
    """The shapes the steps see, and where they came from.

    The dataset itself when this machine has it; otherwise TFDS's metadata (known without the data)
    or `num_classes`. Only shapes matter for compiling: the statistics are placeholders then.
    """
    try:
        return data.load(config).info, "the dataset"
    except sources.DatasetError as e:
        missing = str(e).splitlines()[0]
    kind, name = data.parse_spec(config.dataset)
    channels = 3
    if num_classes is None and kind == "tfds":
        import tensorflow_datasets as tfds

        try:
            with tempfile.TemporaryDirectory() as empty:  # metadata only: nothing is read or written
                features = tfds.builder(name.split("/")[0], data_dir=empty).info.features
        except Exception as e:  # noqa: BLE001 - unknown names and builders that need files
            raise PreflightError(
                f"{missing}; its TFDS metadata is unknown too ({e}); pass --num_classes"
            ) from None
        label = next((f for f in features.values() if hasattr(f, "num_classes")), None)
        image = next((f for f in features.values() if getattr(f, "shape", ())[-1:] in ((1,), (3,))), None)
        num_classes = label.num_classes if label is not None else None
        channels = image.shape[-1] if image is not None else 3
    if num_classes is None:
        raise PreflightError(f"{missing}; pass --num_classes to compile for it without the data")
    size = config.image_size
    mean, std = sources.known_stats(config.dataset) or data.SYNTHETIC_STATS
    info = data.DatasetInfo(
        name=config.dataset,
        num_classes=num_classes,
        image_shape=(size, size, channels),
        mean=mean[:channels],
        std=std[:channels],
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        num_train=data.SYNTHETIC_SIZES["train"],
        num_eval=data.SYNTHETIC_SIZES["eval"],
        eval_image_shape=((config.eval_image_size or size),) * 2 + (channels,),
    )
    return info, f"{'TFDS metadata' if kind == 'tfds' else '--num_classes'} (dataset not found here)"


def check_batch(config: ml_collections.ConfigDict, target: targets.Target, batch_size: int) -> str:
    """Why `batch_size` cannot run on `target` ("" when it can), in train.py's words."""
    from resnet_jax import parallel

    error = parallel.batch_size_error(
        "config.batch_size",
        batch_size,
        target.devices,
        grad_accum_steps=config.grad_accum_steps,
        bn_group_size=config.bn_group_size,
    )
    return error or ""


def batch_unit(config: ml_collections.ConfigDict, target: targets.Target) -> int:
    return target.devices * config.grad_accum_steps * max(config.bn_group_size, 1)


# ---------------------------------------------------------------- one target, in its own process


def topology_devices(target: targets.Target) -> list[Any]:
    from jax.experimental import topologies

    options = dict(target.topology_options)
    if target.platform == "cuda":
        options["target_config"] = targets.gpu_target_config(target)
        return list(
            topologies.get_topology_desc(platform="cuda", topology=target.topology, **options).devices
        )
    return list(
        topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **options).devices
    )


def tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


OOM_SIZES = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def refusal(error: Exception) -> tuple[bool, str]:
    """(is it out of memory, one line) from a compiler error."""
    text = str(error)
    match = OOM_SIZES.search(text)
    if match:
        need, need_unit, have, have_unit = match.groups()
        return True, f"XLA: needs {need}{need_unit} of temporaries, {have}{have_unit} of HBM available"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    oom = "RESOURCE_EXHAUSTED" in text
    return oom, (lines[0] if lines else type(error).__name__)[:300]


def compile_step(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    target: targets.Target,
    mesh: Any,
    batch_size: int,
    mode: str,
    hlo_dir: str | None = None,
) -> Compiled:
    """Build `train.CompiledSteps` for the mesh at `batch_size` and compile its train or eval step."""
    import jax
    import jax.numpy as jnp

    from resnet_jax import benchmark, checkpoint, models, parallel, train
    from resnet_jax.step import rng_key

    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = config.eval_batch_size = batch_size
    bad = check_batch(config, target, batch_size)
    if bad:
        return Compiled(batch_size, compiled=False, fits=False, reason=bad)
    steps = train.CompiledSteps(config, info, mesh)
    replicated, sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
    state = checkpoint.with_sharding(jax.eval_shape(steps.init, rng_key(config.seed)), replicated)
    image_shape = info.eval_image_shape if mode == "eval" else info.image_shape
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8, sharding=sharded),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    step = steps.train_step
    if mode == "eval":
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=sharded)
        state, step = state.for_eval(), steps.eval_step
    per_device = {
        k: jax.ShapeDtypeStruct((v.shape[0] // target.devices, *v.shape[1:]), v.dtype)
        for k, v in batch.items()
    }
    result = Compiled(
        batch_size,
        compiled=False,
        fits=False,
        state_bytes=tree_bytes(state),
        batch_bytes=tree_bytes(per_device),
    )
    start = time.perf_counter()
    try:
        lowered = step.lower(state, batch)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the answer
        oom, result.reason = refusal(e)
        result.compiled = oom  # it compiled far enough to be measured against the HBM
        result.compile_seconds = time.perf_counter() - start
        return result
    result.compile_seconds = time.perf_counter() - start
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{target.name}_{mode}_batch{batch_size}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    result.temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    result.total_bytes = benchmark.compiled_memory_bytes(compiled)
    counted = models.cost_analysis(compiled)
    flops = counted.get("flops") or 0.0
    if flops <= 0:  # the CUDA backend counts nothing: count the lowered program, a 1/N share each
        flops = (models.xla_flops(lowered) or 0.0) / target.devices
    result.flops_per_device = flops or None
    result.bytes_accessed_per_device = counted.get("bytes accessed") or None
    usable = usable_bytes(target)
    result.compiled, result.fits = True, result.total_bytes <= usable
    if not result.fits:
        over = result.total_bytes - usable
        result.reason = f"needs {gib(result.total_bytes)} per device, {gib(over)} over {gib(usable)}"
    return result


def search_max_batch(
    probe: Callable[[int], Compiled], first: Compiled, unit: int, usable: int, limit: int = MAX_PROBES
) -> tuple[int | None, int | None, list[Compiled]]:
    """The largest multiple of `unit` that fits, from the config's own compile and a few more.

    Memory grows about linearly with the batch, so each guess is where the line through the two
    largest measured batches meets the usable memory, and the batch after it to confirm the limit;
    where there is no line (a compiler that only refuses) or it misled once, bisection. The search
    stops at `resolution`. Returns
    (largest fit, smallest miss, the extra compiles); either is None when not found.
    """
    seen = {first.batch_size: first}
    fits = lambda: [b for b, c in seen.items() if c.fits]  # noqa: E731
    misses = lambda: [b for b, c in seen.items() if not c.fits]  # noqa: E731
    probes: list[Compiled] = []
    trust_line = True  # until a step past the line's limit turns out to fit: memory is not linear
    while len(probes) < limit:
        lo, hi = max(fits(), default=None), min(misses(), default=None)
        if lo is not None and hi is not None and hi - lo <= resolution(lo, unit):
            break
        line = linear_guess(seen, unit, usable) if trust_line else None
        if lo is None:  # nothing fits yet: go down
            guess = line if line and line < hi else hi // 2
        elif hi is None:  # everything fits so far: go up, at most 8x at a time
            guess = min(max(line or 2 * lo, lo + unit), 8 * lo)
        elif line is None:
            guess = (lo + hi) // 2
        else:  # the line's limit, or the next batch past a limit the line puts at a known point
            guess = lo + unit if line <= lo else (hi - unit if line >= hi else line)
        guess = max(unit, guess // unit * unit)
        if guess in seen:
            break
        seen[guess] = probe(guess)
        probes.append(seen[guess])
        if line is not None and line <= guess - unit and seen[guess].fits:
            trust_line = False
    lo, hi = max(fits(), default=None), min(misses(), default=None)
    return lo, hi, probes


def resolution(batch: int, unit: int) -> int:
    """How close the search gets: one valid batch step, or 1/16 of the batch when that is more."""
    return max(unit, batch // 16 // unit * unit)


def linear_guess(seen: dict[int, Compiled], unit: int, usable: int) -> int | None:
    """Where the line through the two largest measured batches meets the usable memory."""
    points = sorted((b, c.total_bytes) for b, c in seen.items() if c.total_bytes)
    if len(points) < 2:
        return None
    (b0, m0), (b1, m1) = points[-2], points[-1]
    if m1 <= m0:
        return None
    return int(b0 + (usable - m0) * (b1 - b0) / (m1 - m0)) // unit * unit


def run_target(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything the preflight measures for one target (the worker process's job)."""
    from resnet_jax import inference, parallel

    config, info, target = spec["config"], spec["info"], targets.target(spec["target"])
    mesh = parallel.create_mesh(topology_devices(target))
    usable = usable_bytes(target)

    def probe(batch_size: int, mode: str = "train") -> Compiled:
        print(
            f"  {target.name}: compiling the {mode} step at batch {batch_size}", file=sys.stderr, flush=True
        )
        return compile_step(config, info, target, mesh, batch_size, mode, spec["hlo_dir"])

    train_step = probe(config.batch_size)
    eval_batch = inference.eval_batch_size(config)
    eval_step = probe(eval_batch, "eval") if train_step.compiled and spec.get("eval", True) else None
    row: dict[str, Any] = {
        "train": dataclasses.asdict(train_step),
        "eval": eval_step and dataclasses.asdict(eval_step),
    }
    if spec["max_batch"] and train_step.compiled:
        largest, smallest_miss, probes = search_max_batch(
            probe, train_step, batch_unit(config, target), usable, spec["max_batch_compiles"]
        )
        row["max_batch"] = largest
        row["max_batch_miss"] = smallest_miss
        row["max_batch_probes"] = [dataclasses.asdict(p) for p in probes]
    return row


def worker_main() -> None:
    """Entry point of the per-target process: `python -c ... SPEC OUT` (pickled spec, JSON out)."""
    with open(sys.argv[1], "rb") as f:
        spec = pickle.load(f)
    row = run_target(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(row, f)


def worker_environment() -> dict[str, str]:
    """JAX on the CPU client (the targets are compile-only devices); libtpu quiet about its hosts and
    without its one-process-per-machine lock (several preflights may compile at once)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def unlimited_stack() -> None:
    """Compiling for v6e overflows the default 8 MiB stack (a segfault): raise it to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))


def compile_in_subprocess(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """`run_target` in a fresh process; a crash or timeout becomes a row that says so."""
    with tempfile.TemporaryDirectory(prefix="preflight_") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.pkl"), os.path.join(tmp, "row.json")
        with open(spec_path, "wb") as f:
            pickle.dump(spec, f)
        code = "from resnet_jax.preflight import worker_main; worker_main()"
        start = time.perf_counter()
        try:
            process = subprocess.run(
                [sys.executable, "-c", code, spec_path, out_path],
                env=worker_environment(),
                preexec_fn=unlimited_stack,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return failed_row(spec, f"no answer within --timeout_s={timeout_s:g}")
        for line in process.stdout.splitlines():  # the progress lines, not the backends' noise
            if line.startswith(f"  {spec['target']}:"):
                print(line, file=sys.stderr, flush=True)
        if process.returncode != 0 or not os.path.exists(out_path):
            tail = [line for line in process.stdout.splitlines() if line.strip()][-1:] or ["no output"]
            return failed_row(spec, f"compiler process exited with {process.returncode}: {tail[0][:300]}")
        with open(out_path) as f:
            row = json.load(f)
        row["wall_seconds"] = time.perf_counter() - start
        return row


def failed_row(spec: dict[str, Any], reason: str) -> dict[str, Any]:
    step = Compiled(spec["config"].batch_size, compiled=False, fits=False, reason=reason)
    return {"train": dataclasses.asdict(step), "eval": None}


# ---------------------------------------------------------------- figures and the table


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def summarize(target: targets.Target, row: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The table row's figures: per-image costs, the roofline bound and the verdict."""
    train_step, eval_step = row["train"], row["eval"]
    batch = train_step["batch_size"]
    accel = target.accelerator
    flops = train_step["flops_per_device"]
    traffic = train_step["bytes_accessed_per_device"]
    per_image = lambda per_device: per_device * target.devices / batch if per_device else None  # noqa: E731
    bounds = []
    if flops and accel.peak_flops.get(dtype):
        bounds.append(target.devices * accel.peak_flops[dtype] / per_image(flops))
    if traffic and accel.hbm_bandwidth:
        bounds.append(target.devices * accel.hbm_bandwidth / per_image(traffic))
    if not train_step["compiled"]:
        verdict = "does not compile"
    elif not train_step["fits"]:
        verdict = "does not fit"
    elif eval_step and not eval_step["fits"]:
        verdict = "eval does not fit"
    else:
        verdict = "fits"
    reason = train_step["reason"] or (eval_step and eval_step["reason"]) or ""
    total = train_step["total_bytes"]
    usable = usable_bytes(target)
    return {
        "target": target.name,
        "accelerator": accel.name,
        "devices": target.devices,
        "processes": target.processes,
        "batch_size": batch,
        "per_process_batch": batch // target.processes,
        "verdict": verdict,
        "reason": reason,
        "compile_seconds": train_step["compile_seconds"],
        "eval_compile_seconds": eval_step and eval_step["compile_seconds"],
        "bytes_per_device": total,
        "state_bytes": train_step["state_bytes"],
        "batch_bytes": train_step["batch_bytes"],
        "temp_bytes": train_step["temp_bytes"],
        "eval_bytes_per_device": eval_step and eval_step["total_bytes"],
        "usable_bytes": usable,
        "headroom_bytes": usable - total if total else None,
        "gflops_per_image": per_image(flops) and per_image(flops) / 1e9,
        "hbm_mb_per_image": per_image(traffic) and per_image(traffic) / 1e6,
        "roofline_images_per_sec": min(bounds) if bounds else None,
        "roofline_bound": None
        if not bounds
        else ("HBM" if len(bounds) > 1 and bounds[1] < bounds[0] else "FLOPs"),
        "max_batch": row.get("max_batch"),
        "first_batch_that_does_not_fit": row.get("max_batch_miss"),
        "max_batch_probes": [
            {"batch_size": p["batch_size"], "bytes_per_device": p["total_bytes"], "fits": p["fits"]}
            for p in row.get("max_batch_probes", [])
        ],
        "wall_seconds": row.get("wall_seconds"),
    }


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "target",
        "devices",
        "compile",
        "memory/device",
        "of usable",
        "GFLOP/img",
        "MB/img",
        "roofline img/s",
        "max batch",
        "verdict",
    )
    lines = []
    for r in rows:
        memory = "-"
        if r["bytes_per_device"]:
            parts = " + ".join(f"{k} {r[k + '_bytes'] / 2**30:.2f}" for k in ("state", "batch", "temp"))
            memory = f"{gib(r['bytes_per_device'])} ({parts})"
        max_batch, miss = r["max_batch"], r["first_batch_that_does_not_fit"]
        if max_batch is None:
            max_batch = "-" if miss is None else f"< {miss}"
        else:
            max_batch = f"{max_batch}" + (f" (< {miss})" if miss else " (or more)")
        verdict = r["verdict"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(
            (
                r["target"],
                f"{r['devices']} ({r['processes']} proc)",
                _cell(r["compile_seconds"], "{:.0f} s"),
                memory,
                _cell(r["bytes_per_device"] and r["bytes_per_device"] / r["usable_bytes"], "{:.0%}")
                + f" of {gib(r['usable_bytes'])}",
                _cell(r["gflops_per_image"], "{:.3g}"),
                _cell(r["hbm_mb_per_image"], "{:.0f}"),
                _cell(r["roofline_images_per_sec"], "{:,.0f}")
                + (f" ({r['roofline_bound']})" if r["roofline_bound"] else ""),
                max_batch,
                verdict,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join(out)


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("jax", "jaxlib", "flax", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def preflight(
    config: ml_collections.ConfigDict,
    target_names: Sequence[str],
    *,
    max_batch: bool = False,
    max_batch_compiles: int = MAX_PROBES,
    compile_eval: bool = True,
    num_classes: int | None = None,
    timeout_s: float = 3600.0,
    hlo_dir: str | None = None,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> list[dict[str, Any]]:
    """One summarized row per target (see `summarize`); raises `PreflightError`/`ConfigError` up front."""
    chosen = [targets.target(name) for name in target_names]
    if not chosen:
        raise PreflightError(f"no --target given; choose from {', '.join(targets.TARGETS)}")
    check_extras(chosen)
    config = check_config(config)
    info, shapes_from = dataset_info(config, num_classes)
    report(
        f"{config.model} {config.dtype}, global batch {config.batch_size}, images "
        f"{'x'.join(map(str, info.image_shape))}, {info.num_classes} classes (shapes from {shapes_from})"
    )
    rows = []
    for target in chosen:
        report(
            f"{target.name}: {target.devices} x {target.accelerator.name} in {target.processes} process(es)"
        )
        spec = {
            "config": config,
            "info": info,
            "target": target.name,
            "max_batch": max_batch,
            "max_batch_compiles": max_batch_compiles,
            "eval": compile_eval,
            "hlo_dir": hlo_dir and os.path.abspath(hlo_dir),
        }
        rows.append(summarize(target, compile_in_subprocess(spec, timeout_s), config.dtype))
    return rows


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        rows = preflight(
            FLAGS.config,
            FLAGS.target or [],
            max_batch=FLAGS.max_batch,
            max_batch_compiles=FLAGS.max_batch_compiles,
            compile_eval=FLAGS.eval,
            num_classes=FLAGS.num_classes,
            timeout_s=FLAGS.timeout_s,
            hlo_dir=FLAGS.hlo_dir,
        )
    except UserError as e:  # ConfigError, DatasetError, UnknownTargetError, PreflightError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if FLAGS.json:
        from ml_collections import config_flags

        with open(FLAGS.json, "w") as f:
            json.dump(
                {
                    "config": config_flags.get_config_filename(FLAGS["config"]),
                    "overrides": config_flags.get_override_values(FLAGS["config"]),
                    "versions": versions(),
                    "targets": rows,
                },
                f,
                indent=1,
            )
    return 0 if all(r["verdict"] == "fits" for r in rows) else 1


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
    flags.mark_flag_as_required("config")
    flags.DEFINE_multi_string("target", None, f"Slice or host to compile for: {', '.join(targets.TARGETS)}.")
    flags.DEFINE_bool("max_batch", False, "Also find the largest global batch that fits, per target.")
    flags.DEFINE_integer("max_batch_compiles", MAX_PROBES, "Compiles per target that --max_batch may spend.")
    flags.DEFINE_bool("eval", True, "Also compile the eval step (--noeval: the train step alone).")
    flags.DEFINE_integer("num_classes", None, "Classes of a dataset that is not on this machine (non-TFDS).")
    flags.DEFINE_float("timeout_s", 3600.0, "Seconds per target before its compile is given up.")
    flags.DEFINE_string("json", None, "Also write every figure to this JSON file.")
    flags.DEFINE_string("hlo_dir", None, "Write each compiled program's optimized HLO here (for profiling).")


if __name__ == "__main__":
    # This process only plans: JAX stays on the CPU (no accelerator plugin starts or complains).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import app, logging

    define_flags()
    logging.set_verbosity(logging.ERROR)  # TFDS warns about metadata-only builders
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.absl_flags_parser(__doc__))
