"""The Jacobian study: per-block spectra of plain, v1 and pre-activation nets at initialisation
and after training with the library's recipe, against depth and the measured gradient.

`python -m resnet_jax.jacobians --out DIR` measures every net's blocks (`block_spectra`) at
initialisation and, for `--train_depths`, trains it with the recipe (`degradation`: He et al.'s
degradation experiment) and measures it again, then writes jacobians.json, summary.md (statements
computed from the numbers) and the plots (`study_plots`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from resnet_jax import (
    block_spectra,
    cli,
    compiled_steps,
    data,
    degradation,
    gradient_flow,
    models,
    optim,
    study_plots,
    tables,
)
from resnet_jax.config_checks import check_config
from resnet_jax.errors import UserError, check_choice
from resnet_jax.gradient_norms import FAMILIES, check_nets, model_name
from resnet_jax.step import normalize, rng_key

MODES = ("train", "eval")
# "Around 1": a residual block's top singular value within this factor of 1 (either way).
IDENTITY_BAND = 2.0
# The default study's estimator and probe batch (docs/gradient_flow.md: how far the top values move with
# more steps, and the study's wall time).
ITERATIONS, PROBES, PROBE_SIZE = 20, 4, 32
UNTRAINED = "not trained: the recipe has BatchNorm"


# ---------------------------------------------------------------- the study


def cifar_depths() -> list[int]:
    """The depths of the registry's CIFAR plain nets (each has its v1 and pre-activation twin)."""
    return sorted(
        int(name[5:]) for name in models.names() if name.startswith("plain") and models.is_cifar(name)
    )


def probe(dataset: data.Dataset, size: int) -> tuple[jax.Array, jax.Array]:
    """The first `size` training images, unaugmented and normalised, and their labels."""
    batch = gradient_flow.probe_batch(dataset, size)
    return normalize(batch["image"], dataset.info.mean, dataset.info.std), batch["label"]


def initial_variables(config: ml_collections.ConfigDict, info: data.DatasetInfo, model: nn.Module) -> Any:
    """The variables a `train.py` run of `config` starts from (same init function and key)."""
    sizes = compiled_steps.run_sizes(config, info)
    tx, _ = optim.create(config, sizes.steps_per_epoch, sizes.total_steps)
    state = jax.jit(compiled_steps.state_initializer(config, info, model, tx))(rng_key(config.seed))
    return {"params": state.params, "batch_stats": state.batch_stats}


def run_net(
    family: str,
    depth: int,
    *,
    norm: str,
    activation: str,
    recipe: ml_collections.ConfigDict,
    dataset: data.Dataset,
    estimator: block_spectra.SpectrumEstimator,
    probe_batch: tuple[jax.Array, jax.Array],
    train_dir: str | None,
) -> dict[str, Any]:
    """Spectra at initialisation; with `train_dir` (and BatchNorm, which the recipe has) the net is
    also trained by the recipe in train_dir/MODEL and measured again."""
    name = model_name(family, depth)
    config = degradation.run_config(recipe, name, activation)
    info = dataset.info
    model = models.create(
        name, info.num_classes, norm=norm, activation=activation, zero_init_residual=config.zero_init_residual
    )
    images, labels = probe_batch
    key = rng_key(config.seed)
    measure = functools.partial(
        block_spectra.network_spectra, model, images=images, labels=labels, estimator=estimator
    )
    run = {"model": name, "family": family, "depth": depth, "norm": norm, "activation": activation}
    run["init"] = measure(initial_variables(config, info, model), key=key)
    run["trained"] = run["training"] = None
    if train_dir is not None and norm != "batch":
        run["not_trained"] = UNTRAINED
    elif train_dir is not None:
        net = degradation.train_net(recipe, name, activation, os.path.join(train_dir, name), dataset)
        variables = {"params": net.state.params, "batch_stats": net.state.batch_stats}
        run["trained"] = measure(variables, key=key)
        run["training"] = net.record
    return run


