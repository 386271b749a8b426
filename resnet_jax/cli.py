"""What every command line shares: absl flags, the flags several tools define, and one error policy.

`train.py`, `benchmark.py` and every `python -m resnet_jax.TOOL` parse absl flags. The `python -m`
tools define theirs on their own `flags.FlagValues` (tools imported into one process, like the
tests, would otherwise clash over same-named flags), parse with `parse`, and run their work under
`run`, which prints a `UserError` as one `error: ...` line and returns exit status 2. A bad flag is
also one `error:` line, with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

from resnet_jax import parallel
from resnet_jax.errors import UserError

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


def run(work: Callable[[], int | None]) -> int:
    """`work()`'s exit status (None: 0), or 2 after printing a `UserError` as one line."""
    try:
        return work() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS
