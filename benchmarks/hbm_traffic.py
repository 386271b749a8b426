"""Where a compiled step's HBM traffic goes: its optimized HLO's instructions, grouped and ranked by
the bytes they read and write.

    python -m resnet_jax.preflight --config configs/imagenet_resnet50.py --target v5p-8 --hlo_dir hlo
    python benchmarks/hbm_traffic.py hlo/v5p-8_train_batch1024.hlo.txt [--top 25] [--images 256]
    python benchmarks/hbm_traffic.py hlo/v5p-8_train_batch1024.hlo.txt --only 'ResNet/(conv1|bn1)/'

Each top-level instruction of the entry computation (a fusion, a convolution, a collective, a copy)
reads its operands from HBM and writes its result there; inside a fusion nothing touches HBM. The
sum is an upper bound on XLA's own "bytes accessed" (which knows when a fusion reads only part of
an operand). Groups follow the JAX source: the module path and primitive in each instruction's
metadata, and whether it belongs to the forward pass, the backward pass (`transpose`) or the update.
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys

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
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id"}
FREE |= {"replica-id", "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done"}


SHAPE_WITH_LAYOUT = re.compile(SHAPE.pattern + r"(\{[^}]*\})?")


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


def report(rows: list[dict], top: int, images: int | None) -> str:
    total = sum(r["bytes"] for r in rows)
    unit = (lambda b: f"{b / images / 1e6:8.1f} MB/img") if images else (lambda b: f"{b / 1e9:8.2f} GB")
    out = [f"{len(rows)} instructions, {unit(total)} read + written in all"]
    for title, key in (("by pass", "phase"), ("by opcode", "opcode"), ("by source", "group")):
        sums = collections.Counter()
        for r in rows:
            sums[r[key]] += r["bytes"]
        out.append(f"\n{title}:")
        for label, value in sums.most_common(top):
            out.append(f"  {unit(value)}  {value / total:6.1%}  {label}")
    out.append(f"\nlargest {top} instructions:")
    for r in sorted(rows, key=lambda r: -r["bytes"])[:top]:
        out.append(f"  {unit(r['bytes'])}  {r['opcode']:<22} {r['phase']:<12} {r['group']}  ({r['name']})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hlo", help="an optimized HLO text file (preflight --hlo_dir)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--images", type=int, help="images per device: report MB per image")
    parser.add_argument("--only", help="a regular expression: count instructions whose op_name matches")
    args = parser.parse_args(argv)
    with open(args.hlo) as f:
        rows = analyse(f.read())
    if not rows:
        print(f"error: no ENTRY instructions found in {args.hlo}", file=sys.stderr)
        return 2
    if args.only:
        rows = [r for r in rows if re.search(args.only, r["op_name"])]
        if not rows:
            print(f"error: no instruction's op_name matches --only {args.only!r}", file=sys.stderr)
            return 2
    print(report(rows, args.top, args.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
