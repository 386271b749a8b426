"""Start two-process training runs back to back and report every one that hangs, with its stacks.

    python benchmarks/multiprocess_stress.py [--starts 30] [--timeout 120] [--steps 30] [--out DIR]

Each start runs `train.py` on digits as two processes on this machine (two virtual CPU devices
each, gloo collectives), with logging, evaluation and checkpointing all due within the run. Starts
alternate between a cold compilation cache (a new directory) and a warm one (the directory of an
earlier start), the two cases in which a hang was seen. A start counts as hung when the run's
watchdog ends it (status 3; its stacks and message are in the logs) or when it has not finished
after `--timeout` seconds: then both processes get SIGUSR1 (`train.py` prints every thread's
Python stack, see docs/scaling.md), gdb adds native stacks where it is installed, and they are
killed. Exit status 1 when any start hung or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
WATCHDOG_STATUS = 3  # resnet_jax.watchdog.HANG_STATUS (not imported: this script starts no JAX)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(workdir: str, cache: str, port: int, process_id: int, steps: int) -> list[str]:
    every = max(1, steps // 3)
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "digits.py"),
        f"--workdir={workdir}",
        f"--config.num_train_steps={steps}",
        f"--config.log_every_steps={max(1, every // 2)}",
        f"--config.eval_every_steps={every}",
        f"--config.checkpoint_every_steps={every}",
        f"--config.compilation_cache_dir={cache}",
        "--config.progress=lines",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={PROCESSES}",
        f"--process_id={process_id}",
    ]


def dump_stacks(processes: list[subprocess.Popen], log: str) -> None:
    """SIGUSR1 (faulthandler in train.py: each process's log gets its Python stacks), then every
    thread's native stack from gdb where it is installed."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGUSR1)
    time.sleep(2)
    gdb = shutil.which("gdb")
    if not gdb:
        return
    # Both at once: a process stopped by gdb for long looks dead to its peer, which would then exit.
    live = [(i, p) for i, p in enumerate(processes) if p.poll() is None]
    dumps = [
        subprocess.Popen(
            [gdb, "-p", str(p.pid), "-batch", "-ex", "thread apply all bt 30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _, p in live
    ]
    with open(log, "a") as f:
        for (i, p), dump in zip(live, dumps, strict=True):
            stacks, _ = dump.communicate(timeout=120)
            f.write(f"\n==== native stacks (gdb), process {i} (pid {p.pid})\n{stacks}")


def one_start(index: int, cache: str, args: argparse.Namespace) -> tuple[str, float, str]:
    """('ok' | 'hang' | 'failed', seconds, log path) of one two-process run."""
    workdir = os.path.join(args.out, f"start{index:03d}")
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    logs = [f"{workdir}.process{i}.log" for i in range(PROCESSES)]
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(path, "w")) for path in logs]
        processes = [
            subprocess.Popen(
                train_command(workdir, cache, port, i, args.steps),
                cwd=ROOT,
                env=env,
                stdout=files[i],
                stderr=subprocess.STDOUT,
            )
            for i in range(PROCESSES)
        ]
        timed_out = not wait_all(processes, start + args.timeout)
    if timed_out:
        dump_stacks(processes, logs[0])
        for p in processes:
            p.kill()
            p.wait()
        return "hang", time.perf_counter() - start, logs[0]
    codes = [p.returncode for p in processes]
    # The watchdog's exit is a hang too; its stacks and message are in the logs.
    outcome = "hang" if WATCHDOG_STATUS in codes else "failed" if any(codes) else "ok"
    return outcome, time.perf_counter() - start, logs[0]


def wait_all(processes: list[subprocess.Popen], deadline: float) -> bool:
    """Whether every process ended before `deadline` (a `time.perf_counter()` value)."""
    try:
        for p in processes:
            p.wait(timeout=max(0.1, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a start counts as hung")
    parser.add_argument("--steps", type=int, default=30, help="train steps per start")
    parser.add_argument(
        "--warm_only", action="store_true", help="every start after the first on a warm cache"
    )
    parser.add_argument("--out", default=None, help="logs and workdirs (default: a temporary directory)")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="multiprocess_stress_"))
    os.makedirs(args.out, exist_ok=True)
    print(f"{args.starts} two-process starts, {args.steps} steps each, timeout {args.timeout:g}s")
    print(f"logs and workdirs in {args.out}")
    warm_cache = os.path.join(args.out, "cache_warm")
    counts = {"ok": 0, "hang": 0, "failed": 0}
    for index in range(args.starts):
        cold = index == 0 if args.warm_only else index % 2 == 0
        cache = os.path.join(args.out, f"cache_cold{index:03d}") if cold else warm_cache
        if index == 1:  # the first warm start reads what the first (cold) start compiled
            shutil.copytree(os.path.join(args.out, "cache_cold000"), warm_cache, dirs_exist_ok=True)
        outcome, seconds, log = one_start(index, cache, args)
        counts[outcome] += 1
        detail = "" if outcome == "ok" else f"  (stacks and output: {log})"
        kind = "cold" if cold else "warm"
        print(
            f"start {index + 1}/{args.starts} {kind} cache: {outcome} in {seconds:.1f}s{detail}", flush=True
        )
    print(f"{args.starts} starts: {counts['ok']} ok, {counts['hang']} hung, {counts['failed']} failed")
    return 0 if counts["ok"] == args.starts else 1


if __name__ == "__main__":
    sys.exit(main())
