"""Evaluate a checkpoint on a dataset's eval split.

    python -m resnet_jax.evaluate --workdir DIR [--checkpoint best|latest|STEP] [--config.dataset=...]

Prints loss, top-1 and top-5 and writes them to DIR/eval_step{STEP}.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from absl import flags

from resnet_jax import cli, data, inference, parallel
from resnet_jax.errors import ConfigError
from resnet_jax.inference import load_trained


def evaluate_checkpoint(
    workdir: str, which: str = "latest", overrides: Sequence[str] = ()
) -> dict[str, float]:
    """Scores of one checkpoint on its config's eval split (`overrides` change that config first).

    Images are normalised with the statistics the run trained with (saved in the checkpoint), not
    the dataset's own: a run fine-tuned from other weights used those weights' statistics.
    """
    trained = load_trained(workdir, which, overrides)
    config = trained.config
    dataset = data.load(config)
    if dataset.info.num_classes != trained.info.num_classes:
        raise ConfigError(
            f"config.dataset={config.dataset!r} has {dataset.info.num_classes} classes; the checkpoint "
            f"was trained with {trained.info.num_classes}"
        )
    mesh = parallel.create_mesh()
    batch_size = inference.eval_batch_size(config, mesh)
    trained_info = dataclasses.replace(dataset.info, mean=trained.info.mean, std=trained.info.std)
    eval_step = inference.compile_eval_step(trained.model, trained_info, mesh)
    collection = inference.evaluate(eval_step, trained.state, dataset, batch_size=batch_size, mesh=mesh)
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
    flag_values = flags.FlagValues()
    cli.define_workdir(flag_values, "Training workdir (or `python -m resnet_jax.convert` output).")
    cli.define_checkpoint(flag_values)
    args = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in args if a.startswith("--config.")]
    rest = [a for a in args if not a.startswith("--config.")]
    cli.parse(flag_values, rest, prog="python -m resnet_jax.evaluate", doc=__doc__)

    def work() -> None:
        scores = evaluate_checkpoint(flag_values.workdir, flag_values.checkpoint, overrides)
        print(
            f"step {scores['step']} on {scores['dataset']} ({scores['num_examples']} images): "
            f"top-1 {scores['eval_accuracy']:.2%}, top-5 {scores['eval_top5_accuracy']:.2%}, "
            f"loss {scores['eval_loss']:.4f}"
        )
        out = os.path.join(flag_values.workdir, f"eval_step{scores['step']}.json")
        with open(out, "w") as f:
            json.dump(scores, f, indent=1)
        print(f"written to {out}")

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
