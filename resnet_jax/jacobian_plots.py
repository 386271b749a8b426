"""The Jacobian study's figures: per-block spectra, the depth product, and the recipe's loss curves."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from resnet_jax.gradient_flow import FAMILIES


def plot(document: dict[str, Any], out_dir: str) -> list[str]:
    """jacobian_spectra.png and branch_spectra.png (per block: top, RMS and the bound on the bottom
    singular value), depth_product.png and, after training, degradation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = document["runs"]
    colors = {family: f"C{i}" for i, family in enumerate(FAMILIES)}
    depths = sorted({r["depth"] for r in runs})
    rows = sorted(
        {(r["norm"], r["activation"], when) for r in runs for when in ("init", "trained") if r[when]}
    )
    paths = []

    def figure(num_rows: int, num_cols: int, width: float = 4.2) -> tuple[Any, np.ndarray]:
        size = (width * num_cols, 3.2 * num_rows)
        return plt.subplots(num_rows, num_cols, figsize=size, squeeze=False)

    def save(fig: Any, name: str, legend_ax: Any) -> None:
        legend_ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    def panels(axes_now: np.ndarray) -> Any:
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
        fig, axes = figure(len(rows), len(depths))
        for i, j, title, nets, when in panels(axes):
            ax = axes[i, j]
            for r in nets:
                blocks = r[when]["blocks"]
                x = range(1, len(blocks) + 1)
                color = colors[r["family"]]
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
        save(fig, filename, axes[0, 0])

    fig, axes = figure(len(rows), len(depths))
    for i, j, title, nets, when in panels(axes):
        ax = axes[i, j]
        for r in nets:
            blocks, color = r[when]["blocks"], colors[r["family"]]
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
    save(fig, "depth_product.png", axes[0, 0])

    trained = sorted({(r["norm"], r["activation"]) for r in runs if r["training"]})
    if trained:
        fig, axes = figure(len(trained), 1, width=7.0)
        styles = dict(zip(depths, ("-", "--", ":", "-."), strict=False))
        for i, setting in enumerate(trained):
            ax = axes[i, 0]
            for r in runs:
                if r["training"] and (r["norm"], r["activation"]) == setting:
                    t = r["training"]
                    ax.plot(
                        t["steps"],
                        t["train_loss"],
                        styles.get(r["depth"], "-"),
                        color=colors[r["family"]],
                        label=r["model"],
                        linewidth=1,
                    )
            ax.set_yscale("log")
            ax.set_title(f"training loss with the recipe, norm={setting[0]}, {setting[1]}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        save(fig, "degradation.png", axes[0, 0])
    return paths


def _log10(value: float) -> float:
    """log10, NaN (a gap in the line) for a gradient that underflowed to zero."""
    return math.log10(value) if value > 0 else math.nan
