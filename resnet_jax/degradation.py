"""He et al.'s degradation experiment on the library's own recipe: deeper plain nets train worse,
deeper residual nets do not.

He et al. (2016), Figure 6: with BatchNorm and a warmed-up schedule, the 56-layer plain CIFAR net has
a higher *training* error than the 20-layer one (so it is not overfitting), while the residual nets
improve with depth. Each net here is an ordinary `train.train_and_evaluate` run of one recipe (the
quick start's `configs/digits.py` by default) with only `config.model` changed, so the comparison
is what a user gets from `train.py --config.model=...`. The verdicts are computed from the
measured numbers (`compare`), never written by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from resnet_jax import data, gradient_flow, inference, models, parallel, train
from resnet_jax.step import TrainState

# A deeper net "trains worse" when its training error exceeds the shallower one's by more than
# this (1 percentage point: 14 of digits' 1,437 training images), and "no worse" otherwise.
WORSE_ERROR_MARGIN = 0.01
RESIDUAL_FAMILIES = ("resnet", "preact_resnet")


@dataclasses.dataclass
class TrainedNet:
    """One recipe run: its final state and what He et al.'s figure plots."""

    state: TrainState
    record: dict[str, Any]


def run_config(recipe: ml_collections.ConfigDict, model: str, activation: str) -> ml_collections.ConfigDict:
    """The recipe with only the model (and activation) changed, logging the loss every other step."""
    config = ml_collections.ConfigDict(recipe.to_dict())
    config.model, config.activation = model, activation
    config.log_every_steps = 2
    config.progress = "lines"
    return config


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_accuracy(config: ml_collections.ConfigDict, state: TrainState, dataset: data.Dataset) -> float:
    """Accuracy on the whole training split, unaugmented (the eval transform), as He et al. plot it."""
    mesh = parallel.create_mesh()
    model = models.create_model(config, dataset.info.num_classes)
    step = inference.compile_eval_step(model, dataset.info, mesh)
    on_train = dataclasses.replace(dataset, eval_source=dataset.train_source)
    size = inference.eval_batch_size(config, mesh)
    merged = inference.evaluate(step, state, on_train, batch_size=size, mesh=mesh)
    return float(merged.compute()["accuracy"])


def train_net(
    recipe: ml_collections.ConfigDict, model: str, activation: str, workdir: str, dataset: data.Dataset
) -> TrainedNet:
    """Train one net with the recipe in `workdir` (its output goes to workdir/train.log); a finished
    run there is resumed at its last step, which only evaluates it again."""
    config = run_config(recipe, model, activation)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.log"), "a") as log, contextlib.redirect_stdout(log):
        state = train.train_and_evaluate(config, workdir)
    rows = read_metrics(workdir)
    curve = [(row["step"], row["train_loss"]) for row in rows if "train_loss" in row]
    evals = [row for row in rows if "eval_accuracy" in row]
    accuracy = train_accuracy(config, state, dataset)
    record = {
        "steps": [step for step, _ in curve],
        "train_loss": [loss for _, loss in curve],
        "final_train_loss": gradient_flow.final_loss([loss for _, loss in curve]) if curve else math.nan,
        "train_accuracy": accuracy,
        "train_error": 1.0 - accuracy,
        "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "workdir": workdir,
    }
    return TrainedNet(state, record)


def compare(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deeper against shallower within each family and setting, for every pair of consecutive
    trained depths: whether the deeper net trains worse, and whether that is Figure 6's ordering
    (plain: worse; residual: no worse)."""
    rows = []
    trained = [r for r in runs if r.get("training")]
    groups = sorted({(r["family"], r["norm"], r["activation"]) for r in trained})
    for family, norm, activation in groups:
        nets = sorted(
            (r for r in trained if (r["family"], r["norm"], r["activation"]) == (family, norm, activation)),
            key=lambda r: r["depth"],
        )
        for shallow, deep in zip(nets, nets[1:], strict=False):
            a, b = shallow["training"]["train_error"], deep["training"]["train_error"]
            worse = b > a + WORSE_ERROR_MARGIN
            expected = family not in RESIDUAL_FAMILIES
            verdict = "trains worse than" if worse else "does not train worse than"
            rows.append(
                {
                    "family": family,
                    "norm": norm,
                    "activation": activation,
                    "shallow": shallow["model"],
                    "deep": deep["model"],
                    "shallow_train_error": a,
                    "deep_train_error": b,
                    "deeper_trains_worse": worse,
                    "matches_figure_6": worse == expected,
                    "text": f"{deep['model']} {verdict} {shallow['model']}: training error "
                    f"{b:.2%} vs {a:.2%} (eval accuracy {_percent(deep)} vs {_percent(shallow)}).",
                }
            )
    return rows


def _percent(run: dict[str, Any]) -> str:
    accuracy = run["training"]["eval_accuracy"]
    return "n/a" if accuracy is None else f"{accuracy:.2%}"
