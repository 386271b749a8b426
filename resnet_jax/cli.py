"""What every command line shares: absl flags, the flags several tools define, and one error policy.

`train.py`, `benchmark.py` and every `python -m resnet_jax.TOOL` parse absl flags. The `python -m`
tools define theirs on their own `flags.FlagValues` (tools imported into one process, like the
tests, would otherwise clash over same-named flags), parse with `parse`, and run their work under
`run`, which prints a `UserError` as one `error: ...` line and returns exit status 2. A bad flag is
also one `error:` line, with status 2.
"""

from __future__ import annotations

import copy
import faulthandler
import glob
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from resnet_jax import defaults, parallel, peers
from resnet_jax.errors import ConfigError, UserError, closest, did_you_mean, first_line

USER_ERROR_STATUS = 2


def define_workdir(flag_values: flags.FlagValues, help_text: str, required: bool = True) -> None:
    flags.DEFINE_string("workdir", None, help_text, flag_values=flag_values)
    if required:
        flags.mark_flag_as_required("workdir", flag_values=flag_values)


def define_checkpoint(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", "latest", "best, latest or a step number.", flag_values=flag_values)


def define_distributed(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The multi-host flags of `train.py` and `benchmark.py`: every process runs the same command;
    Cloud TPU VMs, SLURM and Open MPI need none of them."""
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host: HOST:PORT of process 0, reachable from all.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Multi-host: the number of processes (one per host).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "Multi-host: this process's index, 0 .. num_processes - 1.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "distributed",
        None,
        "Call jax.distributed.initialize(). Default: when the three flags above are given or JAX detects "
        "a cluster (Cloud TPU VM, SLURM, Open MPI); --nodistributed runs alone.",
        flag_values=flag_values,
    )

    @flags.multi_flags_validator(
        ["coordinator_address", "num_processes", "process_id", "distributed"], flag_values=flag_values
    )
    def _check(values):
        try:
            parallel.check_distributed_args(**values)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's Python stack to stderr, and the run goes on: the
    first look at a process that seems stuck (docs/scaling.md)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def initialize_distributed(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    parallel.initialize_distributed(
        flag_values.coordinator_address,
        flag_values.num_processes,
        flag_values.process_id,
        flag_values.distributed,
    )


def parse(
    flag_values: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str, positional: str = ""
) -> list[str]:
    """Parse `argv` (without the program name; None: sys.argv) and return the positional arguments.

    `--help` prints the tool's docstring and flags and exits with 0; a bad flag, or positional
    arguments that the tool does not take (`positional` names them), is one `error:` line and exit 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(doc.strip() + "\n")
        print(f"usage: {prog} [flags]{' ' + positional if positional else ''}\n")
        print(flag_values.get_help(include_special_flags=False))
        raise SystemExit(0)
    try:
        rest = flag_values([prog, *args])[1:]
    except flags.Error as e:
        fail(f"{e} (see {prog} --help)")
    if rest and not positional:
        fail(f"unexpected arguments: {' '.join(rest)} (see {prog} --help)")
    return rest


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USER_ERROR_STATUS)


VALUE_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "True or False",
    "tuple": "a tuple",
}


def override_key(item: str) -> str:
    return item.removeprefix("--config.").partition("=")[0]


def unknown_key_message(item: str, keys: Iterable[str]) -> str:
    key = override_key(item)
    hint = did_you_mean(key, keys)
    return f"{item}: no config key {key!r}{hint} (the keys and their defaults: resnet_jax/defaults.py)"


def apply_config_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """`config` with `--config.KEY=VALUE` overrides, parsed by ml_collections' config flags exactly as
    `train.py` parses them (typed like the current value; tuples, None). Raises `ConfigError`."""
    for item in overrides:
        key = override_key(item)
        if not item.startswith("--config.") or key not in config:
            raise ConfigError(unknown_key_message(item, config))
    config = copy.deepcopy(config)  # a failed override leaves the caller's config as it was
    argv = ["resnet_jax", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
    except flags.Error as e:
        item = next((a for a in overrides if a.split("=")[0] in str(e)), overrides[0])
        key = override_key(item)
        kind = VALUE_KINDS.get(type(config[key]).__name__, "value")
        raise ConfigError(f"{item}: config.{key} takes {kind}, like {config[key]!r}") from None
    return flag_values.config


def check_config_file(path: str) -> None:
    """Raise `ConfigError` naming a `--config` file that cannot be read, with the nearest config file."""
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    candidates = sorted(glob.glob(os.path.join(folder, "*.py")))
    match = closest(path, candidates) or closest(os.path.basename(path), candidates)
    hint = f"; did you mean {match}?" if match else f"; the config files are in {folder}/"
    problem = "cannot be read" if os.path.exists(path) else "does not exist"
    raise ConfigError(f"config file {path!r} {problem}{hint}")


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as train.py's --config reads it."""
    check_config_file(str(path))
    spec = importlib.util.spec_from_file_location("resnet_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_file_argument(argv: Sequence[str]) -> str | None:
    """The value of `--config` in `argv` (either `--config=PATH` or `--config PATH`)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def absl_flags_parser(doc: str) -> Callable[[list[str]], list[str]]:
    """`app.run(main, flags_parser=...)` for `train.py` and `benchmark.py`: `--help` prints the usage
    and exits with 0, and a bad flag or a misspelt `--config.KEY` is one `error:` line with status 2
    (absl would print a traceback, or exit with 1 after `--help`)."""

    def parse(argv: list[str]) -> list[str]:
        prog = os.path.basename(argv[0])
        if "--help" in argv or "-h" in argv or "--helpfull" in argv:
            print(doc.strip() + "\n")
            print(flags.FLAGS.main_module_help())
            print(flags.FLAGS.module_help(sys.modules[__name__]))
            raise SystemExit(0)
        path = config_file_argument(argv)
        if path is not None and "config" in flags.FLAGS:
            try:
                check_config_file(path)
            except ConfigError as e:
                fail(str(e))
        try:
            return flags.FLAGS(argv)
        except AttributeError as e:  # ml_collections: a --config.KEY that the config does not have
            keys = defaults.get_config()  # every config completes from these (config_checks)
            item = next((a for a in argv if a.startswith("--config.") and override_key(a) not in keys), None)
            if item is None:  # raised inside the config file's get_config()
                fail(f"config file {path}: AttributeError: {first_line(str(e))}")
            fail(unknown_key_message(item, keys))
        except flags.Error as e:
            text = str(e)
            if "parsing config file" in text:  # ml_collections wraps the config file's traceback
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
                fail(f"config file {path}: {(raised or lines)[-1][:300]}")
            fail(f"{first_line(text)} (see {prog} --help)")
        except Exception as e:  # raised by the config file itself (a SyntaxError, a ValueError, ...)
            fail(f"config file {path}: {type(e).__name__}: {first_line(str(e))}")

    return parse


def run(work: Callable[[], int | None], *, listing: bool = False) -> int:
    """`work()`'s exit status (None: 0), or 2 after printing a `UserError` as one line.

    A lost peer process (`peers.PeerLostError`) is one line too, and ends this process at once with
    `peers.PEER_LOST_STATUS`. `listing` tools (tables on stdout) end quietly when the reader of their
    output goes away (`| head`).
    """
    try:
        return work() or 0
    except BrokenPipeError:
        if not listing:  # a training whose output pipe closed did not succeed
            raise
        # `python -m resnet_jax.models | head`: the reader has seen enough; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS
    except peers.PeerLostError as e:
        peers.report_and_exit(str(e))
