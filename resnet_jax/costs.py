"""What a step costs: XLA's FLOP and byte counts, memory, MFU and the roofline bound.

One place for the figures that `python -m resnet_jax.models`, `benchmark.py` (and through its rows
the accelerator check), the preflight and the loader benchmark's feed report all print, so that
they count the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import targets


def cost_analysis(stage: jax.stages.Lowered | jax.stages.Compiled) -> dict[str, float]:
    """XLA's cost analysis as one dict ({} where the backend has none).

    A lowered program on a plugin backend (GPU, TPU, compile-only devices) is counted by the CPU's
    cost model (`cpu_cost_analysis`): the count of an unoptimised program does not depend on who counts.
    """
    try:
        analysis = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - plugin backends refuse lowered programs; others have no model
        analysis = None
    if isinstance(analysis, list | tuple):  # older JAX: one dict per executable
        analysis = analysis[0] if analysis else None
    if not analysis and not isinstance(stage, jax.stages.Compiled):
        analysis = cpu_cost_analysis(stage)
    return dict(analysis or {})


def xla_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    """XLA's FLOP count of a lowered or compiled program; None where no cost model answers.

    Count on the lowered program for the model's FLOPs: it is the whole (unpartitioned) program
    before backend rewrites, and a GPU backend's compiled cost analysis leaves out the convolutions,
    which it hands to cuDNN as custom calls.
    """
    flops = cost_analysis(stage).get("flops")
    return float(flops) if flops and flops > 0 else None


def cpu_cost_analysis(lowered: jax.stages.Lowered) -> dict[str, float] | None:
    """XLA's CPU cost model on a lowered program of any platform.

    Plugin backends (the CUDA and TPU plugins) do not analyse lowered programs, but the count of an
    unoptimised program does not depend on who counts it, and every JAX has a CPU client. This
    reaches into JAX's internals (`_lowering`, `_jax.hlo_module_cost_analysis`): when they move,
    the FLOPs are unknown (None), never wrong.
    """
    try:
        from jax._src.lib import _jax
        from jax.extend import backend

        module = lowered._lowering.hlo().as_hlo_module()
        return _jax.hlo_module_cost_analysis(backend.get_backend("cpu"), module)
    except Exception:  # noqa: BLE001 - internals that moved, or no CPU client (JAX_PLATFORMS)
        return None


def forward_flops(module: nn.Module, image_size: int, channels: int = 3) -> float | None:
    """FLOPs of one eval-mode forward pass of one image (XLA's count, nothing compiled)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return xla_flops(jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x))


def step_flops_per_device(lowered: jax.stages.Lowered, num_devices: int) -> float | None:
    """The model FLOPs of one step on one device: XLA's count of the lowered program over the devices.

    Counted before compilation (`xla_flops`): the lowered program is the whole step, the same on
    every backend, while a GPU's compiled cost analysis omits the cuDNN convolutions. The step is
    data-parallel, so each device does a 1/N share (the replicated optimizer update, a sliver of the
    total, is counted once).
    """
    flops = xla_flops(lowered)
    return flops / num_devices if flops else None


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
    """Advertised dense peak FLOP/s of one device for `dtype` (`targets.ACCELERATORS`); None if unknown."""
    accelerator = targets.accelerator_for_kind(device_kind)
    return accelerator.peak_flops.get(dtype) if accelerator else None


def mfu(flops_per_device: float | None, step_seconds: float, peak_per_device: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s of one device over its peak; None if either is unknown."""
    if not flops_per_device or not peak_per_device or step_seconds <= 0:
        return None
    return flops_per_device / step_seconds / peak_per_device


def roofline(
    accelerator: targets.Accelerator,
    dtype: str,
    flops_per_image: float | None,
    bytes_per_image: float | None,
) -> tuple[float | None, str | None]:
    """(images/s one device cannot exceed, what bounds it: "FLOPs" or "HBM"); (None, None) if unknown.

    The lesser of peak FLOP/s over the FLOPs per image and HBM bandwidth over the bytes per image.
    """
    bounds = {}
    if flops_per_image and accelerator.peak_flops.get(dtype):
        bounds["FLOPs"] = accelerator.peak_flops[dtype] / flops_per_image
    if bytes_per_image and accelerator.hbm_bandwidth:
        bounds["HBM"] = accelerator.hbm_bandwidth / bytes_per_image
    if not bounds:
        return None, None
    bound = min(bounds, key=bounds.__getitem__)
    return bounds[bound], bound


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays (or shapes) of a tree."""
    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Per-device memory the compiled step needs (arguments + outputs + temporaries - donated)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not implemented on some backends
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(total)


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


def gib(n: float | None) -> str:
    """Bytes as "12.34 GiB" ("-" where unknown)."""
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def gflops_column(flops: float | None) -> str:
    """The models table's GFLOPs: 'unknown' where no cost model answers, rather than a TypeError."""
    return f"{flops / 1e9:8.3f}" if flops else "unknown"