def run_study(
    depths: Sequence[int],
    families: Sequence[str] = FAMILIES,
    norms: Sequence[str] = ("batch",),
    activations: Sequence[str] = ("relu",),
    *,
    recipe: ml_collections.ConfigDict,
    train_depths: Sequence[int] = (),
    out_dir: str | None = None,
    mode: str = "train",
    iterations: int = ITERATIONS,
    probes: int = PROBES,
    probe_size: int = PROBE_SIZE,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every (setting, depth, family) net: spectra at init and, for `train_depths`, after training
    with the recipe in out_dir/runs/MODEL (a finished run there is reused).

    `log` receives one line per net (default: printed). Returns the JSON document.
    """
    if train_depths and out_dir is None:
        raise UserError("training nets (train_depths) needs an out_dir for their runs")
    log = log or functools.partial(print, flush=True)
    for depth in depths:
        check_choice("--depths", depth, cifar_depths())
    check_nets(families, depths, norms, activations)
    check_choice("--mode", mode, MODES)
    for key, value in (("--iterations", iterations), ("--probes", probes), ("--probe_size", probe_size)):
        if value < 1:
            raise UserError(f"{key}={value} must be a positive integer")
    recipe = check_config(recipe)
    dataset = data.load(recipe)
    if probe_size > dataset.info.num_train:
        raise UserError(f"--probe_size={probe_size} exceeds the {dataset.info.num_train} training images")
    estimator = block_spectra.SpectrumEstimator(iterations, probes, train=mode == "train")
    probe_batch = probe(dataset, probe_size)  # the same measured batch for every net
    runs = []
    for norm, activation, depth, family in itertools.product(norms, activations, depths, families):
        start = time.perf_counter()
        run = run_net(
            family,
            depth,
            norm=norm,
            activation=activation,
            recipe=recipe,
            dataset=dataset,
            estimator=estimator,
            probe_batch=probe_batch,
            train_dir=os.path.join(out_dir, "runs") if depth in train_depths else None,
        )
        runs.append(run)
        log(
            f"{run['model']:>18} norm={norm:<5} {activation:<7} {_net_line(run)} "
            f"[{time.perf_counter() - start:.0f}s]"
        )
    return {
        "recipe": recipe.to_dict(),
        "dataset": {"name": dataset.info.name, "image_shape": list(dataset.info.image_shape)},
        "estimator": {"mode": mode, "iterations": iterations, "probes": probes, "probe_size": probe_size},
        "runs": runs,
        "summary": summarize(runs),
    }


def _net_line(run: dict[str, Any]) -> str:
    tops = [b["total"]["top"] for b in run["init"]["blocks"]]
    bound = run["init"]["product"]["bound_over_measured"]
    line = f"top sigma {min(tops):.3g}..{max(tops):.3g}, bound/measured {_fmt(bound)}"
    if run["training"]:
        line += f" -> train error {run['training']['train_error']:.2%}"
    if run.get("not_trained"):
        line += f" ({run['not_trained']})"
    return line


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


# ---------------------------------------------------------------- statements from the numbers


def spectrum_band(run: dict[str, Any], when: str, part: str, value: str = "top") -> dict[str, float]:
    """min, median and max over the blocks of one net of a singular-value estimate."""
    values = np.array([b[part][value] for b in run[when]["blocks"]])
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statements about the spectra, the depth product and degradation, each with its numbers."""
    spectra_lines, product_lines = [], []
    for r in runs:
        for when in ("init", "trained"):
            if r[when] is None:
                continue
            top, rms = spectrum_band(r, when, "total"), spectrum_band(r, when, "total", "rms")
            branch = spectrum_band(r, when, "branch")
            near = np.mean(
                [1 / IDENTITY_BAND <= b["total"]["top"] <= IDENTITY_BAND for b in r[when]["blocks"]]
            )
            spectra_lines.append(
                f"{r['model']} ({_setting(r)}, {when}): top singular value of the block maps "
                f"{_fmt(top['min'])}..{_fmt(top['max'])} (median {_fmt(top['median'])}; "
                f"{near:.0%} of blocks within {IDENTITY_BAND:g}x of 1), of the branches alone "
                f"{_fmt(branch['min'])}..{_fmt(branch['max'])}; RMS singular value "
                f"{_fmt(rms['min'])}..{_fmt(rms['max'])}."
            )
            p = r[when]["product"]
            product_lines.append(
                f"{r['model']} ({_setting(r)}, {when}): measured |dL/dx_0| / |dL/dx_L| = "
                f"{_power(p['log10_measured_gain'])} ({_fmt(p['per_block_gain'])} per block); the product "
                f"of top singular values bounds it at {_power(p['log10_top_product'])} "
                f"({_fmt(p['per_block_top'])} per block; bound / measured {_fmt(p['bound_over_measured'])}, "
                f"most slack in {p['worst_block']}); the RMS product gives {_power(p['log10_rms_product'])} "
                f"({_fmt(p['per_block_rms'])} per block; RMS product / measured "
                f"{_fmt(p['rms_over_measured'])})."
            )
    rows = degradation.compare(runs)
    return {
        "spectra": spectra_lines,
        "depth_product": product_lines,
        "degradation": rows,
        "figure_6_ordering": all(row["matches_figure_6"] for row in rows) if rows else None,
        "table": summary_table(runs),
    }


def _power(log10_value: float) -> str:
    return f"10^{log10_value:.2f}" if math.isfinite(log10_value) else "n/a"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _setting(run: dict[str, Any]) -> str:
    return f"norm={run['norm']}, {run['activation']}"


def summary_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per net and state."""
    header = ["model", "setting", "state", "top σ median (min..max)", "RMS σ median", "bound / measured"]
    header += ["RMS product / measured", "train error", "eval accuracy"]
    body = []
    for r in runs:
        for when in ("init", "trained"):
            if r[when] is None:
                continue
            top, rms, p = (
                spectrum_band(r, when, "total"),
                spectrum_band(r, when, "total", "rms"),
                r[when]["product"],
            )
            training = (r["training"] or {}) if when == "trained" else {}
            band = f"{_fmt(top['median'])} ({_fmt(top['min'])}..{_fmt(top['max'])})"
            body.append(
                [r["model"], _setting(r), when, band, _fmt(rms["median"]), _fmt(p["bound_over_measured"])]
                + [_fmt(p["rms_over_measured"]), _percent(training.get("train_error"))]
                + [_percent(training.get("eval_accuracy"))]
            )
    return "\n".join(tables.markdown(header, body))


def summary_text(document: dict[str, Any]) -> str:
    """The summary printed by the command line and saved as summary.md."""
    summary, estimator = document["summary"], document["estimator"]
    ordering = summary["figure_6_ordering"]
    parts = [
        f"Jacobian spectra on {document['dataset']['name']} ({estimator['mode']} mode, probe batch "
        f"{estimator['probe_size']}, {estimator['iterations']} Lanczos steps, {estimator['probes']} "
        "Hutchinson probes).",
        "",
        "Per-block singular values:",
        *(f"- {line}" for line in summary["spectra"]),
        "",
        "The product across depth against the measured gradient (first block's input, last block's output):",
        *(f"- {line}" for line in summary["depth_product"]),
    ]
    if summary["degradation"]:
        verdict = "reproduced" if ordering else "not reproduced"
        parts += [
            "",
            f"Degradation with the recipe (He et al. 2016, Figure 6's ordering {verdict}):",
            *(f"- {row['text']}" for row in summary["degradation"]),
        ]
    return "\n".join([*parts, "", summary["table"]]) + "\n"


# ---------------------------------------------------------------- command line

DEFAULT_RECIPE = "configs/digits.py"


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, f"The recipe every net trains with (default {DEFAULT_RECIPE})."
    )
    flags.DEFINE_string("out", None, "Output folder: jacobians.json, summary.md, plots, runs/MODEL.")
    flags.mark_flag_as_required("out")
    flags.DEFINE_list(
        "depths", ["20", "56", "110"], "CIFAR depths whose spectra are measured at initialisation."
    )
    flags.DEFINE_list(
        "train_depths",
        ["20", "56"],
        "Of --depths, those also trained by the recipe and measured again ('' none).",
    )
    flags.DEFINE_list("families", list(FAMILIES), "Any of plain,resnet,preact_resnet.")
    flags.DEFINE_list("norm", ["batch"], "batch,none (nets without normalisation are not trained).")
    flags.DEFINE_list("activation", ["relu"], "relu,tanh,sigmoid.")
    flags.DEFINE_string("mode", "train", "train (batch statistics) or eval (running statistics).")
    flags.DEFINE_integer("iterations", ITERATIONS, "Lanczos steps per Jacobian.")
    flags.DEFINE_integer("probes", PROBES, "Hutchinson probes per Jacobian (the RMS singular value).")
    flags.DEFINE_integer("probe_size", PROBE_SIZE, "Training images in the fixed probe batch.")


def main(argv: Sequence[str]) -> int:
    """Per-block Jacobian spectra of plain, v1 and pre-activation CIFAR nets at initialisation and after
    training with a recipe, their product across depth against the measured gradient, and He et al.'s
    degradation experiment (docs/gradient_flow.md). Writes jacobians.json, summary.md and plots to --out.

    python -m resnet_jax.jacobians --out DIR [--depths 20,56,110] [--train_depths 20,56]
    [--families plain,resnet,preact_resnet] [--norm batch] [--activation relu] [--mode train]
    [--config configs/digits.py] [--config.KEY=VALUE ...]
    """
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (see --help)")

    def work() -> None:
        depths = _depths("--depths", FLAGS.depths)
        trained = _depths("--train_depths", FLAGS.train_depths)
        if set(trained) - set(depths):
            raise UserError(
                f"--train_depths={','.join(FLAGS.train_depths)} must be among "
                f"--depths={','.join(FLAGS.depths)}"
            )
        for family in FLAGS.families:
            check_choice("--families", family, FAMILIES)
        options = dict(
            families=FLAGS.families,
            norms=FLAGS.norm,
            activations=FLAGS.activation,
            recipe=FLAGS.config,
            mode=FLAGS.mode,
            iterations=FLAGS.iterations,
            probes=FLAGS.probes,
            probe_size=FLAGS.probe_size,
        )
        if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
            raise UserError(f"--out={FLAGS.out!r} is a file; pass a folder (it is created if missing)")
        os.makedirs(FLAGS.out, exist_ok=True)
        document = run_study(depths, train_depths=trained, out_dir=FLAGS.out, **options)
        gradient_flow.write_study(
            FLAGS.out, "jacobians", document, summary_text(document), study_plots.plot_jacobians
        )

    return cli.run(work)


def _depths(name: str, values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values if v.strip()]
    except ValueError:
        raise UserError(f"{name}={','.join(values)!r} must be integers, e.g. 20,56,110") from None


if __name__ == "__main__":
    from absl import app, logging

    define_flags()
    logging.set_verbosity(logging.WARNING)
    args = sys.argv  # the default recipe goes before any --config.KEY override, which needs it
    if cli.config_file_argument(args) is None:
        args = [args[0], f"--config={DEFAULT_RECIPE}", *args[1:]]
    app.run(
        lambda argv: sys.exit(main(argv)),
        argv=args,
        flags_parser=cli.absl_flags_parser(inspect.cleandoc(main.__doc__)),
    )
