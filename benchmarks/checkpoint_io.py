"""Save and restore times of a full train state through `resnet_jax.checkpoint.Checkpoints`.

    python benchmarks/checkpoint_io.py [--model resnet50] [--repeats 3] [--dir /tmp/ckpt_bench]

The state is what `train.py` checkpoints for `configs/default.py` (ImageNet, 1000 classes, Nesterov
momentum): params, batch_stats and the optimizer's momentum. Reported per repeat: the time until
`save` returns (the training loop's pause; the write continues in the background), until the
write is complete, and of a restore into the sharded abstract state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from resnet_jax import checkpoint, compiled_steps, data, parallel  # noqa: E402
from resnet_jax.config_checks import check_config  # noqa: E402
from resnet_jax.step import TrainState  # noqa: E402


def state_bytes(state: TrainState) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    config = default.get_config()
    config.update(model=args.model, dataset="synthetic", image_size=32, num_train_steps=10)
    config = check_config(config)
    dataset = data.load(config)
    steps = compiled_steps.CompiledSteps(config, dataset.info, parallel.create_mesh())
    state = jax.block_until_ready(steps.init(jax.random.key(0)))
    abstract = checkpoint.with_sharding(
        jax.eval_shape(steps.init, jax.random.key(0)), parallel.replicated(steps.mesh)
    )
    size = state_bytes(state)
    print(f"{args.model}: {size / 2**20:.0f} MiB of train state on {parallel.describe(steps.mesh)}")

    root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    rows = []
    try:
        for repeat in range(args.repeats):
            workdir = os.path.join(root, f"run{repeat}")
            checkpoints = checkpoint.Checkpoints(workdir, keep=1)
            t0 = time.perf_counter()
            checkpoints.save(1, state, config=config, dataset_info=dataset.info)
            returned = time.perf_counter() - t0
            checkpoints.wait()
            written = time.perf_counter() - t0
            checkpoints.close()
            reader = checkpoint.Checkpoints(workdir, read_only=True)
            t0 = time.perf_counter()
            restored = jax.block_until_ready(reader.restore(1, abstract)["state"])
            read = time.perf_counter() - t0
            reader.close()
            same = all(
                np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
            )
            rows.append((returned, written, read))
            print(
                f"repeat {repeat + 1}: save returns in {returned:.2f}s, written in {written:.2f}s "
                f"({size / 2**20 / written:.0f} MiB/s), restore {read:.2f}s, identical: {same}",
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    median = np.median(np.asarray(rows), axis=0)
    print(f"median: save returns {median[0]:.2f}s, write complete {median[1]:.2f}s, restore {median[2]:.2f}s")


if __name__ == "__main__":
    main()
