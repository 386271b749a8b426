"""Every test module collects with only the `test` extra installed: a `.[test]` venv has neither
libtpu nor the CUDA plugin, and a TPU VM (`jax[tpu]`) has libtpu but no `jax_plugins`. A module that
needs the `preflight` extra at import time (`import libtpu`, or `find_spec("jax_plugins.xla_cuda12")`,
which raises when `jax_plugins` is missing) breaks `pytest` there, and the accelerator check with it.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import ROOT, module_available

# What `pip install -e '.[preflight]'` adds (jax[tpu,cuda12-local]), as top-level modules.
PREFLIGHT_MODULES = ("libtpu", "jax_plugins", "jax_cuda12_plugin", "jax_cuda12_pjrt")

# Runs in a fresh interpreter: makes every finder on sys.meta_path blind to the hidden packages, so
# that they behave as if never installed (find_spec of the package gives None, an import or a
# find_spec of one of its submodules raises ModuleNotFoundError), then runs pytest.
HIDE_AND_RUN_PYTEST = """
import sys

hidden = set(sys.argv[1].split(","))


class Blind:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Blind(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
for name in [m for m in sys.modules if m.partition(".")[0] in hidden]:
    del sys.modules[name]

import importlib.util

assert not any(importlib.util.find_spec(name) for name in hidden), "the packages are not hidden"
import pytest

sys.exit(pytest.main(sys.argv[2:]))
"""


def collect_without(hidden):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # collection needs no device
    return subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN_PYTEST, ",".join(hidden)]
        + ["--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_find_spec_of_a_submodule_raises_when_its_package_is_missing():
    """Why `module_available` exists: find_spec imports the parent package of a dotted name."""
    with pytest.raises(ModuleNotFoundError):
        importlib.util.find_spec("resnet_jax_no_such_package.submodule")
    assert not module_available("resnet_jax_no_such_package.submodule")
    assert not module_available("resnet_jax_no_such_package")
    assert module_available("resnet_jax.models")


@pytest.mark.slow
@pytest.mark.parametrize(
    "hidden",
    [
        pytest.param(PREFLIGHT_MODULES, id="test-extra-only"),
        # libtpu without jax_plugins: `find_spec("jax_plugins.xla_cuda12")` would raise there.
        pytest.param(("jax_plugins", "jax_cuda12_plugin", "jax_cuda12_pjrt"), id="tpu-vm"),
    ],
)
def test_every_test_module_collects_without_the_preflight_extra(hidden):
    result = collect_without(hidden)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "collected" in summary and "error" not in summary.lower(), output[-5000:]
    assert "ERROR" not in result.stdout, output[-5000:]
    # The modules that look for the extra are collected, not skipped whole.
    assert "tests/test_preflight.py::" in result.stdout and "tests/test_accelerator.py::" in result.stdout
