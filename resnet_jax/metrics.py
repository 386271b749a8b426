"""The metric collections (clu.metrics) that the jit-compiled steps return.

Nothing here does I/O: `writers` turns the computed values into files and TensorBoard events.
"""

import flax
import jax
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


def top5_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    k = min(5, logits.shape[-1])
    return (jax.lax.top_k(logits, k)[1] == labels[..., None]).any(axis=-1)


@flax.struct.dataclass
class Top5Accuracy(metrics.Average):
    """Top-5 accuracy from `logits` and `labels` (masked like `clu.metrics.Accuracy`)."""

    @classmethod
    def from_model_output(cls, *, logits: jax.Array, labels: jax.Array, **kwargs) -> "Top5Accuracy":
        kwargs.pop("values", None)
        metric = super().from_model_output(
            values=top5_correct(logits, labels).astype(jax.numpy.float32), **kwargs
        )
        return cls(**vars(metric))


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    top5_accuracy: Top5Accuracy
    learning_rate: metrics.LastValue.from_output("learning_rate")
    grad_norm: metrics.Average.from_output("grad_norm")
    nonfinite_steps: Sum.from_output("nonfinite")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    top5_accuracy: metrics.Average.from_output("top5_correct")


def merge_all(collections: list[metrics.Collection]) -> metrics.Collection:
    """The collections merged on the host, after one `device_get`.

    Merging the device arrays instead would launch a small eager program per add; in a
    multi-process run those are multi-device programs that XLA's CPU client can interleave with
    the in-flight train steps in a different order on each process, which hung two-process runs
    (docs/scaling.md, "Two-process hangs"). On the host the merge also costs no launches.
    """
    collections = jax.device_get(collections)
    merged = collections[0]
    for other in collections[1:]:
        merged = merged.merge(other)
    return merged


def summarize(collection: metrics.Collection, prefix: str) -> dict[str, float]:
    """`{prefix}_{name}` -> Python float, for writers."""
    return {f"{prefix}_{k}" if k != "learning_rate" else k: float(v) for k, v in collection.compute().items()}
