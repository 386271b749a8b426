"""Device mesh, shardings and host-local <-> global arrays.

One `Mesh` over every device of every host with a single `data` axis: batches
are split along it, the train state is replicated. Under `jax.jit` with these
shardings, BatchNorm's batch mean is a mean over the *global* batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if not devices:
        raise ValueError("no JAX devices found; check the JAX installation (jax.devices() is empty)")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(key: str, global_batch_size: int, mesh: Mesh) -> int:
    """The per-process share of a global batch; raise if it does not split evenly over devices."""
    num_devices = mesh.devices.size
    if global_batch_size < 1:
        raise ValueError(f"{key}={global_batch_size} must be a positive integer")
    if global_batch_size % num_devices:
        lower = global_batch_size // num_devices * num_devices
        raise ValueError(
            f"{key}={global_batch_size} does not divide over {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {lower or num_devices} or {lower + num_devices})"
        )
    return global_batch_size // jax.process_count()


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into one array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def is_primary() -> bool:
    """Only process 0 logs and writes metrics."""
    return jax.process_index() == 0


def describe(mesh: Mesh) -> str:
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return f"{mesh.devices.size} device(s) ({', '.join(kinds)}) on {jax.process_count()} process(es)"


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))
