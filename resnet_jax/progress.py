"""Watching a run as it goes: the progress bar and ETA, and the `jax.profiler` trace window.

On a terminal the training loop shows a tqdm bar (steps/s, images/s, ETA, epoch) and prints its
periodic lines above it; elsewhere (CI, pipes, files, notebooks) only the periodic lines, with an
ETA. `config.progress` picks: auto | bar | lines.

`config.profile_steps="S:E"` traces steps S to E (inclusive) with `jax.profiler` into
WORKDIR/profile: open it with `tensorboard --logdir WORKDIR/profile` (profile plugin) or load its
`perfetto_trace.json.gz` into https://ui.perfetto.dev.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

import jax

PROGRESS_MODES = ("auto", "bar", "lines")

_bar: Any = None  # the active tqdm bar: `write` prints above it
_bar_stream: Any = None


def write(message: str, file: TextIO | None = None) -> None:
    """print(), or tqdm.write while a bar is on the terminal so that the bar stays at the bottom."""
    if _bar is not None:
        file = _bar_stream if file is None else file
        _bar.write(message, file=file)
        file.flush()
    else:
        print(message, file=sys.stdout if file is None else file, flush=True)


def is_primary() -> bool:
    """Whether this is process 0: the one process that logs, writes metrics and moves shared files."""
    return jax.process_index() == 0


def log(message: str, file: TextIO | None = None) -> None:
    """Progress output: process 0 only, flushed so that piped logs keep up (above the bar, if any)."""
    if is_primary():
        write(message, file=file)


def warn(message: str, *, every_process: bool = False) -> None:
    """`warning: message` on stderr, from process 0 only unless `every_process`.

    The data loader passes `every_process=True`: it may run in grain worker processes that never
    start JAX, and whichever process meets an unreadable file is the one that can name it.
    """
    if every_process or is_primary():
        write(f"warning: {message}", file=sys.stderr)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Steps/s, images/s, epoch and ETA of the training loop, as a bar on a terminal.

    The clock starts after the first step (which includes compiling), so rates and the ETA are
    those of the steady state; `pause`/`resume` keep evaluation and checkpointing out of them.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        steps_per_epoch: int,
        batch_size: int,
        mode: str = "auto",
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.total_steps, self.steps_per_epoch, self.batch_size = total_steps, steps_per_epoch, batch_size
        stream = sys.stdout if stream is None else stream
        self.use_bar = enabled and (mode == "bar" or (mode == "auto" and _is_terminal(stream)))
        self.stream = stream
        self._clock_start: float | None = None
        self._clock_steps = 0
        self._paused_at: float | None = None
        self._bar: Any = None

    def step(self, step: int) -> None:
        """Call after each train step; the first call only starts the clock."""
        global _bar, _bar_stream
        now = time.perf_counter()
        if self._clock_start is None:
            self._clock_start, self._clock_steps = now, 0
            if self.use_bar:
                from tqdm import tqdm

                sized = _columns(self.stream) > 0  # a pty without a size (ssh -T, script) reads 0
                self._bar = _bar = tqdm(
                    total=self.total_steps,
                    initial=step,
                    unit="step",
                    dynamic_ncols=sized,
                    ncols=None if sized else 100,
                    nrows=None if sized else 20,  # tqdm hides bars below a 0-row "screen"
                    file=self.stream,
                    smoothing=0.1,
                )
                _bar_stream = self.stream
            return
        self._clock_steps += 1
        if self._bar is not None:
            self._bar.update(1)
            postfix = f"epoch {step / self.steps_per_epoch:.1f}"
            rate = self._bar.format_dict.get("rate") or self.steps_per_sec()  # tqdm's: smoothed
            if rate:
                postfix += f", {rate * self.batch_size:.0f} img/s"
            self._bar.set_postfix_str(postfix, refresh=False)

    def steps_per_sec(self) -> float | None:
        if self._clock_start is None or not self._clock_steps:
            return None
        elapsed = time.perf_counter() - self._clock_start
        return self._clock_steps / elapsed if elapsed > 0 else None

    def eta_seconds(self, step: int) -> float | None:
        rate = self.steps_per_sec()
        return (self.total_steps - step) / rate if rate else None

    def eta_text(self, step: int) -> str:
        """` | ETA m:ss` for the periodic lines ('' before the rate is known or at the end)."""
        eta = self.eta_seconds(step)
        return f" | ETA {format_seconds(eta)}" if eta is not None and step < self.total_steps else ""

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        """Leave the time since `pause` (eval, checkpoint) out of the rate and the bar's ETA."""
        if self._paused_at is None:
            return
        away = time.perf_counter() - self._paused_at
        self._paused_at = None
        if self._clock_start is not None:
            self._clock_start += away
        if self._bar is not None:
            self._bar.start_t += away
            self._bar.last_print_t += away

    def close(self) -> None:
        global _bar
        if self._bar is not None:
            self._bar.close()
            self._bar = _bar = None


class Meter:
    """Progress of a job outside training (images prepared, files read): a tqdm bar with rate and ETA
    on a terminal, else a line every `every_s` seconds and one at the end."""

    def __init__(self, total: int, unit: str, stream: TextIO | None = None, every_s: float = 30.0):
        self.total, self.unit, self.every_s = total, unit, every_s
        self.stream = sys.stderr if stream is None else stream
        self.count, self._start, self._last_line = 0, time.perf_counter(), time.perf_counter()
        self._bar: Any = None
        if total and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, file=self.stream)

    def update(self, count: int) -> None:
        """`count`: how many are done so far (not an increment)."""
        if self._bar is not None:
            self._bar.update(count - self.count)
        elif time.perf_counter() - self._last_line >= self.every_s:
            self._line(count)
        self.count = count

    def _line(self, count: int) -> None:
        self._last_line = now = time.perf_counter()
        rate = count / (now - self._start) if now > self._start else 0.0
        eta = f", ETA {format_seconds((self.total - count) / rate)}" if rate and count < self.total else ""
        print(
            f"{count:,}/{self.total:,} {self.unit} ({100 * count / max(1, self.total):.0f} %), "
            f"{rate:,.0f} {self.unit}/s{eta}",
            file=self.stream,
            flush=True,
        )

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.total and self.count:
            self._line(self.count)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def parse_profile_steps(value: str) -> tuple[int, int] | None:
    """config.profile_steps: '' (off) or 'START:END', 1 <= START <= END, both inclusive."""
    if not value:
        return None
    start_text, _, end_text = str(value).partition(":")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        start = end = 0
    if not 1 <= start <= end:
        raise ValueError(
            f"config.profile_steps={value!r} must be '' (off) or 'START:END' with 1 <= START <= END, "
            "e.g. '10:15'"
        )
    return start, end


class StepProfiler:
    """Starts a `jax.profiler` trace before step START and stops it after step END (inclusive)."""

    def __init__(self, steps: str, directory: str, enabled: bool = True):
        window = parse_profile_steps(steps)
        self.start, self.end = window if window else (0, -1)
        self.directory = directory
        self.enabled = enabled and window is not None
        self.active = False

    def before_step(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step <= self.end:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def finishes(self, step: int) -> bool:
        """Whether `after_step(step)` writes the trace (which can take a while)."""
        return self.active and step >= self.end

    def after_step(self, step: int, state: Any) -> str | None:
        """Stop after step END; returns the trace folder when it stopped."""
        if self.finishes(step):
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            self.enabled = False
            return self.directory
        return None

    def stop(self) -> None:
        """End an unfinished trace (the run ended or failed inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
