"""Device mesh, shardings, host-local <-> global arrays, and joining a multi-process run.

One `Mesh` over every device of every host with a single `data` axis: batches
are split along it, the train state is replicated. Under `jax.jit` with these
shardings, BatchNorm's batch mean is a mean over the *global* batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import cpu_host
from resnet_jax.errors import ConfigError

DATA_AXIS = "data"


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    if devices is None:
        with cpu_host.quiet_driver_probes():  # the backends start here, probing for drivers
            devices = jax.devices()
    if not devices:
        raise ValueError("no JAX devices found; check the JAX installation (jax.devices() is empty)")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_unit(num_devices: int, grad_accum_steps: int = 1, bn_group_size: int = 0) -> int:
    """The global batch must be a multiple of this: every device gets the same share of each of
    the `grad_accum_steps` micro-batches, and with `bn_group_size` k > 0 that share holds whole
    BatchNorm groups of k examples."""
    return num_devices * grad_accum_steps * max(bn_group_size, 1)


def batch_size_error(
    key: str, global_batch_size: int, num_devices: int, *, grad_accum_steps: int = 1, bn_group_size: int = 0
) -> str | None:
    """Why a global batch cannot be split over `num_devices` (None when it can; see `batch_unit`)."""
    if global_batch_size < 1:
        return f"{key}={global_batch_size} must be a positive integer"
    unit = batch_unit(num_devices, grad_accum_steps, bn_group_size)
    if global_batch_size % unit == 0:
        return None
    over = f"{num_devices} device{'s' if num_devices > 1 else ''}"
    if grad_accum_steps > 1:
        over += f" x grad_accum_steps={grad_accum_steps} micro-batches"
    if bn_group_size:
        over += f" x bn_group_size={bn_group_size} examples per BatchNorm group"
    lower = global_batch_size // unit * unit or unit
    return (
        f"{key}={global_batch_size} does not divide over {over}; "
        f"use a multiple of {unit} (e.g. {lower} or {lower + unit})"
    )


def check_batch_size(
    key: str, global_batch_size: int, mesh: Mesh, *, grad_accum_steps: int = 1, bn_group_size: int = 0
) -> None:
    """Raise `ConfigError` (`batch_size_error`'s message) unless the global batch splits over `mesh`."""
    if mesh.devices.size < 1:
        raise ValueError("the device mesh is empty: no JAX devices to train on")
    require_split(
        key,
        global_batch_size,
        mesh.devices.size,
        grad_accum_steps=grad_accum_steps,
        bn_group_size=bn_group_size,
    )


def require_split(
    key: str, global_batch_size: int, num_devices: int, *, grad_accum_steps: int = 1, bn_group_size: int = 0
) -> None:
    """`batch_size_error`'s message as a `ConfigError`, when there is one."""
    error = batch_size_error(
        key, global_batch_size, num_devices, grad_accum_steps=grad_accum_steps, bn_group_size=bn_group_size
    )
    if error:
        raise ConfigError(error)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """This process's rows of every global batch: the processes hold equal shares of the devices."""
    if global_batch_size % process_count:
        raise ConfigError(
            f"a global batch of {global_batch_size} does not split over {process_count} processes"
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class RunSizes:
    """How a run's batch and length split: what train, data, the studies and preflight agree on."""

    global_batch: int
    local_batch: int  # this process's rows of every global batch
    batch_unit: int  # the global batch is a multiple of this (`batch_unit`)
    steps_per_epoch: int  # whole global batches in one pass over the train split (at least 1)
    total_steps: int  # config.num_train_steps, or num_epochs of steps_per_epoch


def run_sizes(
    config: Any, num_train: int, num_devices: int = 1, process_count: int = 1, key: str = "config.batch_size"
) -> RunSizes:
    """The sizes of a run of `config` over `num_train` train examples; `ConfigError` when its
    batch does not split over `num_devices` devices (of `process_count` processes)."""
    require_split(
        key,
        config.batch_size,
        num_devices,
        grad_accum_steps=config.grad_accum_steps,
        bn_group_size=config.bn_group_size,
    )
    steps_per_epoch = max(1, num_train // config.batch_size)
    total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    return RunSizes(
        global_batch=config.batch_size,
        local_batch=local_batch_size(config.batch_size, process_count),
        batch_unit=batch_unit(num_devices, config.grad_accum_steps, config.bn_group_size),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
    )


def to_global(
    batch: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int | None = None
) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into one array sharded over the mesh.

    With `global_batch_size`, first check that this process holds exactly its devices' share.
    """
    if global_batch_size is not None:
        local_devices = len(sharding.addressable_devices)
        expected = global_batch_size * local_devices // sharding.num_devices
        for key, value in batch.items():
            if len(value) != expected:
                raise ValueError(
                    f"process {jax.process_index()} has {len(value)} rows of {key!r} for its "
                    f"{local_devices} of {sharding.num_devices} devices; a global batch of "
                    f"{global_batch_size} needs {expected} here"
                )
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def in_order(outputs: Any) -> Any:
    """`outputs`, finished first when several CPU devices share collectives (a no-op otherwise).

    XLA's CPU client runs independent programs (the eval steps) concurrently, and their gloo
    collectives can then meet in different orders on different processes and deadlock; with several
    virtual devices in one process, concurrent programs compete for the same rendezvous threads (a
    run on an oversubscribed CI machine once aborted there). GPUs and TPUs run programs in order.
    Train steps are chained by the state and need no help.
    """
    if jax.device_count() > 1 and jax.devices()[0].platform == "cpu":
        jax.block_until_ready(outputs)
    return outputs


def describe(mesh: Mesh) -> str:
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return f"{mesh.devices.size} device(s) ({', '.join(kinds)}) on {jax.process_count()} process(es)"


# Clusters whose environment names every process (JAX's detection names); others need --distributed.
AUTO_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")


def cluster_process_count() -> int:
    """The number of processes of the job, as the cluster JAX detects says (1 without one).

    JAX's own detection (Cloud TPU VMs, SLURM, Open MPI) lives in a private module; a JAX that
    moved it counts as no cluster (pass `--distributed` then).
    """
    try:
        from jax._src.clusters import ClusterEnv

        for env in ClusterEnv._cluster_types:
            if env.name in AUTO_CLUSTERS and env.is_env_present():
                return int(env.get_process_count())
    except Exception:
        pass
    return 1


def check_distributed_args(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    distributed: bool | None,
) -> None:
    """Raise a ValueError for flags that cannot describe a multi-process run."""
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if len(missing) not in (0, 3):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together; missing "
            f"{', '.join(missing)} (on Cloud TPU VMs and SLURM leave all three out)"
        )
    if missing:
        return
    if distributed is False:
        raise ValueError("--nodistributed contradicts --coordinator_address/--num_processes/--process_id")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--num_processes={num_processes} --process_id={process_id}: need num_processes >= 1 "
            "and 0 <= process_id < num_processes"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. 10.0.0.2:1234"
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    distributed: bool | None = None,
) -> bool:
    """Join a multi-process run (call it before any other JAX call); True when it joined.

    `distributed` None (auto) joins when the three arguments are given or the cluster's environment
    names more than one process; True always joins (JAX fills unset arguments from the
    environment); False never.
    """
    check_distributed_args(coordinator_address, num_processes, process_id, distributed)
    if jax.distributed.is_initialized():
        return True
    if distributed is False:
        return False
    if distributed is None and coordinator_address is None and cluster_process_count() < 2:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_SECONDS,
    )
    return True


# A process whose coordination heartbeats stop for this long is declared dead, and JAX aborts every
# other process (its default is 100 s). `peers.PeerMonitor` names a dead peer sooner; this is the
# backstop. At exit, processes wait this long for each other.
HEARTBEAT_TIMEOUT_SECONDS = 60
SHUTDOWN_TIMEOUT_SECONDS = 60
