"""The gradient-flow study: plain, v1 and pre-activation nets measured (`gradient_norms`) at
initialisation and after K training steps on one fixed probe batch, with the training loss of
every step (He et al. 2016's degradation experiment on data we have), and verdicts computed from
the numbers.

`python -m resnet_jax.gradient_flow --out DIR` writes `gradient_flow.json`, a summary and the PNG
plots (`study_plots`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from resnet_jax import cli, data, defaults, models, optim, parallel, study_plots, tables
from resnet_jax.config_checks import check_config
from resnet_jax.errors import check_choice
from resnet_jax.gradient_norms import FAMILIES, check_nets, model_name, profiler, ratio
from resnet_jax.step import concatenates_grad_norm, init_state, normalize, rng_key, train_step

# A net "vanishes" (or "explodes") when the first conv's weight gradient is this many times smaller
# (larger) than the last conv's: a hundredfold change across the depth, not noise between layers.
VANISH_RATIO = 1e-2
EXPLODE_RATIO = 1e2
# "Trains worse": the deeper net's final loss exceeds the shallower one's by both margins.
WORSE_RELATIVE, WORSE_ABSOLUTE = 0.10, 0.01


# ---------------------------------------------------------------- the study


def study_config(
    dataset: str = "digits",
    image_size: int = 16,
    batch_size: int = 64,
    steps: int = 150,
    learning_rate: float = 0.05,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The training recipe every study model gets: the library's defaults, one fixed budget.

    Nesterov SGD with a cosine schedule and no weight decay (the loss curves show fitting alone).
    """
    config = defaults.get_config()
    config.dataset, config.image_size, config.augment = dataset, image_size, "auto"
    config.batch_size, config.num_train_steps, config.seed = batch_size, steps, seed
    config.optimizer, config.learning_rate, config.momentum = "nesterov", learning_rate, 0.9
    config.lr_schedule, config.warmup_epochs, config.weight_decay = "cosine", 0.0, 0.0
    config.grad_clip_norm = 0.0
    return check_config(config)


def probe_batch(dataset: data.Dataset, size: int) -> dict[str, jax.Array]:
    """The first `size` training examples, unaugmented: the same measured batch for every net."""
    examples = [dataset.eval_transform(dataset.train_source[i]) for i in range(size)]
    return {key: jnp.asarray(value) for key, value in data.stack_examples(examples).items()}


def run_model(
    family: str,
    depth: int,
    *,
    norm: str,
    activation: str,
    config: ml_collections.ConfigDict,
    dataset: data.Dataset,
) -> dict[str, Any]:
    """Profile one net at initialisation, train it for `config.num_train_steps`, profile it again.

    Zero-init of the residual branches is off: every family starts from He et al.'s
    initialisation, so the residual branches are live at step 0. The init key is an `rbg` key,
    which compiles faster than threefry on a CPU (`step.rng_key`). The nets train with the
    library's `train_step` (plain cross-entropy, no mixing); the probe batch is measured apart, by
    one compiled `gradient_norms.profiler` before and after training.
    """
    info = dataset.info
    name = model_name(family, depth)
    module = models.create(name, info.num_classes, norm=norm, activation=activation, zero_init_residual=False)
    sizes = parallel.run_sizes(config, info.num_train)
    steps = sizes.total_steps
    tx, schedule = optim.create(config, sizes.steps_per_epoch, steps)
    state = jax.jit(functools.partial(init_state, module, tx, info.image_shape))(rng_key(config.seed))
    probe = probe_batch(dataset, config.batch_size)
    variables = lambda state: {"params": state.params, "batch_stats": state.batch_stats}
    images = normalize(probe["image"], info.mean, info.std)
    profile = profiler(module, variables(state), images, probe["label"])
    at_init = profile(variables(state))
    step = jax.jit(
        functools.partial(
            train_step,
            model=module,
            tx=tx,
            schedule=schedule,
            mean=info.mean,
            std=info.std,
            concat_grad_norm=concatenates_grad_norm(config.grad_norm, jax.default_backend()),
        )
    )
    batches = data.train_loader(dataset, global_batch_size=config.batch_size, seed=config.seed)
    history = []
    for _ in range(steps):
        state, metrics = step(state, next(batches))
        history.append(metrics.loss)
    losses = [float(loss.compute()) for loss in jax.device_get(history)]
    trained = profile(variables(state))
    return {
        "model": name,
        "family": family,
        "depth": depth,
        "norm": norm,
        "activation": activation,
        "num_params": models.param_count(state.params),
        "init": at_init,
        "trained": trained,
        "train_loss": losses,
        "final_train_loss": final_loss(losses),
        "diverged_at_step": next((i + 1 for i, x in enumerate(losses) if not math.isfinite(x)), None),
    }


