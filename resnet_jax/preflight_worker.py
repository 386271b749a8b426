"""The preflight's compiling half: one target, in a process of its own (`preflight.compile_in_subprocess`).

It builds the steps exactly as `train.py` does for the target's mesh (`compiled_steps.CompiledSteps`), from
abstract states and uint8 batch shapes, compiles them for devices that are not there, measures
memory and XLA's counts, and searches the largest batch that fits. The TPU and CUDA backends must
not share a process, and a compiler crash must not take the report down with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from resnet_jax import compiled_steps, costs, data, parallel, targets

# JAX's GPU allocator takes this fraction of device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says.
JAX_GPU_MEMORY_FRACTION = 0.75
MAX_PROBES = 6  # compiles per target that --max_batch may spend beyond the config's own


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


def usable_bytes(target: targets.Target) -> int:
    """Device memory a run may use: TPU HBM; on GPUs JAX's allocator share of it."""
    hbm = target.accelerator.hbm_bytes
    if target.platform != "cuda":
        return hbm
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEMORY_FRACTION))
    return int(hbm * fraction)


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
    """Build `compiled_steps.CompiledSteps` for the mesh at `batch_size`; compile its train or eval step."""
    import jax
    import jax.numpy as jnp

    from resnet_jax import checkpoint
    from resnet_jax.step import rng_key

    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = config.eval_batch_size = batch_size
    bad = parallel.batch_size_error(
        "config.batch_size",
        batch_size,
        target.devices,
        grad_accum_steps=config.grad_accum_steps,
        bn_group_size=config.bn_group_size,
    )
    if bad:
        return Compiled(batch_size, compiled=False, fits=False, reason=bad)
    steps = compiled_steps.CompiledSteps(config, info, mesh)
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
        state_bytes=costs.tree_bytes(state),
        batch_bytes=costs.tree_bytes(per_device),
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
    result.total_bytes = costs.compiled_memory_bytes(compiled)
    counted = costs.cost_analysis(compiled)
    flops = counted.get("flops") or 0.0
    if flops <= 0:  # the CUDA backend counts nothing: count the lowered program, a 1/N share each
        flops = (costs.xla_flops(lowered) or 0.0) / target.devices
    result.flops_per_device = flops or None
    result.bytes_accessed_per_device = counted.get("bytes accessed") or None
    usable = usable_bytes(target)
    result.compiled, result.fits = True, result.total_bytes <= usable
    if not result.fits:
        over = result.total_bytes - usable
        result.reason = (
            f"needs {costs.gib(result.total_bytes)} per device, {costs.gib(over)} over {costs.gib(usable)}"
        )
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
    from resnet_jax import inference

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
        sizes = parallel.run_sizes(config, info.num_train, target.devices, target.processes)
        largest, smallest_miss, probes = search_max_batch(
            probe, train_step, sizes.batch_unit, usable, spec["max_batch_compiles"]
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
