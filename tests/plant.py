"""`train.py` with a planted fault, for the watchdog tests (run as a script, like train.py).

    python tests/plant.py FAULT [FAULT ...] -- TRAIN.PY FLAGS

FAULT is one of
    hang@STEP:PROCESS     that process stops for good once it has dispatched train step STEP
    slow_compile:SECONDS  the first train step (the one that compiles) takes SECONDS longer
    slow_eval:SECONDS     every eval batch takes SECONDS longer
"""

import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from resnet_jax import inference, progress  # noqa: E402
from resnet_jax import train as train_lib  # noqa: E402


def plant_hang(step: int, process: int) -> None:
    original = progress.Progress.step

    def step_then_hang(self, current: int) -> None:
        original(self, current)
        if current == step and jax.process_index() == process:
            print(
                f"planted hang: process {process} stops after step {step} at {time.time():.3f}",
                file=sys.stderr,
            )
            sys.stderr.flush()
            while True:
                time.sleep(3600)

    progress.Progress.step = step_then_hang


def slowed(function, seconds: float, first_call_only: bool):
    calls = []

    def slow(*args, **kwargs):
        if not (first_call_only and calls):
            time.sleep(seconds)
        calls.append(None)
        return function(*args, **kwargs)

    return slow


def plant_slow_compile(seconds: float) -> None:
    original = train_lib.CompiledSteps.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.train_step = slowed(self.train_step, seconds, first_call_only=True)

    train_lib.CompiledSteps.__init__ = init


def plant_slow_eval(seconds: float) -> None:
    original = inference.compile_eval_step
    inference.compile_eval_step = lambda *args, **kwargs: slowed(
        original(*args, **kwargs), seconds, first_call_only=False
    )


def main() -> None:
    split = sys.argv.index("--")
    for fault in sys.argv[1:split]:
        name, _, value = fault.replace("@", ":").partition(":")
        if name == "hang":
            step, process = value.split(":")
            plant_hang(int(step), int(process))
        elif name == "slow_compile":
            plant_slow_compile(float(value))
        elif name == "slow_eval":
            plant_slow_eval(float(value))
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[split + 1 :]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
