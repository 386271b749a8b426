"""Gradient flow through plain and residual networks, measured with `jax.grad`.

Backprop through a residual block y = x + F(x) gives dL/dx = dL/dy (I + dF/dx): the identity
term carries the gradient even where dF/dx is small, while a plain stack multiplies Jacobians.
For plain (`plainN`), v1 residual (`resnetN`, activation after the sum) and pre-activation
(`preact_resnetN`, a clean identity path) nets this module records, at initialisation and after
K training steps on one fixed probe batch:

- the gradient norm of every main-path weight layer (stem conv, block convs, classifier), in
  forward order, and of the projection-shortcut convs;
- the gradient norm of the activation entering every block (a zero perturbation added there by a
  Flax method interceptor, differentiated like any other input);
- the gradient norm that reaches the input image;

and the training loss of every step (He et al. 2016's degradation experiment on data we have).
`python -m resnet_jax.gradient_flow --out DIR` writes `gradient_flow.json`, PNG plots and a
summary whose statements are computed from the measured numbers.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import traverse_util

from resnet_jax import cli, data, defaults, models, optim
from resnet_jax.config_checks import check_config
from resnet_jax.errors import check_choice
from resnet_jax.step import TrainState, cross_entropy, init_state, normalize, rng_key

FAMILIES = ("plain", "resnet", "preact_resnet")
# A net "vanishes" (or "explodes") when the first conv's weight gradient is this many times smaller
# (larger) than the last conv's: a hundredfold change across the depth, not noise between layers.
VANISH_RATIO = 1e-2
EXPLODE_RATIO = 1e2
# "Trains worse": the deeper net's final loss exceeds the shallower one's by both margins.
WORSE_RELATIVE, WORSE_ABSOLUTE = 0.10, 0.01


def model_name(family: str, depth: int) -> str:
    """Registry name of a study model, checked against the registry."""
    check_choice("family", family, FAMILIES)
    name = f"{family}{depth}"
    check_choice("model", name, models.names())
    return name


# ---------------------------------------------------------------- measuring one batch


def robust_norm(x: jax.Array) -> jax.Array:
    """L2 norm scaled by max|x| first, so that gradients near 1e-20 do not square to zero in float32."""
    peak = jnp.max(jnp.abs(x))
    scale = jnp.where(peak > 0, peak, 1.0)
    return scale * jnp.sqrt(jnp.sum(jnp.square(x / scale)))


def is_block_call(context: Any) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, models.BasicBlock)


def block_input_shapes(module: nn.Module, variables: Any, images: jax.Array) -> dict[str, tuple[int, ...]]:
    """Per-example shape of the activation entering each block, in forward order (nothing is computed)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(call: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if is_block_call(context):
            shapes[context.module.name] = tuple(args[0].shape[1:])
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, images)
    return shapes


