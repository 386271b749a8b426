"""Compile cost of our train step next to `compare_cpu.py`'s plain reference step.

For each setup, compiles both steps one after the other in this process (no compilation cache)
and prints the optimized HLO's size (lines, fusions) and the compile CPU seconds. Single compiles
vary by about 20 % from run to run on a shared machine; use `--repeats`.

    python benchmarks/compile_stats.py [--configs resnet18_32,resnet56_32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_cpu  # noqa: E402
import jax  # noqa: E402

from resnet_jax import benchmark, parallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="resnet18_32,resnet56_32", help=", ".join(compare_cpu.SETUPS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)  # compile times from scratch
    mesh = parallel.create_mesh()
    print("| setup | step | HLO lines | fusions | compile CPU s |")
    print("|---|---|---|---|---|")
    for name in args.configs.split(",") * args.repeats:
        setup = compare_cpu.SETUPS[name]
        options = benchmark.Options(
            models=(setup.model,),
            batch_sizes=(setup.batch_size,),
            image_sizes=(setup.image_size,),
            steps=1,
            warmup_steps=0,
        )
        ours, _ = compare_cpu.compile_ours(setup, options, mesh)
        reference = compare_cpu.compile_reference(setup, next(ours.batches))
        for label, compiled in (("resnet_jax", ours), ("reference", reference)):
            text = compiled.compiled.as_text()
            fusions = len(re.findall(r"^\s*\S+ = .*fusion\(", text, re.M))
            print(
                f"| {name} | {label} | {len(text.splitlines()):,} | {fusions:,} "
                f"| {compiled.compile_cpu_seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
