"""Where a step's device time goes, read from a `jax.profiler` trace without a browser.

    python -m resnet_jax.trace_report DIR [--steps N] [--json FILE]
    python -m resnet_jax.trace_report --hlo FILE [--images N] [--accelerator H200] [--json FILE]

DIR is what `benchmark.py --profile DIR` writes: the trace of N timed steps
(`plugins/profile/*/*.trace.json.gz`) and the optimized HLO of each step it ran (`*.hlo.txt`). Every
device op of the trace names its HLO instruction, which `hlo_categories` puts in one category. Idle is
the time within the traced steps when no device op runs. Ops on several streams of one device may
overlap, so the categories can add up to more than the span from the first op to the last. On a
CPU the convolutions' input and weight gradients are one category: XLA's CPU convolution does not
say which it computes. Each category also shows its kernels per step and the HBM bandwidth they
reached (the bytes `hlo_traffic` counts for their instructions over their time).

`--hlo FILE` reads a compiled program instead, without running it (a preflight's `--hlo_dir`, so
any GPU or TPU target compiled on a CPU): its kernels by the same categories, the bytes they move,
how many move under a megabyte (a launch's worth of time each) and what the bytes cost at the
accelerator's HBM bandwidth.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from resnet_jax import cli, hlo_traffic, tables, targets
from resnet_jax.errors import UserError, check_choice
from resnet_jax.hlo_categories import CATEGORIES, Instruction, category, read_hlo

# Kernels that move less than this take about a launch's time, whatever their bytes: a step's fixed cost.
SMALL_KERNEL_BYTES = 10**6


class TraceError(UserError, ValueError):
    """A profile folder without a trace or the HLO that names its ops."""


def find(directory: str) -> tuple[str, list[str]]:
    """The newest trace under `directory` and its HLO texts; `TraceError` naming what is missing."""
    traces = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz")))
    if not traces:
        raise TraceError(
            f"{directory!r} holds no jax.profiler trace (plugins/profile/*/*.trace.json.gz); "
            "write one with `python benchmark.py --profile DIR ...`"
        )
    hlo = sorted(glob.glob(os.path.join(directory, "*.hlo.txt")))
    if not hlo:
        raise TraceError(f"{directory!r} holds no *.hlo.txt beside its trace: the ops cannot be named")
    return traces[-1], hlo


def device_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The ops that ran an HLO instruction: on GPUs the device streams, on a CPU its XLA threads."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    processes = {
        e["pid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    on_device = [e for e in events if "/device:" in processes.get(e["pid"], "")]
    return on_device or events


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def load_modules(hlo_paths: Sequence[str]) -> dict[str, tuple[dict[str, Instruction], dict[str, int]]]:
    """HLO module name -> (its instructions, the HBM bytes each kernel of its entry moves)."""
    modules = {}
    for path in hlo_paths:
        with open(path) as f:
            text = f.read()
        module = re.match(r"HloModule (\S+?),", text)
        moved = {row["name"]: row["bytes"] for row in hlo_traffic.analyse(text)}
        modules[module.group(1) if module else path] = (read_hlo(text), moved)
    return modules


def report(directory: str, steps: int) -> dict[str, Any]:
    """Device time per step by category (ms and share), with the kernels run and the HBM bandwidth
    they reached (bytes their instructions read and write over their time), from a trace of `steps`
    steps."""
    trace_path, hlo_paths = find(directory)
    modules = load_modules(hlo_paths)
    with gzip.open(trace_path) as f:
        events = device_events(json.load(f))
    if not events:
        raise TraceError(f"{trace_path} has no device ops: was a step running while it traced?")
    times: dict[str, float] = collections.Counter()
    kernels: dict[str, int] = collections.Counter()
    moved: dict[str, int] = collections.Counter()
    by_device: dict[Any, list[tuple[float, float]]] = collections.defaultdict(list)
    for e in events:
        instructions, traffic = modules.get(e["args"].get("hlo_module", ""), ({}, {}))
        name = e["args"]["hlo_op"]
        kind = category(name, instructions.get(name))
        times[kind] += e["dur"]
        kernels[kind] += 1
        moved[kind] += traffic.get(name, 0)
        by_device[e["args"].get("device_ordinal", e["pid"])].append((e["ts"], e["ts"] + e["dur"]))
    devices = len(by_device)
    span = sum(max(b for _, b in iv) - min(a for a, _ in iv) for iv in by_device.values())
    # Ops overlap (several CPU threads, GPU streams): idle is the span no op covers.
    times["idle between ops"] = span - sum(busy_time(iv) for iv in by_device.values())
    total = sum(times.values())
    rows = [
        {
            "category": c,
            "ms_per_step": times[c] / devices / steps / 1e3,
            "share": times[c] / total,
            "kernels_per_step": kernels[c] / devices / steps if kernels[c] else None,
            "gb_per_s": moved[c] / (times[c] * 1e-6) / 1e9 if moved[c] else None,
        }
        for c in CATEGORIES
        if times.get(c)
    ]
    return {
        "trace": trace_path,
        "steps": steps,
        "devices": devices,
        "span_ms_per_step": span / devices / steps / 1e3,
        "rows": rows,
    }


def format_report(document: dict[str, Any]) -> str:
    text = tables.text(*tables.cells(tables.PROFILE_COLUMNS, document["rows"]), left=1)
    return (
        f"{text}\n{document['steps']} step(s) on {document['devices']} device(s); "
        f"{document['span_ms_per_step']:.3f} ms from the first op to the last, per step and device"
    )


def program_report(path: str, images: int | None = None, accelerator: str | None = None) -> dict[str, Any]:
    """A compiled program's kernels by category, without running it: how many it launches, the HBM
    bytes they read and write (`hlo_traffic`), and the time those bytes take at the accelerator's
    HBM bandwidth. `images` (per device) and `accelerator` default to what a preflight file name
    (`h200x1_train_batch256.hlo.txt`) says."""
    named = re.match(r"^(.+?)_(train|eval)_batch(\d+)\.hlo\.txt$", os.path.basename(path))
    target = targets.TARGETS.get(named.group(1)) if named else None
    if images is None and target:
        images = int(named.group(3)) // target.devices
    if accelerator is None and target:
        accelerator = target.accelerator.name
    bandwidth = None
    if accelerator is not None:
        names = [a.name for a in targets.ACCELERATORS]
        check_choice("--accelerator", accelerator, names)
        bandwidth = targets.accelerator(accelerator).hbm_bandwidth
    if not os.path.exists(path):
        raise TraceError(
            f"--hlo {path!r} does not exist: write one with `python -m resnet_jax.preflight --hlo_dir`"
        )
    ((instructions, moved),) = load_modules([path]).values()
    if not moved:
        raise TraceError(f"{path} has no ENTRY computation: is it an optimized HLO text?")
    kernels: dict[str, int] = collections.Counter()
    small: dict[str, int] = collections.Counter()
    traffic: dict[str, int] = collections.Counter()
    for name, size in moved.items():
        kind = category(name, instructions.get(name))
        kernels[kind] += 1
        small[kind] += size < SMALL_KERNEL_BYTES
        traffic[kind] += size
    total = sum(traffic.values())
    rows = [
        {
            "category": c,
            "kernels": kernels[c],
            "small_kernels": small[c],
            "mb_per_step": traffic[c] / 1e6,
            "mb_per_image": traffic[c] / images / 1e6 if images else None,
            "share": traffic[c] / total if total else None,
            "ms_at_bandwidth": traffic[c] / bandwidth * 1e3 if bandwidth else None,
        }
        for c in CATEGORIES
        if kernels[c]
    ]
    return {
        "hlo": path,
        "images": images,
        "accelerator": accelerator,
        "kernels": sum(kernels.values()),
        "small_kernels": sum(small.values()),
        "rows": rows,
    }


def format_program_report(document: dict[str, Any]) -> str:
    text = tables.text(*tables.cells(tables.PROGRAM_COLUMNS, document["rows"]), left=1)
    priced = [r["ms_at_bandwidth"] for r in document["rows"] if r["ms_at_bandwidth"] is not None]
    at = f"; {sum(priced):.3f} ms at the {document['accelerator']}'s HBM bandwidth" if priced else ""
    per = f" for {document['images']} images per device" if document["images"] else ""
    return (
        f"{text}\n{document['kernels']} kernels per step{per}, {document['small_kernels']} of them moving "
        f"under {SMALL_KERNEL_BYTES // 10**6} MB{at} (bytes are an upper bound)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m resnet_jax.trace_report DIR`: device time per step by category; with `--hlo FILE`
    instead of DIR, a compiled program's kernels and HBM bytes by category."""
    flag_values = flags.FlagValues()
    flags.DEFINE_integer(
        "steps", 0, "Steps in the trace (0: read DIR/profile.json).", flag_values=flag_values
    )
    flags.DEFINE_string("json", None, "Also write the table's rows to this file.", flag_values=flag_values)
    flags.DEFINE_string(
        "hlo",
        None,
        "Instead of a trace: an optimized HLO text (preflight --hlo_dir, or the *.hlo.txt of a "
        "profile) whose kernels to count, with the HBM bytes they move.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "images",
        None,
        "With --hlo: images per device per step (default: from the file name).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "accelerator",
        None,
        "With --hlo: the accelerator whose HBM bandwidth prices the bytes, e.g. 'H200' (default: from "
        "the file name's preflight target).",
        flag_values=flag_values,
    )
    rest = cli.parse(
        flag_values, argv, prog="python -m resnet_jax.trace_report", doc=__doc__, positional="DIR"
    )

    def work() -> None:
        if flag_values.hlo:
            if rest:
                raise TraceError(
                    f"give a profile folder or --hlo FILE, not both ({rest[0]!r} and {flag_values.hlo!r})"
                )
            if flag_values.images is not None and flag_values.images < 1:
                raise TraceError(
                    f"--images={flag_values.images} must be a positive number of images per device"
                )
            document = program_report(flag_values.hlo, flag_values.images, flag_values.accelerator)
            text = format_program_report(document)
        else:
            text, document = trace_document(rest, flag_values.steps)
        print(text)
        if flag_values.json:
            with open(flag_values.json, "w") as f:
                json.dump(document, f, indent=1)

    return cli.run(work)


def trace_document(rest: Sequence[str], steps: int) -> tuple[str, dict[str, Any]]:
    """The report of the one profile folder in `rest`, and its text."""
    if len(rest) != 1:
        raise TraceError(
            f"give one profile folder (`benchmark.py --profile DIR`) or --hlo FILE, not {list(rest)}"
        )
    directory = rest[0]
    find(directory)  # the missing trace, before the missing step count
    if steps <= 0:
        meta = os.path.join(directory, "profile.json")
        if not os.path.exists(meta):
            raise TraceError(
                f"{directory!r} has no profile.json saying how many steps it traced: pass --steps"
            )
        with open(meta) as f:
            steps = json.load(f)["steps"]
    document = report(directory, steps)
    return format_report(document), document


if __name__ == "__main__":
    sys.exit(main())
