"""A clean start on a host without an accelerator, with the preflight extra (the CUDA plugin and
libtpu) installed as the README says: nothing on stderr but what the tools mean to say."""

import os
import subprocess
import sys

import pytest

from resnet_jax import cpu_host
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(cpu_host.has_accelerator(), reason="this host has an accelerator")


def run_unset(*args):
    """A fresh interpreter without JAX_PLATFORMS, as a user's shell has it (the suite sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_py_and_evaluate_start_cleanly_on_a_cpu_host(tmp_path):
    train = run_unset(
        "train.py",
        "--config=configs/digits.py",
        f"--workdir={tmp_path}",
        "--config.num_train_steps=2",
        "--config.progress=lines",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert train.stderr == ""
    assert "1 device(s) (cpu) on 1 process(es)" in train.stdout
    evaluate = run_unset("-m", "resnet_jax.evaluate", f"--workdir={tmp_path}")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert evaluate.stderr == "" and "step 2 on digits" in evaluate.stdout
    for script in ("train.py", "benchmark.py"):
        shown = run_unset(script, "--help")
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr[-3000:]


def test_jax_after_resnet_jax_uses_the_cpu_quietly_and_an_explicit_choice_stays():
    code = "import resnet_jax, jax, os; print(jax.devices()[0].platform, os.environ['JAX_PLATFORMS'])"
    result = run_unset("-c", code)
    assert (result.returncode, result.stdout, result.stderr) == (0, "cpu cpu\n", "")
    env = {**os.environ, "JAX_PLATFORMS": "cpu,tpu"}
    chosen = subprocess.run(
        [sys.executable, "-c", "import resnet_jax, os; print(os.environ['JAX_PLATFORMS'])"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert chosen.stdout == "cpu,tpu\n"


def test_only_the_driver_probes_are_dropped_from_stderr():
    code = (
        "import os\n"
        "from resnet_jax import cpu_host\n"
        "with cpu_host.quiet_driver_probes():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written "
        "to STDERR\\n')\n"
        "    os.write(2, b'I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
        "not be used.\\n')\n"
        "    os.write(2, b'a real warning\\n')\n"
        "    raise SystemExit('and the error itself')\n"
    )
    result = run_unset("-c", code)
    assert result.returncode == 1
    assert result.stderr == "a real warning\nand the error itself\n"
