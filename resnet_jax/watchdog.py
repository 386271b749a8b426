"""A watchdog that ends a run which stops making progress, instead of letting it wait forever.

A hung collective (a peer that died or deadlocked, a lost network) blocks every process of a
multi-process run in native code, without a word. The training loop hands the watchdog the outputs
of each unit of work it dispatches (a train step, an eval batch); a thread polls them for
completion. When nothing completes within the bound, the watchdog prints every thread's Python
stack and one `error:` line naming the unit and the process, then ends the process with
`HANG_STATUS`: it cannot raise into a main thread that is blocked in native code.

The bound (docs/scaling.md, "When a run hangs"): `config.watchdog_seconds` when set, else
`factor` x the longest step so far + the longest compile, and never below `floor`. Long one-off
operations (compiling, the first evaluation, a checkpoint save) run under `long_operation`, which
raises the bound to at least `config.watchdog_compile_seconds` while they last.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

HANG_STATUS = 3  # 2 is a user error (cli.USER_ERROR_STATUS)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """How long a run may go without progress, in seconds."""

    fixed: float = 0.0  # config.watchdog_seconds; 0: automatic
    compile: float = 1800.0  # config.watchdog_compile_seconds: during long operations
    factor: float = 10.0
    floor: float = 60.0

    def limit(self, longest_step: float, longest_compile: float, in_long_operation: bool) -> float:
        limit = self.fixed or max(self.floor, self.factor * longest_step + longest_compile)
        return max(limit, self.compile) if in_long_operation else limit

    def describe(self) -> str:
        if self.fixed:
            return f"config.watchdog_seconds={self.fixed:g}"
        return f"{self.factor:g} x the longest step + the longest compile, at least {self.floor:g}s"


@dataclasses.dataclass
class _Unit:
    label: str
    marker: jax.Array


def _report_and_exit(message: str) -> None:
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(HANG_STATUS)


class Watchdog:
    """Use as a context manager around the loop; `track` each dispatched unit of work.

    `on_hang(message)` defaults to printing the stacks and the message and exiting; tests pass their
    own. `clock` and `poll_seconds` are for tests too.
    """

    def __init__(
        self,
        bounds: Bounds,
        *,
        on_hang: Callable[[str], None] = _report_and_exit,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 1.0,
    ):
        self.bounds, self.on_hang, self.clock, self.poll_seconds = bounds, on_hang, clock, poll_seconds
        self.process = f"process {jax.process_index()} of {jax.process_count()}"
        self.pending: collections.deque[_Unit] = collections.deque()
        self.long_operations: list[str] = []
        self.long_since_progress = False
        self.longest_step = self.longest_compile = 0.0
        self.last_progress, self.last_completed = clock(), "none yet"
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._watch, name="resnet_jax-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self.last_progress = self.clock()
        self.thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stopped.set()
        self.thread.join()

    def track(self, label: str, outputs: Any) -> None:
        """`outputs` of a dispatched unit of work (small ones: they are kept until complete)."""
        leaves = jax.tree.leaves(outputs)
        if leaves:
            with self.lock:
                self.pending.append(_Unit(label, leaves[0]))

    @contextlib.contextmanager
    def long_operation(self, what: str) -> Iterator[None]:
        """A one-off operation that may take minutes (compiling, a checkpoint save); its end is progress."""
        with self.lock:
            self.long_operations.append(what)
            self.long_since_progress = True
        try:
            yield
        finally:
            with self.lock:
                self.long_operations.remove(what)
                self._progress(f"{what} (done)")

    def limit(self) -> float:
        return self.bounds.limit(self.longest_step, self.longest_compile, bool(self.long_operations))

    def _progress(self, label: str) -> None:
        now = self.clock()
        elapsed = now - self.last_progress
        if self.long_since_progress:
            self.longest_compile = max(self.longest_compile, elapsed)
        else:
            self.longest_step = max(self.longest_step, elapsed)
        self.last_progress, self.last_completed = now, label
        self.long_since_progress = bool(self.long_operations)

    def check(self) -> str | None:
        """Record the units completed since the last check; the hang message when past the bound."""
        with self.lock:
            while self.pending and self._finished(self.pending[0]):
                self._progress(self.pending.popleft().label)
            waited, limit = self.clock() - self.last_progress, self.limit()
            if waited <= limit:
                return None
            if self.long_operations:
                stuck = f"{self.long_operations[-1]} has not finished"
            elif self.pending:
                stuck = f"{self.pending[0].label} has not completed"
            else:
                stuck = "no new step or eval batch was started"
            return (
                f"{self.process}: {stuck} after {waited:.0f}s without progress (last completed: "
                f"{self.last_completed}); the watchdog's bound is {limit:.0f}s "
                f"({self.bounds.describe()}). Every thread's Python stack is printed above. A peer "
                "process that died or hung stops the others too: look at every process's output "
                '(docs/scaling.md, "When a run hangs")'
            )

    @staticmethod
    def _finished(unit: _Unit) -> bool:
        try:
            return unit.marker.is_ready()
        except Exception:  # its computation failed: the main thread raises that error itself
            return True

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_seconds):
            message = self.check()
            if message is not None:
                self.on_hang(message)
                return
