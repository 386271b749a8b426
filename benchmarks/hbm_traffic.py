"""Where a compiled step's HBM traffic goes: its optimized HLO's instructions, grouped and ranked by
the bytes they read and write.

    python -m resnet_jax.preflight --config configs/imagenet_resnet50.py --target v5p-8 --hlo_dir hlo
    python benchmarks/hbm_traffic.py hlo/v5p-8_train_batch1024.hlo.txt [--top 25] [--images 256]
    python benchmarks/hbm_traffic.py hlo/v5p-8_train_batch1024.hlo.txt --only 'ResNet/(conv1|bn1)/'

Bytes are counted by `resnet_jax.hlo_traffic` (an upper bound on XLA's own "bytes accessed"). Groups
follow the JAX source: the module path and primitive in each instruction's metadata, and whether it
belongs to the forward pass, the backward pass (`transpose`) or the update. For the same kernels by
category (convolutions, BatchNorm, optimizer, ...), with kernel counts and the time they need at
the device's HBM bandwidth, see `python -m resnet_jax.trace_report --hlo FILE`.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

from resnet_jax.hlo_traffic import analyse


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
