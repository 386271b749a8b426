"""Where a step's device time goes, read from a `jax.profiler` trace without a browser.

    python -m resnet_jax.trace_report DIR [--steps N] [--json FILE]

DIR is what `benchmark.py --profile DIR` writes: the trace of N timed steps
(`plugins/profile/*/*.trace.json.gz`) and the optimized HLO of each step it ran (`*.hlo.txt`). Every
device op of the trace names its HLO instruction; the instruction's opcode, its custom-call target
(cuDNN's convolutions on GPUs), its `op_name` (`jvp(...)` forward, `transpose(jvp(...))` backward)
and the Python stack XLA kept for it (optax, clu, flax's BatchNorm) put it in one category. Idle is
the time within the traced steps when no device op runs. Ops on several streams of one device may
overlap, so the categories can add up to more than the span from the first op to the last. On a
CPU the convolutions' input and weight gradients are one category: XLA's CPU convolution does not
say which it computes.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from resnet_jax import cli, tables
from resnet_jax.errors import UserError

CATEGORIES = (
    "convolution forward",
    "convolution input gradient",
    "convolution weight gradient",
    "convolution backward (input + weight)",
    "BatchNorm statistics",
    "BatchNorm apply",
    "BatchNorm backward",
    "optimizer update",
    "metrics and gradient norm",
    "copies and transposes",
    "collectives (all-reduce, ...)",
    "other fusions and ops",
    "idle between ops",
)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
CUDNN_TARGETS = {
    "__cudnn$convForward": "convolution forward",
    "__cudnn$convForwardGraph": "convolution forward",
    "__cudnn$convBiasActivationForward": "convolution forward",
    "__cudnn$convBackwardInput": "convolution input gradient",
    "__cudnn$convBackwardFilter": "convolution weight gradient",
}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(")
TARGET = re.compile(r'custom_call_target="([^"]+)"')
OP_NAME = re.compile(r'op_name="([^"]*)"')
FRAME = re.compile(r"stack_frame_id=(\d+)")
REDUCES = ("reduce", "reduce-window")


class TraceError(UserError, ValueError):
    """A profile folder without a trace or the HLO that names its ops."""


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    target: str  # custom-call target, "" for other ops
    op_name: str
    files: tuple[str, ...]  # the Python files of its stack, innermost first


def stack_files(text: str) -> dict[int, tuple[str, ...]]:
    """stack_frame_id -> the files of that frame and its parents, from the HLO text's tables."""
    sections: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        match = re.match(r"^(\d+) (.*)$", line)
        if section and match:
            sections[section][int(match.group(1))] = match.group(2)
        elif section and line.strip():
            section = None
    names = {i: v.strip('"') for i, v in sections["FileNames"].items()}
    location_file = {
        i: int(re.search(r"file_name_id=(\d+)", v).group(1)) for i, v in sections["FileLocations"].items()
    }
    frames = {}
    for i, v in sections["StackFrames"].items():
        location = int(re.search(r"file_location_id=(\d+)", v).group(1))
        parent = int(re.search(r"parent_frame_id=(\d+)", v).group(1))
        frames[i] = (names.get(location_file.get(location, 0), ""), parent)

    def files(frame: int) -> tuple[str, ...]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            file, parent = frames[frame]
            out.append(file)
            frame = parent
        return tuple(out)

    return {i: files(i) for i in frames}


def read_hlo(text: str) -> dict[str, Instruction]:
    """Instruction name -> what it is, for every instruction of an HLO module's text."""
    stacks = stack_files(text)
    instructions = {}
    for line in text.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        target, op_name, frame = TARGET.search(line), OP_NAME.search(line), FRAME.search(line)
        instructions[match.group(1)] = Instruction(
            opcode=match.group(2),
            target=target.group(1) if target else "",
            op_name=op_name.group(1) if op_name else "",
            files=stacks.get(int(frame.group(1)), ()) if frame else (),
        )
    return instructions


