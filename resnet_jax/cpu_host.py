"""A clean start on hosts without an accelerator.

The `preflight` extra installs the CUDA plugin and libtpu (to compile for GPUs and TPUs on a CPU).
On a host without those devices JAX would then try both at its first computation, print a
traceback and a libtpu warning, and only then fall back to the CPU; and the CUDA plugin's libraries
print "Could not find cuda drivers" from native code each time they load. Where no accelerator's
device node exists, `resnet_jax` therefore selects the CPU itself (unless `JAX_PLATFORMS` says
otherwise) and drops those driver lines from stderr while JAX loads. Nothing here acts on a host
that has a GPU or TPU device node.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# NVIDIA GPUs (and their control node, present before the per-GPU nodes exist), TPUs (v2-v3: accel,
# v4 and later: vfio), AMD GPUs, WSL2's GPU, and render nodes of any other GPU.
ACCELERATOR_DEVICE_NODES = (
    "/dev/nvidia[0-9]*",
    "/dev/nvidiactl",
    "/dev/accel[0-9]*",
    "/dev/vfio/[0-9]*",
    "/dev/kfd",
    "/dev/dxg",
    "/dev/dri/renderD*",
)
DRIVER_NOISE = (
    re.compile(rb"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"),
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
)


def has_accelerator() -> bool:
    """Whether this host may have an accelerator: any device node above, the NVIDIA driver's library,
    or a platform other than Linux (where this check knows too little to act)."""
    if not sys.platform.startswith("linux"):
        return True
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_NODES) or bool(
        ctypes.util.find_library("cuda")
    )


def runs_on_cpu_only() -> bool:
    """Whether this process will use the CPU alone: JAX_PLATFORMS says so, or no accelerator exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return platforms == "cpu" if platforms else not has_accelerator()


def select_cpu_without_accelerator() -> None:
    """Set JAX_PLATFORMS=cpu (inherited by subprocesses, like the tests') when no accelerator exists
    and the user chose no platform."""
    if os.environ.get("JAX_PLATFORMS") or has_accelerator():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before resnet_jax; its backends start at the first computation
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def register_plugins() -> None:
    """Where the process runs on the CPU alone, let JAX find and initialise its PJRT plugins now (the
    CUDA plugin probes for drivers then), rather than when the first computation starts the
    backends. Registering starts no backend, so `jax.distributed.initialize` may still follow. The
    function is JAX's own (private) step of starting the backends; without it nothing happens."""
    if not runs_on_cpu_only():
        return
    from jax._src import xla_bridge

    discover = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
    if discover is not None:
        discover()


@contextlib.contextmanager
def quiet_driver_probes() -> Iterator[None]:
    """Inside: native writes to stderr are kept back, then written out without `DRIVER_NOISE` lines.

    Acts only when the process runs on the CPU alone; everything else written meanwhile (an
    exception's traceback included) still reaches stderr, in order.
    """
    if not runs_on_cpu_only():
        yield
        return
    sys.stderr.flush()
    try:
        captured = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the `with` below)
    except OSError:  # no writable temporary folder: no filtering rather than no import
        yield
        return
    saved = os.dup(2)
    with captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = [line for line in lines if not any(p.search(line) for p in DRIVER_NOISE)]
            if kept:
                os.write(2, b"".join(kept))
