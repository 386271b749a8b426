"""Metric collections (clu.metrics) and the writers for stdout, metrics.jsonl and TensorBoard.

clu's own writers import TensorFlow, so the TensorFlow-free core writes
TensorBoard event files through tensorboardX; scalar tags are the
metrics.jsonl keys.
"""

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from clu import metrics


@flax.struct.dataclass
class Sum(metrics.Metric):
    """A count that adds up over steps and devices (clu has averages, not sums)."""

    total: jax.Array

    @classmethod
    def from_model_output(cls, values: jax.Array, **_) -> "Sum":
        return cls(total=jax.numpy.sum(values))

    def merge(self, other: "Sum") -> "Sum":
        return type(self)(total=self.total + other.total)

    def compute(self) -> jax.Array:
        return self.total


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    learning_rate: metrics.LastValue.from_output("learning_rate")
    grad_norm: metrics.Average.from_output("grad_norm")
    nonfinite_steps: Sum.from_output("nonfinite")


def top5_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    k = min(5, logits.shape[-1])
    return (jax.lax.top_k(logits, k)[1] == labels[:, None]).any(axis=-1)


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    top5_accuracy: metrics.Average.from_output("top5_correct")


def merge_all(collections: list[metrics.Collection]) -> metrics.Collection:
    merged = collections[0]
    for other in collections[1:]:
        merged = merged.merge(other)
    return merged


def summarize(collection: metrics.Collection, prefix: str) -> dict[str, float]:
    """`{prefix}_{name}` -> Python float, for writers."""
    return {f"{prefix}_{k}" if k != "learning_rate" else k: float(v) for k, v in collection.compute().items()}


def log(message: str) -> None:
    """Progress output: process 0 only, flushed so that piped logs keep up."""
    if jax.process_index() == 0:
        print(message, flush=True)


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class MetricWriter:
    """stdout is handled by `log`; this writes metrics.jsonl and TensorBoard events (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tensorboard = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 - lives with the writer
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self._tensorboard is not None:
            flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
            self._tensorboard.add_text("config", json.dumps(flat, indent=1, default=str), 0)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
