"""Evaluate a checkpoint on a dataset's eval split.

    python -m resnet_jax.evaluate --workdir DIR [--checkpoint best|latest|STEP] [--config.dataset=...]

Prints loss, top-1 and top-5 and writes them to DIR/eval_step{STEP}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from resnet_jax import checkpoint, data, parallel, sources
from resnet_jax.config_checks import ConfigError, check_config
from resnet_jax.inference import apply_overrides, load_trained
from resnet_jax.train import Trainer


def evaluate_checkpoint(workdir: str, which: str = "latest", overrides: list[str] = ()) -> dict[str, float]:
    trained = load_trained(workdir, which)
    config = trained.config
    apply_overrides(config, list(overrides))
    check_config(config)
    dataset = data.load(config)
    if dataset.info.num_classes != trained.info.num_classes:
        raise ConfigError(
            f"config.dataset={config.dataset!r} has {dataset.info.num_classes} classes; the checkpoint "
            f"was trained with {trained.info.num_classes}"
        )
    trainer = Trainer(config, dataset, parallel.create_mesh())
    collection = trainer.evaluate(trained.state)
    result = collection.compute()
    return {
        "step": trained.step,
        "dataset": config.dataset,
        "num_examples": int(collection.accuracy.count),
        "eval_loss": float(result["loss"]),
        "eval_accuracy": float(result["accuracy"]),
        "eval_top5_accuracy": float(result["top5_accuracy"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="latest", help="best, latest or a step number")
    args, overrides = parser.parse_known_args(argv)
    try:
        scores = evaluate_checkpoint(args.workdir, args.checkpoint, overrides)
    except (checkpoint.CheckpointError, ConfigError, sources.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"step {scores['step']} on {scores['dataset']} ({scores['num_examples']} images): "
        f"top-1 {scores['eval_accuracy']:.2%}, top-5 {scores['eval_top5_accuracy']:.2%}, "
        f"loss {scores['eval_loss']:.4f}"
    )
    out = os.path.join(args.workdir, f"eval_step{scores['step']}.json")
    with open(out, "w") as f:
        json.dump(scores, f, indent=1)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