def batch_loss(
    module: nn.Module,
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    block_perturbations: dict[str, jax.Array] | None = None,
    output_perturbations: dict[str, jax.Array] | None = None,
    train: bool = True,
) -> tuple[jax.Array, Any]:
    """Mean cross-entropy and the new batch_stats, in train mode (batch statistics, as in training)
    unless `train` is False (running statistics, batch_stats unchanged).

    `block_perturbations[name]` is added to the input of block `name`, `output_perturbations[name]`
    to its output: differentiating with respect to a zero perturbation gives the gradient of the
    loss with respect to that activation.
    """
    inputs, outputs = block_perturbations or {}, output_perturbations or {}

    def perturb(call: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if not is_block_call(context):
            return call(*args, **kwargs)
        name = context.module.name
        if name in inputs:
            args = (args[0] + inputs[name], *args[1:])
        out = call(*args, **kwargs)
        return out + outputs[name] if name in outputs else out

    with nn.intercept_methods(perturb):
        if not train:
            return cross_entropy(module.apply(variables, images, train=False), labels).mean(), {}
        logits, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
    return cross_entropy(logits, labels).mean(), updates.get("batch_stats", {})


def loss_and_gradient_norms(
    module: nn.Module,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    labels: jax.Array,
    block_shapes: dict[str, tuple[int, ...]],
) -> tuple[Any, Any, dict[str, Any]]:
    """(new batch_stats, parameter gradients, norms): one `jax.value_and_grad` for everything measured.

    norms: `loss`, `input` (dL/d image), `blocks` (dL/d block input) and `kernels` (dL/dW per layer).
    """
    zeros = {name: jnp.zeros((images.shape[0], *shape), images.dtype) for name, shape in block_shapes.items()}
    loss_fn = lambda p, x, e: batch_loss(module, {"params": p, "batch_stats": batch_stats}, x, labels, e)
    (loss, new_stats), (param_grads, image_grads, block_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True
    )(params, images, zeros)
    kernels = {
        "/".join(path[:-1]): robust_norm(grad)
        for path, grad in traverse_util.flatten_dict(param_grads).items()
        if path[-1] == "kernel"
    }
    norms = {
        "loss": loss,
        "input": robust_norm(image_grads),
        "blocks": {name: robust_norm(grad) for name, grad in block_grads.items()},
        "kernels": kernels,
    }
    return new_stats, param_grads, norms


def _layer_order(name: str) -> tuple[int, ...]:
    """Forward order of a kernel: stem, then block by block (convK in order), then fc."""
    path = name.split("/")
    if path[0] == "conv1":
        return (0, 0, 0, 0)
    if path[0] == "fc":
        return (2, 0, 0, 0)
    stage, block = re.fullmatch(r"layer(\d+)_(\d+)", path[0]).groups()
    conv = 0 if path[1] == "shortcut" else int(path[1].removeprefix("conv"))
    return (1, int(stage), int(block), conv)


def read_profile(norms: dict[str, Any], block_names: Iterable[str]) -> dict[str, Any]:
    """Host-side profile from `loss_and_gradient_norms`' norms, layers in forward order.

    `layers` is the main path (stem conv, block convs, fc: as many as the net's depth);
    `first_last_ratio` is |dL/dW| of the first conv over that of the last conv on it: far below 1
    the gradient vanishes on its way to the input, far above 1 it explodes.
    """
    norms = jax.device_get(norms)
    kernels = sorted(norms["kernels"], key=_layer_order)
    entry = lambda name, value: {"name": name, "grad_norm": float(value)}
    layers = [entry(name, norms["kernels"][name]) for name in kernels if "shortcut" not in name]
    convs = [layer for layer in layers if layer["name"] != "fc"]
    return {
        "loss": float(norms["loss"]),
        "input_grad_norm": float(norms["input"]),
        "first_last_ratio": _ratio(convs[0]["grad_norm"], convs[-1]["grad_norm"]),
        "layers": layers,
        "shortcut_convs": [entry(name, norms["kernels"][name]) for name in kernels if "shortcut" in name],
        "block_inputs": [entry(name, norms["blocks"][name]) for name in block_names],
    }


def gradient_profile(
    module: nn.Module, variables: Any, images: jax.Array, labels: jax.Array
) -> dict[str, Any]:
    """Every gradient statistic of one batch of (normalised) images at the given variables."""
    shapes = block_input_shapes(module, variables, images)
    measure = jax.jit(functools.partial(loss_and_gradient_norms, module, block_shapes=shapes))
    _, _, norms = measure(variables["params"], variables.get("batch_stats", {}), images, labels)
    return read_profile(norms, shapes)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def flow_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    module: nn.Module,
    tx: optax.GradientTransformation,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    block_shapes: dict[str, tuple[int, ...]],
) -> tuple[TrainState, dict[str, Any]]:
    """An optimizer step that also returns the gradient norms of its batch.

    On the probe batch, with the new state thrown away, it is a measurement; one compiled function
    serves both, which halves the compile time of the study on a CPU.
    """
    images = normalize(batch["image"], mean, std)
    batch_stats, grads, norms = loss_and_gradient_norms(
        module, state.params, state.batch_stats, images, batch["label"], block_shapes
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, norms


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
    which compiles faster than threefry on a CPU (`step.rng_key`).
    """
    info = dataset.info
    name = model_name(family, depth)
    module = models.create(name, info.num_classes, norm=norm, activation=activation, zero_init_residual=False)
    steps = config.num_train_steps
    tx, _ = optim.create(config, max(1, info.num_train // config.batch_size), steps)
    key = rng_key(config.seed)
    state = jax.jit(functools.partial(init_state, module, tx, info.image_shape))(key)
    probe = probe_batch(dataset, config.batch_size)
    shapes = block_input_shapes(
        module, {"params": state.params, "batch_stats": state.batch_stats}, probe["image"]
    )
    step = jax.jit(
        functools.partial(flow_step, module=module, tx=tx, mean=info.mean, std=info.std, block_shapes=shapes)
    )
    at_init = read_profile(step(state, probe)[1], shapes)
    batches = data.train_loader(dataset, global_batch_size=config.batch_size, seed=config.seed)
    losses = []
    for _ in range(steps):
        state, norms = step(state, next(batches))
        losses.append(norms["loss"])
    losses = [float(x) for x in jax.device_get(losses)]
    trained = read_profile(step(state, probe)[1], shapes)
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
    for family, depth in itertools.product(families, depths):
        model_name(family, depth)
    for norm in norms:
        check_choice("norm", norm, models.NORMS)
    for activation in activations:
        check_choice("activation", activation, tuple(models.ACTIVATIONS))
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
    lines = [
        "| model | norm | activation | \\|dL/dx\\| at init | first/last at init | first/last trained "
        "| final train loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['model']} | {r['norm']} | {r['activation']} | {_fmt(r['init']['input_grad_norm'])} "
            f"| {_fmt(r['init']['first_last_ratio'])} | {_fmt(r['trained']['first_last_ratio'])} "
            f"| {_loss(r['final_train_loss'])} |"
        )
    return "\n".join(lines)


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
        ratio = r["init"]["first_last_ratio"]
        line = (
            f"{r['model']} (norm={r['norm']}, {r['activation']}): at initialisation the gradients "
            f"{_flow_verdict(ratio)} (first/last conv gradient ratio {_fmt(ratio)}"
        )
        reference = by_key.get(("preact_resnet", r["depth"], r["norm"], r["activation"]))
        if reference:
            mine, theirs = r["init"]["input_grad_norm"], reference["init"]["input_grad_norm"]
            line += f"; |dL/dx| {_fmt(mine)} vs {_fmt(theirs)} for {reference['model']}"
            line += f", ratio {_fmt(_ratio(mine, theirs))}"
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


# ---------------------------------------------------------------- plots


def plot(document: dict[str, Any], out_dir: str) -> list[str]:
    """gradient_norms.png, block_input_gradients.png, training_loss.png; a panel per setting and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = document["runs"]
    settings = sorted({(r["norm"], r["activation"]) for r in runs})
    depths = sorted({r["depth"] for r in runs})
    colors = {family: f"C{i}" for i, family in enumerate(FAMILIES)}
    paths = []

    def grid(columns: Sequence[Any]) -> tuple[Any, np.ndarray]:
        fig, axes = plt.subplots(
            len(settings), len(columns), figsize=(4.2 * len(columns), 3.2 * len(settings)), squeeze=False
        )
        return fig, axes

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    for key, filename, xlabel in (
        ("layers", "gradient_norms.png", "weight layer (1 = stem conv, last = fc)"),
        ("block_inputs", "block_input_gradients.png", "block"),
    ):
        fig, axes = grid(depths)
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
                    label = f"{r['family']} ({'init' if when == 'init' else 'trained'})"
                    ax.plot(range(1, len(values) + 1), values, style, color=colors[r["family"]], label=label)
            ax.set_yscale("log")
            ax.set_title(f"depth {depth}, norm={norm}, {activation}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("gradient norm", fontsize=8)
        axes[0, 0].legend(fontsize=7)
        save(fig, filename)

    fig, axes = grid([None])
    styles = {depth: style for depth, style in zip(depths, ("-", "--", ":", "-."), strict=False)}
    for row, (norm, activation) in enumerate(settings):
        ax = axes[row, 0]
        for r in runs:
            if (r["norm"], r["activation"]) == (norm, activation):
                ax.plot(
                    range(1, len(r["train_loss"]) + 1),
                    r["train_loss"],
                    styles.get(r["depth"], "-"),
                    color=colors[r["family"]],
                    label=r["model"],
                    linewidth=1,
                )
        ax.set_yscale("log")
        ax.set_title(f"training loss, norm={norm}, {activation}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    save(fig, "training_loss.png")
    return paths


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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradient_flow.json"), "w") as f:
        json.dump(finite_or_none(document), f, indent=1)
    text = summary_text(document)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    plot(document, args.out)
    print(text, end="")
    print(f"wrote gradient_flow.json, summary.md and plots to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
