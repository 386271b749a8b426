"""A process of a multi-process run dies or is preempted alone: the others stop with one line naming
it, within a bound, and a restart ends bit for bit where an uninterrupted run does."""

import signal
import time

import jax
import numpy as np
import pytest

from resnet_jax import peers
from tests.conftest import start_two_processes
from tests.test_parallel import saved_state


class FakeClient:
    """The coordination service's key-value store, in a dict."""

    def __init__(self):
        self.values, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_peer_whose_counter_stops_is_named_after_the_timeout(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    client, clock = FakeClient(), Clock()
    monitor = peers.PeerMonitor(10.0, client=client, clock=clock, on_lost=None)
    assert monitor.check() is None  # peers not seen yet: a slow start is not a death
    client.values[peers.PREFIX + "1"] = "1"
    client.values[peers.PREFIX + "2"] = "1"
    assert monitor.check() is None
    clock.now = 8.0
    client.values[peers.PREFIX + "1"] = "5"  # process 1 goes on; process 2 stands still
    assert monitor.check() is None
    clock.now = 10.5
    message = monitor.check()
    assert message.startswith("process 0 of 3: process 2 stopped responding 10s ago; it has died")
    assert "Restart every process with the same command" in message
    client.values[peers.PREFIX + "2"] = "done"  # finished its loop: never a death
    assert monitor.check() is None
    client.values[peers.PREFIX + "2"] = "failed: ValueError: no such dataset"  # stopped on an error
    assert "process 2 stopped with an error (ValueError: no such dataset); its output says why" in (
        monitor.check()
    )
    del client.values[peers.PREFIX + "2"]
    client.down = True  # one failed round is a hiccup; a timeout of them is a lost coordinator
    assert monitor.check() is None
    clock.now = 21.6  # 11.1 s after the last answered round, at 10.5 s
    message = monitor.check()
    assert "the coordination service (in process 0) has not answered for 11s (UNAVAILABLE" in message


def test_the_monitor_marks_a_normal_end_done_and_an_error_failed(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    client = FakeClient()
    with peers.PeerMonitor(10.0, client=client, interval=60.0):
        pass
    assert client.values[peers.PREFIX + "0"] == "done"
    with pytest.raises(ValueError), peers.PeerMonitor(10.0, client=client, interval=60.0):
        raise ValueError("no such dataset\nsecond line")
    assert client.values[peers.PREFIX + "0"] == "failed: ValueError: no such dataset"


def test_only_errors_that_name_a_lost_connection_count_as_a_lost_peer(monkeypatch):
    reset = RuntimeError(
        "UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error: Connection reset by peer"
    )
    assert peers.lost_peer(reset) is None  # one process: nobody to lose
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    lost = peers.lost_peer(reset)
    assert str(lost).startswith("process 0 of 2: a collective with process 1 failed (UNKNOWN: Gloo")
    assert peers.lost_peer(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4GiB")) is None
    assert (
        peers.lost_peer(RuntimeError("INTERNAL: nccl_utils.cc: unhandled cuda error (peer access)")) is None
    )


def launch(workdir, steps):
    return start_two_processes(
        ["train.py"],
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        f"--config.num_train_steps={steps}",
        "--config.batch_size=16",
        "--config.image_size=8",
        "--config.log_every_steps=5",
        "--config.checkpoint_every_steps=10",
        "--config.keep_checkpoints=10",
        "--config.progress=lines",
    )


def finish(processes, timeout=240):
    try:
        return [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()


def wait_for(condition, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_dead_or_preempted_peer_stops_the_run_cleanly_and_restarts_end_bit_identical(tmp_path):
    steps = 60
    reference = launch(tmp_path / "reference", steps)
    outputs = finish(reference)
    assert [p.returncode for p in reference] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]

    # SIGKILL process 1 after the first checkpoint: process 0 names it and exits with status 4.
    run = tmp_path / "run"
    first = launch(run, steps)
    wait_for(lambda: (run / "checkpoints" / "10").exists())
    first[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first[0].wait(timeout=peers.PEER_TIMEOUT_SECONDS + 60)
    took = time.monotonic() - killed
    out, err = finish(first)[0]
    assert first[0].returncode == peers.PEER_LOST_STATUS, err[-3000:]
    assert took < peers.PEER_TIMEOUT_SECONDS + 5
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: ") and "process 1" in last, last
    assert "Traceback" not in err

    # SIGTERM to process 1 only (a preemption notice that reached one host): both save one step, exit 0.
    second = launch(run, steps)
    wait_for(lambda: any((run / "checkpoints" / str(s)).exists() for s in (30, 40)))
    second[1].send_signal(signal.SIGTERM)
    (out0, err0), (out1, err1) = finish(second)
    assert [p.returncode for p in second] == [0, 0], err0[-2000:] + err1[-2000:]
    assert "resumed from the checkpoint of step" in out0
    preempted = [line for line in out0.splitlines() if line.startswith("preempted at step")]
    assert len(preempted) == 1, out0[-2000:]
    stop = int(preempted[0].split()[3].rstrip(","))
    assert stop < steps and (run / "checkpoints" / str(stop)).exists()

    # The last start resumes there and ends with the uninterrupted run's state, bit for bit.
    third = launch(run, steps)
    (out0, err0), _ = finish(third)
    assert [p.returncode for p in third] == [0, 0], err0[-3000:]
    assert f"resumed from the checkpoint of step {stop}" in out0
    expected, got = saved_state(tmp_path / "reference", steps), saved_state(run, steps)
    for part in ("params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, got[part], expected[part])
