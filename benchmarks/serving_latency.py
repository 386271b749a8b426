"""Latency of the exported artifacts on this machine's CPU: StableHLO in JAX and ONNX in ONNX Runtime.

    python benchmarks/serving_latency.py [--model resnet50] [--image_size 224] [--batch_sizes 1,32]
        [--workdir DIR] [--repeats 20] [--json out.json]

Without --workdir the network is randomly initialised (latency does not depend on the weights).
Each runtime loads the serialized artifact as a server would, runs a few warm-up calls, then times
`--repeats` calls per batch size; the table gives the median per call and per image. Figures are in
docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from resnet_jax import export  # noqa: E402
from resnet_jax.inference import load_trained  # noqa: E402
from tests.test_export import random_trained  # noqa: E402


def timed(call: Callable[[np.ndarray], object], x: np.ndarray, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call(x)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(x)
        seconds.append(time.perf_counter() - t0)
    return seconds


def runtimes(trained) -> dict[str, Callable[[np.ndarray], object]]:
    exported = jax.export.deserialize(export.to_stablehlo(trained))
    found = {"StableHLO in JAX": lambda x: np.asarray(exported.call(x))}
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(export.to_onnx(trained), providers=["CPUExecutionProvider"])
        found["ONNX Runtime"] = lambda x: session.run(None, {"images": x})[0]
    except export.ExportError as e:
        print(f"ONNX skipped: {e}", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--workdir", help="export this run's latest checkpoint instead of a random net")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    trained = (
        load_trained(args.workdir)
        if args.workdir
        else random_trained(args.model, image_size=args.image_size, num_classes=1000)
    )
    rows = []
    shape = "x".join(map(str, trained.info.image_shape))
    print(f"{trained.config.model} at {shape}, {os.cpu_count()} CPU cores, jax {jax.__version__}")
    print(f"{'runtime':<18} {'batch':>5} {'ms/call':>9} {'ms/image':>9}")
    for runtime, call in runtimes(trained).items():
        for batch in map(int, args.batch_sizes.split(",")):
            x = np.random.default_rng(0).integers(0, 256, (batch, *trained.info.image_shape), dtype=np.uint8)
            median = statistics.median(timed(call, x, args.repeats))
            rows.append(
                dict(
                    runtime=runtime, batch=batch, ms_per_call=1e3 * median, ms_per_image=1e3 * median / batch
                )
            )
            print(f"{runtime:<18} {batch:>5} {1e3 * median:>9.1f} {1e3 * median / batch:>9.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": trained.config.model, "image_shape": trained.info.image_shape, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