def final_loss(losses: Sequence[float]) -> float:
    """Mean training loss over the last tenth of the steps (one batch is noisy)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return float(np.mean(tail))


def run_study(
    depths: Sequence[int],
    families: Sequence[str] = FAMILIES,
    norms: Sequence[str] = ("batch", "none"),
    activations: Sequence[str] = ("relu",),
    config: ml_collections.ConfigDict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every (depth, family, norm, activation) net on one dataset and budget; the JSON document.

    `log` receives one line per trained net (default: printed).
    """
    log = log or functools.partial(print, flush=True)
    config = config or study_config()
    check_nets(families, depths, norms, activations)
    dataset = data.load(config)
    if config.batch_size > dataset.info.num_train:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {dataset.info.num_train} training images"
        )
    runs = []
    for norm, activation, depth, family in itertools.product(norms, activations, depths, families):
        start = time.perf_counter()
        run = run_model(family, depth, norm=norm, activation=activation, config=config, dataset=dataset)
        runs.append(run)
        log(
            f"{run['model']:>18} norm={norm:<5} {activation:<7} "
            f"|dL/dx| {_fmt(run['init']['input_grad_norm'])} "
            f"first/last {_fmt(run['init']['first_last_ratio'])} -> final loss "
            f"{_loss(run['final_train_loss'])} [{time.perf_counter() - start:.0f}s]"
        )
    return {
        "config": config.to_dict(),
        "dataset": {
            "name": dataset.info.name,
            "image_shape": list(dataset.info.image_shape),
            "num_train": dataset.info.num_train,
            "probe_batch_size": config.batch_size,
        },
        "definitions": {
            "grad_norm": "L2 norm of dL/dW (layers) or dL/da (block inputs, input image) on the probe batch",
            "first_last_ratio": "grad norm of the first conv kernel / that of the last main-path conv kernel",
            "final_train_loss": "mean training loss over the last tenth of the steps",
        },
        "runs": runs,
        "summary": summarize(runs),
    }


# ---------------------------------------------------------------- reading the numbers


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2e}"


def _loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "diverged"


def summary_table(runs: Iterable[dict[str, Any]]) -> str:
    """Markdown: depth x family x norm x activation -> input gradient, first/last ratio, final loss."""
    header = ["model", "norm", "activation", "\\|dL/dx\\| at init"]
    header += ["first/last at init", "first/last trained", "final train loss"]
    body = [
        [r["model"], r["norm"], r["activation"], _fmt(r["init"]["input_grad_norm"])]
        + [_fmt(r[when]["first_last_ratio"]) for when in ("init", "trained")]
        + [_loss(r["final_train_loss"])]
        for r in runs
    ]
    return "\n".join(tables.markdown(header, body))


