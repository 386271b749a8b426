"""Global batches sent to the devices ahead of the step that consumes them.

`jax.make_array_from_process_local_data` (like `jax.device_put`) returns before the copy is done,
so a batch put on the devices while the previous step runs arrives in the step's shadow. The
wrapper keeps `depth` such batches in flight: 1 is a double buffer.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from typing import Any

from resnet_jax import data


class DevicePrefetch:
    """Wraps a grain iterator of host-local batches; yields `to_device(batch)`, `depth` batches ahead.

    It is checkpoint-safe: `get_state` is the wrapped iterator's state just after the last batch
    *returned* (the one the step consumed), not after the batches still in flight, and `set_state`
    drops those. A run restored from a checkpoint therefore continues with the batch the
    interrupted run would have trained on next. The state is bytes, which is what
    `grain.checkpoint.CheckpointSave` stores for iterators that are not grain's own.
    """

    def __init__(self, iterator: Iterator[Any], to_device: Callable[[Any], Any], depth: int = 1):
        self.iterator, self.to_device, self.depth = iterator, to_device, depth
        self.in_flight: collections.deque[tuple[Any, str]] = collections.deque()
        self.consumed_state: str | None = None  # None: nothing returned since the start or a restore

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Any:
        while len(self.in_flight) <= self.depth:
            local = next(self.iterator)
            self.in_flight.append((self.to_device(local), json.dumps(self.iterator.get_state())))
        batch, self.consumed_state = self.in_flight.popleft()
        return batch

    def get_state(self) -> bytes:
        state = self.consumed_state
        return (state if state is not None else json.dumps(self.iterator.get_state())).encode()

    def set_state(self, state: bytes) -> None:
        self.in_flight.clear()
        self.iterator.set_state(json.loads(state))
        self.consumed_state = None

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore."""
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()

    def close(self) -> None:
        """Close the wrapped loader and wait for its read-ahead (`data.close_loader`)."""
        self.in_flight.clear()
        data.close_loader(self.iterator)
