"""Shared fixtures: small configs and a subprocess runner for the command-line tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `configs` imports like it does for train.py


def digits_config(**overrides):
    from configs import digits

    config = digits.get_config()
    config.update(overrides)
    return config


@pytest.fixture
def make_digits_config():
    return digits_config


def run_script(*args, env=None, timeout=600):
    """Run a repository script in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


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