def _flow_verdict(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "cannot be measured (non-finite gradients)"
    if ratio < VANISH_RATIO:
        return "vanish"
    if ratio > EXPLODE_RATIO:
        return "explode toward the input"
    return "neither vanish nor explode"


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statements about vanishing gradients and degradation, each carrying the numbers behind it."""
    by_key = {(r["family"], r["depth"], r["norm"], r["activation"]): r for r in runs}
    findings = []
    for r in runs:
        if r["family"] != "plain":
            continue
        first_last = r["init"]["first_last_ratio"]
        line = (
            f"{r['model']} (norm={r['norm']}, {r['activation']}): at initialisation the gradients "
            f"{_flow_verdict(first_last)} (first/last conv gradient ratio {_fmt(first_last)}"
        )
        reference = by_key.get(("preact_resnet", r["depth"], r["norm"], r["activation"]))
        if reference:
            mine, theirs = r["init"]["input_grad_norm"], reference["init"]["input_grad_norm"]
            line += f"; |dL/dx| {_fmt(mine)} vs {_fmt(theirs)} for {reference['model']}"
            line += f", ratio {_fmt(ratio(mine, theirs))}"
        findings.append(line + ").")

    degradation = []
    groups = sorted({(r["family"], r["norm"], r["activation"]) for r in runs})
    for family, norm, activation in groups:
        nets = sorted(
            (r for r in runs if (r["family"], r["norm"], r["activation"]) == (family, norm, activation)),
            key=lambda r: r["depth"],
        )
        if len(nets) < 2:
            continue
        shallow, deep = nets[0], nets[-1]
        a, b = shallow["final_train_loss"], deep["final_train_loss"]
        if not math.isfinite(b) or not math.isfinite(a):
            verdict = "cannot be compared (a run diverged)"
            worse = None
        else:
            worse = b > a * (1 + WORSE_RELATIVE) and b - a > WORSE_ABSOLUTE
            verdict = "trains worse than" if worse else "does not train worse than"
        degradation.append(
            {
                "family": family,
                "norm": norm,
                "activation": activation,
                "shallow": shallow["model"],
                "deep": deep["model"],
                "shallow_loss": a,
                "deep_loss": b,
                "deeper_trains_worse": worse,
                "text": f"{deep['model']} (norm={norm}, {activation}) {verdict} {shallow['model']}: "
                f"final training loss {_loss(b)} vs {_loss(a)}.",
            }
        )
    return {
        "vanishing": findings,
        "degradation": degradation,
        "table": summary_table(runs),
    }


def summary_text(document: dict[str, Any]) -> str:
    """The human-readable summary printed by the CLI and saved as summary.md."""
    summary, config = document["summary"], document["config"]
    parts = [
        f"Gradient flow on {document['dataset']['name']} at {config['image_size']} px, "
        f"{config['num_train_steps']} steps of batch {config['batch_size']}.",
        "",
        "Vanishing gradients in the plain nets:",
        *(f"- {line}" for line in summary["vanishing"]),
        "",
        "Deeper vs shallower in this budget (no warmup: it shows how sensitive deep nets are to the first",
        "steps; He et al.'s degradation with the library's recipe is `python -m resnet_jax.jacobians`):",
        *(f"- {d['text']}" for d in summary["degradation"]),
        "",
        summary["table"],
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- command line


def finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study, write gradient_flow.json, summary.md and the plots, print the summary.

    python -m resnet_jax.gradient_flow --out DIR [--depths 20,56] [--families plain,resnet,preact_resnet]
        [--norm batch,none] [--activation relu] [--dataset digits] [--steps 150] ...
    """
    flag_values = flags.FlagValues()
    define = functools.partial(flags.DEFINE_list, flag_values=flag_values)
    define("depths", ["20", "56"], "Depths, e.g. 20,56,110.")
    define("families", list(FAMILIES), "Any of plain,resnet,preact_resnet.")
    define("norm", ["batch", "none"], "batch,none.")
    define("activation", ["relu"], "relu,tanh,sigmoid.")
    flags.DEFINE_string("dataset", "digits", "A dataset spec (see resnet_jax.data).", flag_values=flag_values)
    flags.DEFINE_integer("image_size", 16, "Image size.", flag_values=flag_values)
    flags.DEFINE_integer("steps", 150, "Training steps K per net.", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 64, "Batch size.", flag_values=flag_values)
    flags.DEFINE_float("learning_rate", 0.05, "Peak learning rate.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Init and data seed.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=flag_values)
    flags.mark_flag_as_required("out", flag_values=flag_values)
    cli.parse(flag_values, argv, prog="python -m resnet_jax.gradient_flow", doc=main.__doc__)
    args = flag_values
    try:
        depths = [int(d) for d in args.depths]
    except ValueError:
        cli.fail(f"--depths={','.join(args.depths)!r} must be integers, e.g. 20,56,110")
    return cli.run(lambda: study_main(args, depths))


def study_main(args: Any, depths: list[int]) -> None:
    for family in args.families:
        check_choice("--families", family, FAMILIES)
    config = study_config(  # checked: a bad --dataset is one error here
        dataset=args.dataset,
        image_size=args.image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    document = run_study(depths, args.families, args.norm, args.activation, config)
    write_study(args.out, "gradient_flow", document, summary_text(document), study_plots.plot_gradient_flow)


def write_study(
    out_dir: str, name: str, document: dict[str, Any], text: str, plot: Callable[[dict[str, Any], str], Any]
) -> None:
    """out_dir/NAME.json (non-finite numbers as null), summary.md and the figures; prints the summary."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(finite_or_none(document), f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    plot(document, out_dir)
    print(text, end="")
    print(f"wrote {name}.json, summary.md and plots to {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
