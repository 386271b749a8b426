"""Accelerators and the slices and hosts users rent, in one table: peak FLOP/s and HBM for MFU and
rooflines, and the topology that `preflight` compiles for without the hardware.

Peaks are the vendors' dense (no sparsity) figures per device. float32 on NVIDIA Ampere and newer
is the TF32 tensor-core rate (XLA's default precision lets cuDNN/cuBLAS use TF32); on TPU, float32
matmuls at default precision run as single bfloat16 passes. V100 has no bfloat16 units and TPUs
no float16 ones: those stay unknown.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from importlib import resources

from resnet_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    kind_pattern: str  # regex on JAX's `device_kind`; the first accelerator that matches wins
    peak_flops: dict[str, float]  # per device, by compute dtype
    hbm_bytes: int | None = None  # per device
    hbm_bandwidth: float | None = None  # bytes/s per device
    gpu_spec: str | None = None  # CUDA: the GpuTargetConfigProto text in resnet_jax/gpu_specs/


_HOPPER = {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}
_AMPERE = {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}
ACCELERATORS = (
    Accelerator("H100 SXM", r"NVIDIA H100 (80GB HBM3|SXM)", _HOPPER, 84_942_979_072, 3.35e12, "h100_sxm"),
    Accelerator("H100 PCIe", r"NVIDIA H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    Accelerator("H200", r"NVIDIA H200( SXM.*| 141GB.*)?$", _HOPPER, 150_754_820_096, 4.8e12, "h200_sxm"),
    Accelerator("A100 80GB", r"NVIDIA A100.*80GB", _AMPERE, 85_100_068_864, 2.039e12, "a100_sxm_80"),
    Accelerator("A100 40GB", r"NVIDIA A100", _AMPERE, 42_331_013_120, 1.555e12, "a100_sxm_40"),
    Accelerator("V100 SXM2", r"V100-SXM2", {"float16": 125e12, "float32": 15.7e12}),
    Accelerator("V100 PCIe", r"V100-PCIE", {"float16": 112e12, "float32": 14e12}),
    Accelerator("L4", r"NVIDIA L4$", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    Accelerator("TPU v4", r"TPU v4$", {"bfloat16": 275e12, "float32": 275e12}, 32 * GiB, 1.2e12),
    Accelerator("TPU v5e", r"TPU v5 ?(lite|e)$", {"bfloat16": 197e12, "float32": 197e12}, 16 * GiB, 0.819e12),
    Accelerator("TPU v5p", r"TPU v5p?$", {"bfloat16": 459e12, "float32": 459e12}, 95 * GiB, 2.765e12),
    Accelerator("TPU v6e", r"TPU v6 ?(lite|e)$", {"bfloat16": 918e12, "float32": 918e12}, 32 * GiB, 1.64e12),
)


def accelerator(name: str) -> Accelerator:
    return next(a for a in ACCELERATORS if a.name == name)


def accelerator_for_kind(device_kind: str) -> Accelerator | None:
    """The table's entry for a JAX `device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite")."""
    return next((a for a in ACCELERATORS if re.search(a.kind_pattern, device_kind)), None)


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or host as rented: its accelerator, device and process counts, and its topology."""

    name: str
    accelerator: Accelerator
    devices: int
    processes: int
    topology: str  # TPU: "v5e:2x4"; CUDA: "slices x hosts x devices per host"
    topology_options: tuple[tuple[str, object], ...] = ()  # get_topology_desc keyword arguments

    @property
    def platform(self) -> str:
        return "cuda" if self.accelerator.gpu_spec else "tpu"

    @property
    def devices_per_process(self) -> int:
        return self.devices // self.processes


def _tpu(name: str, chip: str, devices: int, processes: int, topology: str, **options: object) -> Target:
    return Target(name, accelerator(chip), devices, processes, topology, tuple(options.items()))


def _gpus(name: str, chip: str, count: int) -> Target:
    return Target(name, accelerator(chip), count, 1, f"1x1x{count}")


# TPU names count TensorCores for v4 and v5p (two per chip, one megacore device) and chips for v5e and
# v6e. Hosts: 4 chips each for v4, v5p and multi-host v5e/v6e; single-host v5e-8 and v6e-8 have 8.
_MEGACORE = {"chip_config_name": "megacore"}
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _tpu("v4-8", "TPU v4", 4, 1, "v4:2x2x1", **_MEGACORE),
        _tpu("v4-32", "TPU v4", 16, 4, "v4:2x2x4", **_MEGACORE, chips_per_host_bounds=(2, 2, 1)),
        _tpu("v5e-8", "TPU v5e", 8, 1, "v5e:2x4", chips_per_host_bounds=(2, 4, 1)),
        _tpu("v5e-16", "TPU v5e", 16, 4, "v5e:4x4", chips_per_host_bounds=(2, 2, 1)),
        _tpu("v5p-8", "TPU v5p", 4, 1, "v5p:2x2x1", **_MEGACORE),
        _tpu("v5p-16", "TPU v5p", 8, 2, "v5p:2x2x2", **_MEGACORE, chips_per_host_bounds=(2, 2, 1)),
        _tpu("v6e-8", "TPU v6e", 8, 1, "v6e:2x4", chips_per_host_bounds=(2, 4, 1)),
        *(
            _gpus(f"{short}x{count}", chip, count)
            for short, chip in (
                ("a100-40gb", "A100 40GB"),
                ("a100-80gb", "A100 80GB"),
                ("h100", "H100 SXM"),
                ("h200", "H200"),
            )
            for count in (1, 8)
        ),
    )
}
ALIASES = {"v5litepod-8": "v5e-8", "v5litepod-16": "v5e-16"}


class UnknownTargetError(UserError, ValueError):
    pass


def target(name: str) -> Target:
    """The table's target for a name users know (case-insensitive), or one line naming the valid ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in TARGETS:
        return TARGETS[key]
    close = difflib.get_close_matches(key, [*TARGETS, *ALIASES], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownTargetError(
        f"unknown target {name!r}; {hint}valid: {', '.join(TARGETS)} (aliases: {', '.join(ALIASES)})"
    )


def gpu_target_config(target: Target) -> str:
    """The GpuTargetConfigProto text that the CUDA plugin compiles for (package data)."""
    return (
        resources.files("resnet_jax.gpu_specs").joinpath(f"{target.accelerator.gpu_spec}.txtpb").read_text()
    )
