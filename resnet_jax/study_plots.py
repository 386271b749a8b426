"""The figures of the gradient-flow and Jacobian studies (`gradient_flow`, `jacobians`), drawn from
their JSON documents: one colour per family, one line style per depth, a panel per setting.

matplotlib is imported when a figure is drawn, so that the studies import without it.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from resnet_jax.gradient_norms import FAMILIES

COLORS = {family: f"C{i}" for i, family in enumerate(FAMILIES)}
DEPTH_STYLES = ("-", "--", ":", "-.")


class _Figures:
    """Grids of equal panels, saved as PNG files in one folder (created if missing)."""

    def __init__(self, out_dir: str):
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        os.makedirs(out_dir, exist_ok=True)
        self.plt, self.out_dir, self.paths = plt, out_dir, []

    def grid(self, num_rows: int, num_cols: int, width: float = 4.2) -> tuple[Any, np.ndarray]:
        return self.plt.subplots(
            num_rows, num_cols, figsize=(width * num_cols, 3.2 * num_rows), squeeze=False
        )

    def save(self, fig: Any, name: str) -> None:
        fig.tight_layout()
        self.paths.append(os.path.join(self.out_dir, name))
        fig.savefig(self.paths[-1], dpi=100)
        self.plt.close(fig)


def _loss_curves(
    figures: _Figures,
    runs: list[dict[str, Any]],
    curve: Callable[[dict[str, Any]], tuple[Any, Any] | None],
    title: str,
    width: float,
) -> Any | None:
    """A panel per (norm, activation) setting with `curve(run)` = (steps, losses) for some net; None
    where no net has one."""
    settings = sorted({(r["norm"], r["activation"]) for r in runs if curve(r)})
    if not settings:
        return None
    fig, axes = figures.grid(len(settings), 1, width)
    styles = dict(zip(sorted({r["depth"] for r in runs}), DEPTH_STYLES, strict=False))
    for ax, (norm, activation) in zip(axes[:, 0], settings, strict=True):
        for r in runs:
            if (r["norm"], r["activation"]) == (norm, activation) and curve(r):
                style = styles.get(r["depth"], "-")
                ax.plot(*curve(r), style, color=COLORS[r["family"]], label=r["model"], linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{title}, norm={norm}, {activation}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def plot_gradient_flow(document: dict[str, Any], out_dir: str) -> list[str]:
    """gradient_norms.png, block_input_gradients.png, training_loss.png; a panel per setting and depth."""
    figures = _Figures(out_dir)
    runs = document["runs"]
    settings = sorted({(r["norm"], r["activation"]) for r in runs})
    depths = sorted({r["depth"] for r in runs})
    for key, filename, xlabel in (
        ("layers", "gradient_norms.png", "weight layer (1 = stem conv, last = fc)"),
        ("block_inputs", "block_input_gradients.png", "block"),
    ):
        fig, axes = figures.grid(len(settings), len(depths))
        for (row, (norm, activation)), (col, depth) in itertools.product(
            enumerate(settings), enumerate(depths)
        ):
            ax = axes[row, col]
            for r in runs:
                if (r["norm"], r["activation"], r["depth"]) != (norm, activation, depth):
                    continue
                for when, style in (("init", "-"), ("trained", "--")):
                    values = [
                        entry["grad_norm"] if entry["grad_norm"] > 0 else np.nan for entry in r[when][key]
                    ]
                    label = f"{r['family']} ({when})"
                    ax.plot(range(1, len(values) + 1), values, style, color=COLORS[r["family"]], label=label)
            ax.set_yscale("log")
            ax.set_title(f"depth {depth}, norm={norm}, {activation}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("gradient norm", fontsize=8)
        axes[0, 0].legend(fontsize=7)
        figures.save(fig, filename)
    curve = lambda r: (range(1, len(r["train_loss"]) + 1), r["train_loss"])
    figures.save(_loss_curves(figures, runs, curve, "training loss", width=4.2), "training_loss.png")
    return figures.paths


def plot_jacobians(document: dict[str, Any], out_dir: str) -> list[str]:
    """jacobian_spectra.png and branch_spectra.png (per block: top, RMS and the bound on the bottom
    singular value), depth_product.png and, after training, degradation.png."""
    figures = _Figures(out_dir)
    runs = document["runs"]
    depths = sorted({r["depth"] for r in runs})
    rows = sorted(
        {(r["norm"], r["activation"], when) for r in runs for when in ("init", "trained") if r[when]}
    )

    def panels(axes_now: np.ndarray) -> Iterator[tuple[int, int, str, list[dict[str, Any]], str]]:
        for (i, (norm, activation, when)), (j, depth) in itertools.product(
            enumerate(rows), enumerate(depths)
        ):
            nets = [
                r
                for r in runs
                if (r["norm"], r["activation"], r["depth"]) == (norm, activation, depth) and r[when]
            ]
            if not nets:  # a depth measured at initialisation only
                axes_now[i, j].set_axis_off()
                axes_now[i, j].set_title(f"depth {depth}: {when} not measured", fontsize=8)
                continue
            yield i, j, f"depth {depth}, norm={norm}, {activation}, {when}", nets, when

    for part, filename in (("total", "jacobian_spectra.png"), ("branch", "branch_spectra.png")):
        fig, axes = figures.grid(len(rows), len(depths))
        for i, j, title, nets, when in panels(axes):
            ax = axes[i, j]
            for r in nets:
                blocks = r[when]["blocks"]
                x = range(1, len(blocks) + 1)
                color = COLORS[r["family"]]
                ax.plot(x, [b[part]["top"] for b in blocks], "-", color=color, label=f"{r['family']} top")
                ax.plot(x, [b[part]["rms"] for b in blocks], "--", color=color, label=f"{r['family']} RMS")
                bottom = [b[part]["bottom"] if b[part]["bottom"] > 0 else np.nan for b in blocks]
                ax.plot(
                    x, bottom, ":", color=color, linewidth=0.8, label=f"{r['family']} bottom (upper bound)"
                )
            ax.axhline(1.0, color="gray", linewidth=0.5)
            ax.set_yscale("log")
            ax.set_title(f"{'x -> y' if part == 'total' else 'x -> F(x)'}: {title}", fontsize=8)
            ax.set_xlabel("block", fontsize=8)
            ax.set_ylabel("singular value", fontsize=8)
        axes[0, 0].legend(fontsize=6)
        figures.save(fig, filename)

    fig, axes = figures.grid(len(rows), len(depths))
    for i, j, title, nets, when in panels(axes):
        ax = axes[i, j]
        for r in nets:
            blocks, color = r[when]["blocks"], COLORS[r["family"]]
            end = _log10(blocks[-1]["grad_out"])
            x = range(1, len(blocks) + 1)
            ax.plot(
                x,
                [_log10(b["grad_in"]) - end for b in blocks],
                "-",
                color=color,
                label=f"{r['family']} measured",
            )
            for value, style in (("top", "--"), ("rms", ":")):
                tail = np.cumsum([_log10(b["total"][value]) for b in blocks][::-1])[::-1]
                ax.plot(x, tail, style, color=color, label=f"{r['family']} product of {value} σ")
        ax.set_title(f"log10 |dL/dx_i| / |dL/dx_L|: {title}", fontsize=8)
        ax.set_xlabel("block i (its input)", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    figures.save(fig, "depth_product.png")

    curve = lambda r: (r["training"]["steps"], r["training"]["train_loss"]) if r["training"] else None
    fig = _loss_curves(figures, runs, curve, "training loss with the recipe", width=7.0)
    if fig is not None:
        figures.save(fig, "degradation.png")
    return figures.paths


def _log10(value: float) -> float:
    """log10, NaN (a gap in the line) for a gradient that underflowed to zero."""
    return math.log10(value) if value > 0 else math.nan
