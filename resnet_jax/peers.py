"""Noticing, within seconds and by name, that another process of a multi-process run has died.

When a process dies, the others wait in their next collective; JAX's coordination service declares
it dead only after its heartbeat timeout and then aborts every survivor with a native stack dump.
`PeerMonitor` is quicker and says who: every process bumps a counter of its own in the coordination
service's key-value store each second, and a process whose counter stands still for
`PEER_TIMEOUT_SECONDS` is reported, by every survivor, in one `error:` line before the process exits
with `cli.PEER_LOST_STATUS`. The bound is in docs/scaling.md ("When a process dies").
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from resnet_jax.errors import first_line

PEER_TIMEOUT_SECONDS = 15.0  # under parallel.HEARTBEAT_TIMEOUT_SECONDS, so that this message comes first
PEER_LOST_STATUS = 4  # 2: a user error, 3: the watchdog
PREFIX = "resnet_jax/alive/"


def report_and_exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST_STATUS)  # JAX's exit handler would wait for the dead peer at a barrier


# What the runtime's error says when a collective lost its partner (gloo's sockets on CPUs, the
# coordination service everywhere). Errors that merely mention NCCL or a peer (out of memory, peer
# access) are not lost peers: blaming a peer would abandon the checkpoint writes in flight.
LOST_PEER_SIGNS = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "socket closed",
    "heartbeat timeout",
    "unavailable:",
)
NOT_LOST_PEER_SIGNS = ("resource_exhausted", "out of memory")


class PeerLostError(RuntimeError):
    """A computation across processes failed because another process is gone."""


def lost_peer(error: BaseException) -> PeerLostError | None:
    """`error` (raised by a computation) as a `PeerLostError` when it says that a peer is gone."""
    text = str(error).lower()
    if jax.process_count() < 2 or any(sign in text for sign in NOT_LOST_PEER_SIGNS):
        return None
    if not any(sign in text for sign in LOST_PEER_SIGNS):
        return None
    me, count = jax.process_index(), jax.process_count()
    others = [p for p in range(count) if p != me]
    who = f"process {others[0]}" if len(others) == 1 else "another process"
    detail = first_line(str(error))
    return PeerLostError(lost_message(me, count, f"a collective with {who} failed", detail))


def lost_message(
    me: int, count: int, what: str, detail: str, cause: str = "it has died or lost its network"
) -> str:
    return (
        f"process {me} of {count}: {what}{f' ({detail})' if detail else ''}; {cause}, and this process "
        "stops too. Restart every process with the same command: the run resumes from its last "
        'checkpoint (docs/scaling.md, "When a process dies")'
    )


def coordination_client() -> Any | None:
    """JAX's client of the coordination service (a private attribute), or None when alone."""
    from jax._src import distributed

    return getattr(distributed.global_state, "client", None) if jax.process_count() > 1 else None


class PeerMonitor:
    """A context manager around the training loop of a multi-process run (a no-op in one process).

    Peers count only once they have been seen, so a slow start is not a death. A process leaving
    the loop marks itself done, so the others may finish later without alarm.
    """

    def __init__(
        self,
        timeout: float = PEER_TIMEOUT_SECONDS,
        *,
        client: Any | None = None,
        on_lost: Callable[[str], None] = report_and_exit,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 1.0,
    ):
        self.client = client if client is not None else coordination_client()
        self.timeout, self.on_lost, self.clock, self.interval = timeout, on_lost, clock, interval
        self.me, self.count = jax.process_index(), jax.process_count()
        self.beats = 0
        self.last_round = clock()  # the last round in which the coordination service answered
        self.seen: dict[int, tuple[str, float]] = {}  # process -> (last value, when it last changed)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="resnet_jax-peers", daemon=True)

    def __enter__(self) -> PeerMonitor:
        if self.client is not None:
            self.beat()
            self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, *_: Any) -> None:
        if self.client is None:
            return
        self.stopped.set()
        self.thread.join()
        # "done": finished, the others may go on alone; "failed: ...": they stop at once, saying why.
        state = "done" if kind is None else f"failed: {kind.__name__}: {first_line(str(error), 200)}"
        with contextlib.suppress(Exception):  # the coordinator is gone too; the exit says so
            self.client.key_value_set(f"{PREFIX}{self.me}", state, allow_overwrite=True)

    def beat(self) -> None:
        self.beats += 1
        self.client.key_value_set(f"{PREFIX}{self.me}", str(self.beats), allow_overwrite=True)

    def check(self) -> str | None:
        """One round: beat, read every peer's counter; the message when one has stopped."""
        now = self.clock()
        try:
            self.beat()
            values = dict(self.client.key_value_dir_get(PREFIX))
        except Exception as e:  # the service lives in process 0; one failed round may be a hiccup
            if now - self.last_round <= self.timeout:
                return None
            what = (
                f"the coordination service (in process 0) has not answered for {now - self.last_round:.0f}s"
            )
            return lost_message(self.me, self.count, what, first_line(str(e)) or type(e).__name__)
        self.last_round = now
        for key, value in values.items():
            process = int(key.rsplit("/", 1)[-1])
            if process == self.me or value == "done":
                self.seen.pop(process, None)
                continue
            if value.startswith("failed: "):
                what = f"process {process} stopped with an error"
                cause = "its output says why"
                return lost_message(self.me, self.count, what, value.removeprefix("failed: "), cause)
            last = self.seen.get(process)
            if last is None or last[0] != value:
                self.seen[process] = (value, now)
            elif now - last[1] > self.timeout:
                what = f"process {process} stopped responding {now - last[1]:.0f}s ago"
                return lost_message(self.me, self.count, what, "")
        return None

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            message = self.check()
            if message is not None:
                self.on_lost(message)
                return
