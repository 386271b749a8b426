"""The HBM bytes each kernel of a compiled program reads and writes, from its optimized HLO text.

Each top-level instruction of the entry computation (a fusion, a convolution, a collective, a copy)
reads its operands from HBM and writes its result there; inside a fusion nothing touches HBM. The
sum is an upper bound on XLA's own "bytes accessed" (which knows when a fusion reads only part of
an operand), and it is there for every backend: XLA's CUDA cost analysis counts none.
"""

from __future__ import annotations

import math
import re

DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
}
DTYPE_BYTES |= {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
SHAPE_WITH_LAYOUT = re.compile(SHAPE.pattern + r"(\{[^}]*\})?")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id"}
FREE |= {"replica-id", "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done"}


def shape_bytes(text: str) -> int:
    """Bytes of the arrays a shape string names that live in HBM: layouts marked S(n), n > 0, are
    on-chip memory (TPU VMEM, prefetched by copy-start) and move no HBM bytes when used."""
    total = 0
    for dtype, dims, layout in SHAPE_WITH_LAYOUT.findall(text):
        if not re.search(r"S\([1-9]\)", layout or ""):
            total += DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x)
    return total


def operands(rest: str) -> str:
    """The text of the call's operand list (up to its closing parenthesis)."""
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i]
    return rest


def entry_instructions(hlo: str) -> list[str]:
    """The lines of the ENTRY computation: the kernels the program launches, and free glue."""
    lines, inside = [], False
    for line in hlo.splitlines():
        if line.startswith("ENTRY"):
            inside = True
        elif inside and line.startswith("}"):
            break
        elif inside:
            lines.append(line)
    return lines


def op_name(line: str) -> str:
    """The JAX source an instruction came from (its metadata's op_name), "" if it names none."""
    match = re.search(r'op_name="([^"]*)"', line)
    return match.group(1) if match else ""


def source_group(line: str) -> tuple[str, str]:
    """(pass, module/primitive) from the instruction's metadata op_name."""
    name = op_name(line)
    phase = "backward" if "transpose(" in name else ("forward" if "jvp(" in name else "update/other")
    parts = [p for p in re.sub(r"\w+\(([^()]*)\)", r"\1", name).split("/") if p]
    parts = [p for p in parts if not p.startswith(("jit", "train_step", "ResNet"))]
    layer = re.sub(r"_\d+$", "", parts[-2]) if len(parts) >= 2 else ""
    primitive = parts[-1] if parts else "?"
    layer = re.sub(r"^(layer\d+|stage\d+)_\d+/?", "", layer)
    return phase, f"{layer}/{primitive}" if layer else primitive


def analyse(hlo: str) -> list[dict]:
    """One row per instruction that moves HBM bytes: operands are read (their producers' shapes,
    looked up by name, as the optimized HLO prints no operand shapes) and the result is written."""
    rows, produced = [], {}
    for line in entry_instructions(hlo):
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        produced[name] = shape_bytes(shape)
        if opcode in FREE:
            continue
        written = produced[name]
        read = sum(produced.get(operand, 0) for operand in re.findall(r"%([\w.\-]+)", operands(rest)))
        if opcode == "copy-start":  # a prefetch: the HBM side is read once, the on-chip copy is free
            written = 0
        kind = re.search(r"kind=(k\w+)", line)
        phase, group = source_group(line)
        rows.append(
            dict(
                name=name,
                opcode=opcode + (f":{kind.group(1)}" if kind else ""),
                bytes=written + read,
                written=written,
                read=read,
                phase=phase,
                group=group,
                op_name=op_name(line),
                convolution="convolution" in line.split("metadata")[0] or "conv" in name,
            )
        )
    return rows
