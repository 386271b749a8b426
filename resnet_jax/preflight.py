"""Compile the real train and eval steps for TPU slices and NVIDIA GPU hosts, on a CPU, before renting.

    python -m resnet_jax.preflight --config configs/imagenet_resnet50.py --target v5e-8 --target h100x8 \\
        [--config.key=value ...] [--max_batch] [--json FILE]

JAX compiles for devices that are not there: libtpu describes TPU slices, the CUDA plugin compiles
for a GPU described by a target config (`resnet_jax/gpu_specs`). Each target compiles in its own
process (the TPU and CUDA backends must not share one), building the steps exactly as `train.py`
does for that mesh (`compiled_steps.CompiledSteps`: model, optimizer, shardings, donation), from
abstract states and uint8 batch shapes. Reported per device: memory against HBM, FLOPs and HBM bytes per image
where the backend counts them, a roofline bound on images/s, and whether it fits. Nothing runs,
so nothing is timed; GPU memory is XLA's plan before autotuning picks convolution algorithms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from resnet_jax import cli, costs, data, parallel, sources, tables, targets
from resnet_jax.config_checks import check_config
from resnet_jax.errors import UserError
from resnet_jax.preflight_worker import MAX_PROBES, Compiled, usable_bytes

PLUGINS = {"tpu": ("libtpu",), "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin")}
EXTRA_HINT = "pip install -e '.[preflight]' (libtpu and the CUDA plugin that match the installed jax)"


class PreflightError(UserError, ValueError):
    """A target, extra or dataset the preflight cannot use; the message says what would work."""


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
        eval_image_shape=(data.eval_side(size, config.eval_image_size),) * 2 + (channels,),
    )
    return info, f"{'TFDS metadata' if kind == 'tfds' else '--num_classes'} (dataset not found here)"


# ---------------------------------------------------------------- one target, in its own process


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
        code = "from resnet_jax.preflight_worker import worker_main; worker_main()"
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


def summarize(target: targets.Target, row: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The table row's figures: per-image costs, the roofline bound and the verdict."""
    train_step, eval_step = row["train"], row["eval"]
    batch = train_step["batch_size"]
    accel = target.accelerator
    flops = train_step["flops_per_device"]
    traffic = train_step["bytes_accessed_per_device"]
    per_image = lambda per_device: per_device * target.devices / batch if per_device else None  # noqa: E731
    per_device_rate, bound = costs.roofline(accel, dtype, per_image(flops), per_image(traffic))
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
        "per_process_batch": parallel.local_batch_size(batch, target.processes),
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
        "roofline_images_per_sec": per_device_rate and target.devices * per_device_rate,
        "roofline_bound": bound,
        "max_batch": row.get("max_batch"),
        "first_batch_that_does_not_fit": row.get("max_batch_miss"),
        "max_batch_probes": [
            {"batch_size": p["batch_size"], "bytes_per_device": p["total_bytes"], "fits": p["fits"]}
            for p in row.get("max_batch_probes", [])
        ],
        "wall_seconds": row.get("wall_seconds"),
    }


TABLE_HEADER = (
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


def table_row(r: dict[str, Any]) -> list[str]:
    """One target's cells: memory split into its parts, the batch search and the verdict in words."""
    memory = "-"
    if r["bytes_per_device"]:
        parts = " + ".join(f"{k} {r[k + '_bytes'] / 2**30:.2f}" for k in ("state", "batch", "temp"))
        memory = f"{costs.gib(r['bytes_per_device'])} ({parts})"
    max_batch, miss = r["max_batch"], r["first_batch_that_does_not_fit"]
    if max_batch is None:
        max_batch = "-" if miss is None else f"< {miss}"
    else:
        max_batch = f"{max_batch}" + (f" (< {miss})" if miss else " (or more)")
    share = r["bytes_per_device"] and r["bytes_per_device"] / r["usable_bytes"]
    return [
        r["target"],
        f"{r['devices']} ({r['processes']} proc)",
        tables.cell(r["compile_seconds"], "{:.0f} s"),
        memory,
        tables.cell(share, "{:.0%}") + f" of {costs.gib(r['usable_bytes'])}",
        tables.cell(r["gflops_per_image"], "{:.3g}"),
        tables.cell(r["hbm_mb_per_image"], "{:.0f}"),
        tables.cell(r["roofline_images_per_sec"], "{:,.0f}")
        + (f" ({r['roofline_bound']})" if r["roofline_bound"] else ""),
        max_batch,
        r["verdict"] + (f": {r['reason']}" if r["reason"] else ""),
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    return tables.text(TABLE_HEADER, [table_row(r) for r in rows], left=len(TABLE_HEADER))


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
