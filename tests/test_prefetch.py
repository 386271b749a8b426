"""Device prefetch: batches arrive on the devices ahead of the step, and the saved iterator state is
that of the batch the step consumed, so a restored run continues with the right batch."""

import json

import jax
import numpy as np

from resnet_jax import data, parallel, prefetch


class CountingIterator:
    """Batches 0, 1, 2, ...; its state is the index of the next batch."""

    def __init__(self):
        self.next_index, self.started = 0, 0

    def __next__(self):
        self.next_index += 1
        return self.next_index - 1

    def get_state(self):
        return {"next": self.next_index}

    def set_state(self, state):
        self.next_index = state["next"]

    def start_prefetch(self):
        self.started += 1


def test_the_state_is_the_consumed_batchs_not_the_prefetched_ones():
    inner = CountingIterator()
    batches = prefetch.DevicePrefetch(inner, lambda b: b * 10, depth=2)
    assert json.loads(batches.get_state()) == {"next": 0}  # nothing fetched yet
    assert next(batches) == 0
    assert inner.next_index == 3  # batches 1 and 2 already sent ahead
    assert json.loads(batches.get_state()) == {"next": 1}
    assert [next(batches), next(batches)] == [10, 20]
    saved = batches.get_state()
    later = [next(batches) for _ in range(3)]
    restored = prefetch.DevicePrefetch(CountingIterator(), lambda b: b * 10, depth=2)
    restored.set_state(saved)
    restored.start_prefetch()
    assert restored.iterator.started == 1
    assert [next(restored) for _ in range(3)] == later == [30, 40, 50]


def test_depth_zero_fetches_nothing_ahead():
    inner = CountingIterator()
    batches = prefetch.DevicePrefetch(inner, lambda b: b, depth=0)
    assert next(batches) == 0 and inner.next_index == 1


def test_a_grain_loader_through_prefetch_resumes_at_the_consumed_batch():
    """The real loader and the mesh's batch sharding: batches arrive as sharded global arrays, and
    a prefetcher restored from a saved state gives the same batches as the uninterrupted one."""
    dataset = data.load_digits(8)
    mesh = parallel.create_mesh()
    sharding = parallel.data_sharding(mesh)

    def make():
        loader = data.train_loader(dataset, global_batch_size=32, seed=3)
        return prefetch.DevicePrefetch(loader, lambda b: parallel.to_global(b, sharding, 32), depth=2)

    batches = make()
    first = next(batches)
    assert isinstance(first["image"], jax.Array) and first["image"].sharding == sharding
    for _ in range(2):
        next(batches)
    saved = batches.get_state()
    expected = [np.asarray(next(batches)["label"]) for _ in range(4)]
    batches.close()
    resumed = make()
    resumed.set_state(saved)
    got = [np.asarray(next(resumed)["label"]) for _ in range(4)]
    resumed.close()
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
