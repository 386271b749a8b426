"""JAX's persistent compilation cache, switched on with settings that suit this project.

A second start of `train.py` or `benchmark.py` with the same model, shapes and
JAX version loads the compiled executables from disk instead of compiling them
again (seconds on CPU, tens of seconds to minutes with GPU autotuning). JAX's
defaults only cache compiles longer than one second; on CPU many of ours are
shorter, so the threshold is lower here.

The cache is trusted code: keep it in a directory only you can write to.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from resnet_jax.errors import UserError

DEFAULT_DIRECTORY = os.path.join("~", ".cache", "resnet_jax", "jax_cache")
# Below this a recompile is about as quick as reading the entry back.
MIN_COMPILE_SECONDS = 0.1


class CompilationCacheError(UserError, ValueError):
    """An explicitly chosen cache directory that cannot be created or written."""


def default_directory() -> str:
    """`$XDG_CACHE_HOME/resnet_jax/jax_cache` when XDG_CACHE_HOME is set, else under ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return os.path.join(base, "resnet_jax", "jax_cache")
    return os.path.expanduser(DEFAULT_DIRECTORY)


def enable_compilation_cache(
    directory: str | None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS
) -> str | None:
    """Cache compiled executables in `directory` (None: `default_directory()`; "": leave it off).

    Returns the directory in use, or None when the cache stays off. An explicit
    directory that cannot be created is a `CompilationCacheError`; an unusable default
    directory only turns the cache off, so that a read-only home never stops a run.
    It takes effect for every later compile, also when something was compiled before.
    """
    if directory == "":
        return None
    explicit = directory is not None
    path = os.path.abspath(os.path.expanduser(directory)) if explicit else default_directory()
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        if explicit:
            raise CompilationCacheError(f"compilation_cache_dir={directory!r} cannot be used: {e}") from None
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX reads these settings once, at its first compile; make them count from now on.
    compilation_cache.reset_cache()
    return path
