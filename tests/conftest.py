"""Shared fixtures: small configs and a subprocess runner for the command-line tests."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `configs` imports like it does for train.py
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU, known without starting JAX (which would fix its flags)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


# The preflight extra installs libtpu and the CUDA plugin. Without the hardware they would start,
# fail and print a traceback in every test process: on a machine without an accelerator, the suite
# (and its subprocesses) runs on the CPU. Importing the package does that (resnet_jax.cpu_host), as
# it does for users; XLA_FLAGS below still apply, as JAX reads them when its backends start.
import resnet_jax  # noqa: E402, F401


def xla_flags_with(*flags: str) -> str:
    """This process's XLA_FLAGS with `flags` appended (subprocess environments start from it)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


# On the CPU the suite is dominated by XLA compiling small programs that then run a few steps:
# compile fast rather than optimise (about 20 % less CPU here). Subprocesses inherit it unless they
# set their own. On an accelerator host (the accelerator check) the backend keeps its defaults.
if runs_on_cpu():
    os.environ["XLA_FLAGS"] = xla_flags_with("--xla_backend_optimization_level=0")


def digits_config(**overrides):
    from configs import digits

    config = digits.get_config()
    config.eval_images = 0  # the TensorBoard image grid compiles a predict step; test_metrics turns it on
    config.update(overrides)
    return config


@pytest.fixture
def make_digits_config():
    return digits_config


# benchmark.py at its smallest: a CIFAR ResNet-20 at 8 px, two timed steps.
TINY_BENCHMARK = [
    "benchmark.py",
    "--model=resnet20",
    "--image_size=8",
    "--batch_size=8",
    "--steps=2",
    "--warmup_steps=1",
]


def run_script(*args, env=None, timeout=600, cwd=ROOT):
    """Run a repository script in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    """A TCP port free on localhost now, for a two-process run's coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(command, *flags, per_process=lambda i: []):
    """`command` (a script and its leading arguments) as two local processes of one run, with two
    virtual CPU devices each and output captured: a small multi-host cluster."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=2"),
    }
    return [
        subprocess.Popen(
            [sys.executable, *command, *flags, *per_process(i)]
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.fixture(scope="session", autouse=True)
def private_compilation_cache(tmp_path_factory):
    """A compilation cache per test session (and xdist worker), so that a test killed mid-write can
    never leave a truncated entry in the user's ~/.cache for later runs."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def tiny_resnet(**options):
    """A 6-layer CIFAR ResNet (one basic block per stage, two stages, width 8): cheap to compile."""
    from resnet_jax import models

    arch = dict(models.MODELS["resnet20"], stage_sizes=(1, 1), width=8)
    return models.ResNet(**{"num_classes": 10, "zero_init_residual": False, **arch, **options})


def fixed_digits_batch(size=64, image_size=8):
    """`size` digits train examples (uint8 images, labels) and the dataset's info."""
    import numpy as np

    from resnet_jax import data

    dataset = data.load(digits_config(image_size=image_size))
    pick = np.random.default_rng(0).choice(dataset.info.num_train, size, replace=False)
    examples = [dataset.eval_transform(dataset.train_source[int(i)]) for i in pick]
    batch = {
        "image": np.stack([e["image"] for e in examples]),
        "label": np.array([e["label"] for e in examples]),
    }
    return dataset.info, batch


def module_available(name: str) -> bool:
    """Whether `name` can be imported, without importing it. `importlib.util.find_spec("a.b")` imports
    `a` and raises ModuleNotFoundError when `a` is missing (jax_plugins, without the preflight extra)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
