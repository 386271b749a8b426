"""What each instruction of a compiled train step is, in the categories a profile reports:
convolution forward / input gradient / weight gradient, BatchNorm statistics / apply / backward,
the optimizer update, metrics, copies, collectives.

An instruction is categorised by its opcode, its custom-call target (cuDNN's convolutions on GPUs),
its `op_name` (`jvp(...)` forward, `transpose(jvp(...))` backward), the Python stack XLA kept for it
(optax, clu, the BatchNorms) and, for a fusion, the instructions fused into it. `trace_report`
applies it to a profile's device ops and to a compiled program's kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from resnet_jax import hlo_traffic

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
TARGET = re.compile(r'custom_call_target="([^"]+)"')
FRAME = re.compile(r"stack_frame_id=(\d+)")
CALLS = re.compile(r"calls=%?([\w.\-]+)")
REDUCES = ("reduce", "reduce-window")
# A fusion of nothing but these (and casts) moves data: a layout change, a kernel's transpose.
DATA_MOVEMENT = {"copy", "transpose", "broadcast", "slice", "concatenate", "pad"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    target: str  # custom-call target, "" for other ops
    op_name: str
    files: tuple[str, ...]  # the Python files of its stack, innermost first
    functions: tuple[str, ...] = ()  # the Python functions of its stack, innermost first
    body: tuple[Instruction, ...] = ()  # a fusion's fused instructions


def stack_frames(text: str) -> dict[int, tuple[tuple[str, ...], tuple[str, ...]]]:
    """stack_frame_id -> (files, functions) of that frame and its parents, from the HLO's tables."""
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
    files = {i: v.strip('"') for i, v in sections["FileNames"].items()}
    functions = {i: v.strip('"') for i, v in sections["FunctionNames"].items()}
    locations = {
        i: (
            files.get(int(re.search(r"file_name_id=(\d+)", v).group(1)), ""),
            functions.get(int(m.group(1)), "") if (m := re.search(r"function_name_id=(\d+)", v)) else "",
        )
        for i, v in sections["FileLocations"].items()
    }
    frames = {}
    for i, v in sections["StackFrames"].items():
        location = int(re.search(r"file_location_id=(\d+)", v).group(1))
        parent = int(re.search(r"parent_frame_id=(\d+)", v).group(1))
        frames[i] = (locations.get(location, ("", "")), parent)

    def stack(frame: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, frame = frames[frame]
            out.append(location)
        return tuple(f for f, _ in out), tuple(f for _, f in out)

    return {i: stack(i) for i in frames}


def read_hlo(text: str) -> dict[str, Instruction]:
    """Instruction name -> what it is, for every instruction of an HLO module's text; a fusion
    carries the instructions of the computation it calls."""
    stacks = stack_frames(text)
    parsed: dict[str, tuple[Instruction, str]] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    computation = ""
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        match = hlo_traffic.INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.group(1), match.group(3)
        target, frame = TARGET.search(line), FRAME.search(line)
        calls = CALLS.search(line) if opcode == "fusion" else None
        files, functions = stacks.get(int(frame.group(1)), ((), ())) if frame else ((), ())
        instruction = Instruction(
            opcode=opcode,
            target=target.group(1) if target else "",
            op_name=hlo_traffic.op_name(line),
            files=files,
            functions=functions,
        )
        parsed[name] = (instruction, calls.group(1) if calls else "")
        computations[computation].append(name)
    return {
        name: dataclasses.replace(instruction, body=tuple(parsed[n][0] for n in computations.get(called, ())))
        if called
        else instruction
        for name, (instruction, called) in parsed.items()
    }


def _is_optimizer(part: Instruction) -> bool:
    files = " ".join(part.files)
    return "/optax/" in files and "/optax/losses/" not in files


def _is_metric(part: Instruction) -> bool:
    files = " ".join(part.files)
    gradient_norm = any("global_norm" in function for function in part.functions)
    return gradient_norm or any(f in files for f in ("/clu/metrics.py", "/resnet_jax/metrics.py"))


def _is_batch_norm(part: Instruction) -> bool:
    files = " ".join(part.files)
    return any(f in files for f in ("flax/linen/normalization.py", "/resnet_jax/norms.py")) or bool(
        re.search(r"/(bn\d*|.*BatchNorm[^/]*)/", part.op_name)
    )


def category(name: str, instruction: Instruction | None) -> str:
    """The category of one device op (`CATEGORIES`), from its instruction and, for a fusion, the
    instructions fused into it (a ReLU fusion that applies a BatchNorm is BatchNorm's)."""
    if instruction is None:
        return "other fusions and ops"
    backward = "transpose(" in instruction.op_name
    parts = (instruction, *instruction.body)
    if instruction.opcode.startswith(COLLECTIVES):  # they take the metadata of what they reduce
        return "collectives (all-reduce, ...)"
    if instruction.target in CUDNN_TARGETS:
        named = CUDNN_TARGETS[instruction.target]
        # A 1x1 convolution's input gradient is a forward convolution to cuDNN (and so, on tiny
        # images, is the odd weight gradient: it counts as an input gradient).
        return "convolution input gradient" if backward and named == "convolution forward" else named
    moves = {p.opcode for p in instruction.body} - {"parameter", "bitcast", "reshape", "convert"}
    if (
        instruction.opcode in ("copy", "transpose")
        or re.match(r"^(copy|transpose)", name)
        or (moves and moves <= DATA_MOVEMENT)
    ):
        return "copies and transposes"
    last = instruction.op_name.rsplit("/", 1)[-1]
    if instruction.opcode == "convolution" or "conv_general_dilated" in last:
        return "convolution backward (input + weight)" if backward else "convolution forward"
    if any(_is_optimizer(p) for p in parts):
        return "optimizer update"
    if any(_is_metric(p) for p in parts) or "global_norm" in name:
        return "metrics and gradient norm"
    batch_norm = [p for p in parts if _is_batch_norm(p)]
    if batch_norm:
        # A fusion with any backward op is backward's (its forward ops are recomputed).
        if any("transpose(" in p.op_name for p in parts):
            return "BatchNorm backward"
        statistics = "reduce" in name or any(p.opcode in REDUCES for p in parts)
        return "BatchNorm statistics" if statistics else "BatchNorm apply"
    return "other fusions and ops"
