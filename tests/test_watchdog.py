"""The watchdog: its bound, what it reports, and planted faults in real `train.py` runs.

The bound and the message are checked on a fake clock; the runs plant a hang (a process that stops
in the loop), a long compile and long evaluations (tests/plant.py), in one process and in two.
"""

import time

import jax.numpy as jnp
import pytest

from resnet_jax import watchdog
from tests.conftest import run_script, start_two_processes

DIGITS = ["--config=configs/digits.py", "--config.compilation_cache_dir=", "--config.progress=lines"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Unfinished:
    """Stands in for the output of a step that never completes."""

    def is_ready(self):
        return False


def test_the_automatic_bound_is_several_longest_steps_plus_compile_with_a_floor():
    bounds = watchdog.Bounds(fixed=0.0, compile=600.0, factor=10.0, floor=60.0)
    assert bounds.limit(longest_step=0.5, longest_compile=20.0, in_long_operation=False) == 60.0
    assert bounds.limit(longest_step=8.0, longest_compile=30.0, in_long_operation=False) == 110.0
    assert bounds.limit(longest_step=8.0, longest_compile=30.0, in_long_operation=True) == 600.0
    fixed = watchdog.Bounds(fixed=5.0, compile=600.0)
    assert fixed.limit(longest_step=8.0, longest_compile=30.0, in_long_operation=False) == 5.0
    assert fixed.limit(longest_step=8.0, longest_compile=30.0, in_long_operation=True) == 600.0


def test_a_unit_that_never_completes_is_reported_after_the_bound():
    clock = Clock()
    dog = watchdog.Watchdog(watchdog.Bounds(fixed=0.0, compile=100.0, factor=10.0, floor=5.0), clock=clock)
    with dog.long_operation("compiling the train step"):
        clock.now = 90.0  # a compile far longer than the step bound: allowed
        assert dog.check() is None
        dog.track("train step 1", {"loss": jnp.zeros(())})
    for step in range(2, 5):
        clock.now += 1.0
        dog.track(f"train step {step}", {"loss": jnp.zeros(())})
        assert dog.check() is None
    assert (dog.longest_step, dog.longest_compile) == (1.0, 90.0)
    dog.track("train step 5", {"loss": Unfinished()})
    clock.now += 100.0  # the bound: 10 x 1 s + 90 s
    assert dog.check() is None
    clock.now += 1.0
    message = dog.check()
    assert message.startswith("process 0 of 1: train step 5 has not completed after 101s without progress")
    assert "(last completed: train step 4)" in message
    assert "bound is 100s (10 x the longest step + the longest compile, at least 5s)" in message


def test_a_fixed_bound_and_a_stuck_long_operation_are_named():
    clock = Clock()
    dog = watchdog.Watchdog(watchdog.Bounds(fixed=3.0, compile=50.0), clock=clock)
    clock.now = 4.0
    assert "no new step or eval batch was started after 4s" in dog.check()
    assert "config.watchdog_seconds=3" in dog.check()
    with dog.long_operation("saving the checkpoint of step 7"):
        clock.now = 50.0
        assert dog.check() is None
        clock.now = 55.0
        assert "saving the checkpoint of step 7 has not finished after 55s" in dog.check()


def test_the_thread_calls_on_hang_once_and_stops_with_the_context():
    reports = []
    bounds = watchdog.Bounds(fixed=0.2, compile=60.0)
    with watchdog.Watchdog(bounds, on_hang=reports.append, poll_seconds=0.05) as dog:
        dog.track("train step 1", {"loss": Unfinished()})
        deadline = time.monotonic() + 10
        while not reports and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(reports) == 1 and "train step 1 has not completed" in reports[0]
    assert not dog.thread.is_alive()


def planted_run(tmp_path, faults, *flags, timeout=300):
    return run_script(
        "tests/plant.py", *faults, "--", *DIGITS, f"--workdir={tmp_path}", *flags, timeout=timeout
    )


@pytest.mark.slow
def test_a_long_compile_and_long_evaluations_do_not_trip_a_short_bound(tmp_path):
    # A 3 s bound; the first step takes 6 s longer (compile), each eval takes 12 x 0.4 s: the first
    # evaluation runs under the compile bound, the second progresses batch by batch.
    result = planted_run(
        tmp_path,
        ["slow_compile:6", "slow_eval:0.4"],
        "--config.num_train_steps=10",
        "--config.eval_every_steps=5",
        "--config.eval_batch_size=32",
        "--config.watchdog_seconds=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "watchdog" not in result.stderr
    assert "\neval at step 5:" in result.stdout and "final eval at step 10:" in result.stdout


@pytest.mark.slow
def test_a_process_that_stops_in_the_loop_is_ended_with_its_stacks(tmp_path):
    started = time.time()
    result = planted_run(
        tmp_path, ["hang@12:0"], "--config.num_train_steps=30", "--config.watchdog_seconds=4"
    )
    assert result.returncode == watchdog.HANG_STATUS, result.stderr[-3000:]
    planted_at = float(result.stderr.split("stops after step 12 at ")[1].split()[0])
    assert started < planted_at and time.time() - planted_at < 4 + 10  # the bound, two polls, exit
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 1: no new step or eval batch was started after "), last
    assert "(last completed: train step 12)" in last
    assert 'plant.py", line' in result.stderr and "step_then_hang" in result.stderr  # the stacks
    assert "resnet_jax-watchdog" not in last


@pytest.mark.slow
def test_a_hang_in_one_of_two_processes_ends_both_within_the_bound(tmp_path):
    # Process 0 stops after step 8; process 1 then waits in step 9's collective. Process 1's bound is
    # the shorter, so it speaks first: had process 0 (which hosts JAX's coordination service) exited
    # first, JAX could abort process 1 before its own watchdog spoke.
    bounds = {0: 10, 1: 4}
    processes = start_two_processes(
        ["tests/plant.py", "hang@8:0", "--"],
        *DIGITS,
        f"--workdir={tmp_path}",
        "--config.num_train_steps=30",
        "--config.batch_size=16",
        "--config.image_size=8",
        per_process=lambda i: [f"--config.watchdog_seconds={bounds[i]}"],
    )
    try:
        outputs = [p.communicate(timeout=240) for p in processes]
        ended = time.time()
    finally:
        for p in processes:
            p.kill()
    errors = [err for _, err in outputs]
    codes = [p.returncode for p in processes]
    assert codes == [watchdog.HANG_STATUS] * 2, f"{codes}\n{errors[0][-2500:]}\n{errors[1][-2500:]}"
    planted_at = float(errors[0].split("stops after step 8 at ")[1].split()[0])
    assert ended - planted_at < bounds[0] + 10  # the bound, one poll, the exits
    lines = [err.strip().splitlines()[-1] for err in errors]
    assert lines[0].startswith("error: process 0 of 2: no new step or eval batch was started after "), lines[
        0
    ]
    assert "(last completed: train step 8)" in lines[0]
    assert lines[1].startswith("error: process 1 of 2: train step 9 has not completed after "), lines[1]
    assert all('File "' in err and "Thread 0x" in err for err in errors)
