"""Loss, accuracy and learning-rate curves of one or several runs, from their metrics.jsonl.

    python -m resnet_jax.plot WORKDIR [WORKDIR ...] [--out curves.png]

One colour per run (the legend names its workdir); solid lines are train, dashed lines eval.
Rows may name their metrics by metrics.jsonl key (`train_loss`) or TensorBoard tag (`train/loss`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import flags

from resnet_jax import cli, writers
from resnet_jax.errors import UserError

# (panel title, y label, [(metrics.jsonl key, line style, label suffix)])
PANELS = [
    ("loss", "cross-entropy", [("train_loss", "-", "train"), ("eval_loss", "--", "eval")]),
    ("accuracy", "top-1 accuracy", [("train_accuracy", "-", "train"), ("eval_accuracy", "--", "eval")]),
    ("learning rate", "learning rate", [("learning_rate", "-", "")]),
]


class PlotError(UserError, ValueError):
    """A workdir without readable metrics; the message names it."""


def read_metrics(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl key -> (steps, values) from WORKDIR/metrics.jsonl (TensorBoard tags are read as
    their keys); a resumed run's repeated steps keep the last."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{workdir!r} has no metrics.jsonl (is it the --workdir of a training run?)")
    series: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                raise PlotError(f"{path}:{number} is not a metrics row with a step: {line[:80]!r}") from None
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    series.setdefault(writers.metrics_key(key), {})[step] = float(value)
    if not series:
        raise PlotError(f"{path} holds no metrics yet")
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in series.items()}


def run_label(workdir: str, workdirs: Sequence[str]) -> str:
    """The workdir's last folder name, or its path where two runs share one."""
    name = os.path.basename(os.path.normpath(workdir))
    return name if sum(os.path.basename(os.path.normpath(w)) == name for w in workdirs) == 1 else workdir


def plot_runs(workdirs: Sequence[str], out: str) -> str:
    """Draw the panels for every run into `out` (any format matplotlib writes, e.g. .png or .svg)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = [(run_label(w, workdirs), read_metrics(w)) for w in workdirs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, series) in enumerate(runs):
        colour = colours[i % len(colours)]
        for ax, (title, ylabel, lines) in zip(axes, PANELS, strict=True):
            for key, style, suffix in lines:
                if key in series:
                    steps, values = series[key]
                    label = f"{name} {suffix}".strip()
                    ax.plot(
                        steps,
                        values,
                        style,
                        color=colour,
                        label=label,
                        marker="." if len(steps) < 30 else None,
                    )
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
    for ax in axes:
        if ax.has_data():
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    flag_values = flags.FlagValues()
    flags.DEFINE_string(
        "out", None, "Image file (default: curves.png in the first WORKDIR).", flag_values=flag_values
    )
    workdirs = cli.parse(
        flag_values, argv, prog="python -m resnet_jax.plot", doc=__doc__, positional="WORKDIR ..."
    )
    if not workdirs:
        cli.fail(
            "no WORKDIR given: run directories with metrics.jsonl (see python -m resnet_jax.plot --help)"
        )

    def work() -> None:
        out = flag_values.out or os.path.join(workdirs[0], "curves.png")
        try:
            path = plot_runs(workdirs, out)
        except OSError as e:
            raise PlotError(f"cannot write {out!r}: {e.strerror or e}") from None
        print(f"wrote {path}")

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