def category(name: str, instruction: Instruction | None) -> str:
    """The category of one device op (`CATEGORIES`), from its instruction."""
    if instruction is None:
        return "other fusions and ops"
    backward = "transpose(" in instruction.op_name
    files = " ".join(instruction.files)
    if instruction.opcode.startswith(COLLECTIVES):  # they take the metadata of what they reduce
        return "collectives (all-reduce, ...)"
    if instruction.target in CUDNN_TARGETS:
        named = CUDNN_TARGETS[instruction.target]
        # A 1x1 convolution's input gradient is a forward convolution to cuDNN.
        return "convolution input gradient" if backward and named == "convolution forward" else named
    if instruction.opcode in ("copy", "transpose") or re.match(r"^(copy|transpose)", name):
        return "copies and transposes"
    last = instruction.op_name.rsplit("/", 1)[-1]
    if instruction.opcode == "convolution" or "conv_general_dilated" in last:
        return "convolution backward (input + weight)" if backward else "convolution forward"
    if "/optax/" in files and "/optax/losses/" not in files:
        return "optimizer update"
    if any(part in files for part in ("/clu/metrics.py", "/resnet_jax/metrics.py")) or "global_norm" in name:
        return "metrics and gradient norm"
    batch_norm = "flax/linen/normalization.py" in files or re.search(
        r"/(bn\d*|.*BatchNorm[^/]*)/", instruction.op_name
    )
    if batch_norm:
        if backward:
            return "BatchNorm backward"
        statistics = instruction.opcode in REDUCES or "reduce" in name
        return "BatchNorm statistics" if statistics else "BatchNorm apply"
    return "other fusions and ops"


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


def report(directory: str, steps: int) -> dict[str, Any]:
    """Device time per step by category (ms and share), from the trace of `steps` steps."""
    trace_path, hlo_paths = find(directory)
    instructions: dict[str, dict[str, Instruction]] = {}
    for path in hlo_paths:
        with open(path) as f:
            text = f.read()
        module = re.match(r"HloModule (\S+?),", text)
        instructions[module.group(1) if module else path] = read_hlo(text)
    with gzip.open(trace_path) as f:
        events = device_events(json.load(f))
    if not events:
        raise TraceError(f"{trace_path} has no device ops: was a step running while it traced?")
    times: dict[str, float] = collections.Counter()
    by_device: dict[Any, list[tuple[float, float]]] = collections.defaultdict(list)
    for e in events:
        module = instructions.get(e["args"].get("hlo_module", ""), {})
        name = e["args"]["hlo_op"]
        times[category(name, module.get(name))] += e["dur"]
        by_device[e["args"].get("device_ordinal", e["pid"])].append((e["ts"], e["ts"] + e["dur"]))
    devices = len(by_device)
    span = sum(max(b for _, b in iv) - min(a for a, _ in iv) for iv in by_device.values())
    # Ops overlap (several CPU threads, GPU streams): idle is the span no op covers.
    times["idle between ops"] = span - sum(busy_time(iv) for iv in by_device.values())
    total = sum(times.values())
    rows = [
        {"category": c, "ms_per_step": times[c] / devices / steps / 1e3, "share": times[c] / total}
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m resnet_jax.trace_report DIR`: device time per step by category."""
    flag_values = flags.FlagValues()
    flags.DEFINE_integer(
        "steps", 0, "Steps in the trace (0: read DIR/profile.json).", flag_values=flag_values
    )
    flags.DEFINE_string("json", None, "Also write the table's rows to this file.", flag_values=flag_values)
    rest = cli.parse(
        flag_values, argv, prog="python -m resnet_jax.trace_report", doc=__doc__, positional="DIR"
    )

    def work() -> None:
        if len(rest) != 1:
            raise TraceError(f"give one profile folder (what `benchmark.py --profile DIR` wrote), not {rest}")
        directory = rest[0]
        find(directory)  # the missing trace, before the missing step count
        steps = flag_values.steps
        if steps <= 0:
            meta = os.path.join(directory, "profile.json")
            if not os.path.exists(meta):
                raise TraceError(
                    f"{directory!r} has no profile.json saying how many steps it traced: pass --steps"
                )
            with open(meta) as f:
                steps = json.load(f)["steps"]
        document = report(directory, steps)
        print(format_report(document))
        if flag_values.json:
            with open(flag_values.json, "w") as f:
                json.dump(document, f, indent=1)

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
