"""The train state and the train and eval steps: pure functions of (state, batch) that
`resnet_jax.train` jit-compiles with the mesh's shardings.

Gradients come from `jax.value_and_grad` only. The train step optionally mixes the batch
(mixup/CutMix), accumulates gradients over micro-batches, scales the loss for float16, keeps an
EMA of the weights, and counts (or skips) non-finite steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from resnet_jax import metrics
from resnet_jax import mixing as mixing_lib
from resnet_jax.errors import check_choice


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # {'params', 'batch_stats'}: their exponential moving average (config.ema_decay > 0), else {}.
    ema: Any = flax.struct.field(default_factory=dict)
    # {'scale', 'good_steps'}: dynamic loss scaling for float16, else {}.
    loss_scale: Any = flax.struct.field(default_factory=dict)

    def for_eval(self) -> TrainState:
        """The weights evaluation uses: the EMA when there is one."""
        return self.replace(**self.ema) if self.ema else self


# Train metrics plus the float16 loss scale (`train_loss_scale`). Built with `Collection.create`
# because this module's annotations are strings (`from __future__ import annotations`).
ScaledTrainMetrics = clu_metrics.Collection.create(
    **metrics.TrainMetrics.__annotations__, loss_scale=clu_metrics.LastValue.from_output("loss_scale")
)


def rng_key(seed: int) -> jax.Array:
    """The run's random key. XLA's RngBitGenerator ("rbg") rather than JAX's default threefry: it
    compiles far faster on a CPU (figures in docs/benchmarks.md, "Figures behind the code's
    choices"), and TPUs generate it natively. Its numbers are deterministic for a given program and
    backend but, unlike threefry's, may differ between backends and JAX versions."""
    return jax.random.key(seed, impl="rbg")


def init_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    rng: jax.Array,
    *,
    ema: bool = False,
    loss_scale: float = 0.0,
) -> TrainState:
    """A fresh state from the model's initialisation (see `state_from_variables`)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return state_from_variables(variables, tx, ema=ema, loss_scale=loss_scale)


def state_from_variables(
    variables: Any, tx: optax.GradientTransformation, *, ema: bool = False, loss_scale: float = 0.0
) -> TrainState:
    """A step-0 state around given weights; `ema` starts the average at them, `loss_scale` > 0
    turns on dynamic loss scaling (float16) at that scale."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema={"params": params, "batch_stats": batch_stats} if ema else {},
        loss_scale=(
            {"scale": jnp.float32(loss_scale), "good_steps": jnp.zeros((), jnp.int32)} if loss_scale else {}
        ),
    )


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 NHWC -> float32 standardised per channel (on the device, inside the step)."""
    return (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    return soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy against (B, C) target distributions (one-hot or mixed), in float32."""
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy(logits, targets)


def binary_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    label_smoothing: float = 0.0,
    target_threshold: float | None = None,
) -> jax.Array:
    """Per-example sigmoid binary cross-entropy, averaged over the classes, in float32: timm's
    `BinaryCrossEntropy` (ResNet strikes back). Smoothing moves every target toward 1 / classes;
    with `target_threshold`, (mixed, smoothed) targets above it become 1 and the rest 0."""
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    if target_threshold is not None:
        targets = (targets > target_threshold).astype(jnp.float32)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)


LOSSES = ("softmax", "bce")  # config.loss


def example_loss(kind: str, label_smoothing: float = 0.0, bce_target_threshold: float | None = None) -> Any:
    """`config.loss` (one of `LOSSES`) -> per-example loss(logits, (B, C) targets)."""
    if kind not in LOSSES:
        raise ValueError(f"config.loss={kind!r} is not valid; choose one of: {', '.join(LOSSES)}")
    if kind == "bce":
        return lambda logits, targets: binary_cross_entropy(
            logits, targets, label_smoothing, bce_target_threshold
        )
    return lambda logits, targets: soft_cross_entropy(logits, targets, label_smoothing)


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) with micro-batch i = examples i, i + k, i + 2k, ...

    Strided rather than contiguous, so that a batch sharded over devices stays where it is: each
    device's rows form its share of every micro-batch (the batch check makes them divide by k).
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def join_micro_batches(x: jax.Array) -> jax.Array:
    """The inverse of `split_micro_batches`: (k, B/k, ...) -> (B, ...) in the batch's order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulate_gradients(
    loss_and_grads: Any, state: TrainState, micro_batch_inputs: tuple[jax.Array, ...], k: int
) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], Any]:
    """`loss_and_grads` over k micro-batches, one after the other in a `lax.scan`.

    `micro_batch_inputs` are already split (k, ...) arrays. Returns what one call on the whole
    batch returns: the mean loss and gradient (the micro-batches are equal in size), the logits in
    the batch's order, and the batch_stats after the last micro-batch. BatchNorm normalises each
    micro-batch with its own statistics, and its running averages take k momentum updates per step.
    """

    def micro_step(carry, inputs):
        batch_stats, grad_sum = carry
        (loss, (logits, batch_stats)), grads = loss_and_grads(batch_stats, *inputs)
        return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads)), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (batch_stats, grad_sum), (losses, logits) = jax.lax.scan(
        micro_step, (state.batch_stats, zeros), micro_batch_inputs
    )
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return (losses.mean(), (join_micro_batches(logits), batch_stats)), grads


GRAD_NORMS = ("auto", "per_leaf", "concatenated")  # config.grad_norm


def concatenates_grad_norm(setting: str, platform: str) -> bool:
    """Whether `config.grad_norm` (one of `GRAD_NORMS`) takes `global_norm`'s concatenated form on
    devices of `platform`: "auto" does on CPUs only (see `global_norm`)."""
    check_choice("config.grad_norm", setting, GRAD_NORMS)
    return setting == "concatenated" or (setting == "auto" and platform == "cpu")


def global_norm(tree: Any, concatenate: bool = False) -> jax.Array:
    """The L2 norm of all leaves together: one sum of squares per leaf, or (`concatenate`) one
    reduction over their concatenation.

    Per leaf, XLA's TPU backend fuses each square-sum into the work that already reads the
    gradient, where the concatenation's parameter-sized copy costs more HBM traffic; XLA's CUDA
    backend gives each leaf's square-sum a kernel of its own; on a CPU the per-leaf reductions are
    a sizeable share of the step's fusions and compile time (docs/benchmarks.md has the figures).
    """
    leaves = jax.tree.leaves(tree)
    if concatenate:
        return jnp.linalg.norm(jnp.concatenate([jnp.ravel(x) for x in leaves]))
    return jnp.sqrt(
        sum(jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))) for x in leaves)
    )


def update_loss_scale(
    loss_scale: dict[str, jax.Array], finite: jax.Array, period: int
) -> dict[str, jax.Array]:
    """Dynamic loss scaling: halve on overflow, double after `period` finite steps in a row."""
    good = jnp.where(finite, loss_scale["good_steps"] + 1, 0)
    grow = good >= period
    scale = jnp.where(
        finite, jnp.where(grow, loss_scale["scale"] * 2, loss_scale["scale"]), loss_scale["scale"] / 2
    )
    return {"scale": jnp.maximum(scale, 1.0), "good_steps": jnp.where(grow, 0, good)}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the train step trains, beyond the model and optimizer: the config's loss, mixing,
    accumulation, EMA and float16 settings in one object (`from_config`) that the step reads."""

    label_smoothing: float = 0.0
    loss: str = "softmax"  # one of LOSSES
    bce_target_threshold: float | None = None
    skip_nonfinite: bool = False
    grad_accum_steps: int = 1
    mixing: mixing_lib.Mixing = mixing_lib.Mixing()
    ema_decay: float = 0.0
    loss_scale_period: int = 2000
    seed: int = 0

    @classmethod
    def from_config(cls, config: Any) -> StepOptions:
        return cls(
            label_smoothing=config.label_smoothing,
            loss=config.loss,
            bce_target_threshold=config.bce_target_threshold,
            skip_nonfinite=config.skip_nonfinite_steps,
            grad_accum_steps=config.grad_accum_steps,
            mixing=mixing_lib.Mixing.from_config(config),
            ema_decay=config.ema_decay,
            loss_scale_period=config.loss_scale_period,
            seed=config.seed,
        )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    options: StepOptions = StepOptions(),
    concat_grad_norm: bool = False,
) -> tuple[TrainState, metrics.TrainMetrics]:
    """One optimizer step; a non-finite loss or gradient is counted (and skipped if asked).

    With `options.grad_accum_steps` k > 1 the batch runs as k micro-batches (see
    `accumulate_gradients`) and the optimizer steps once on their mean gradient. The step's
    randomness (mixup/cutmix, dropout, stochastic depth) comes from `options.seed` and the step
    number, so a resumed run repeats it. With a loss scale in the state (float16), the loss is
    scaled before differentiation, a non-finite step is skipped and the scale adapts
    (`update_loss_scale`). `options.loss` is `softmax` (cross-entropy) or `bce`
    (`binary_cross_entropy`). `concat_grad_norm` picks `global_norm`'s single reduction (for CPUs,
    where it compiles faster).
    """
    key = jax.random.fold_in(rng_key(options.seed), state.step)
    mix_key, dropout_key = jax.random.split(key)
    images, targets, _ = mixing_lib.mix_batch(
        mix_key,
        normalize(batch["image"], mean, std),
        batch["label"],
        model.num_classes,
        options.mixing,
    )
    scale = state.loss_scale["scale"] if state.loss_scale else None
    per_example_loss = example_loss(options.loss, options.label_smoothing, options.bce_target_threshold)

    def loss_and_grads(batch_stats, images, targets, dropout_key):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            mean_loss = per_example_loss(logits, targets).mean()
            return (mean_loss if scale is None else mean_loss * scale), (
                mean_loss,
                logits,
                updates["batch_stats"],
            )

        (_, (loss, logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        return (loss, (logits, new_stats)), grads

    if options.grad_accum_steps == 1:
        (loss, (logits, batch_stats)), grads = loss_and_grads(state.batch_stats, images, targets, dropout_key)
    else:
        k = options.grad_accum_steps
        inputs = (
            split_micro_batches(images, k),
            split_micro_batches(targets, k),
            jax.random.split(dropout_key, k),
        )
        (loss, (logits, batch_stats)), grads = accumulate_gradients(loss_and_grads, state, inputs, k)
    grad_norm = global_norm(grads, concat_grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # One scalar test instead of one reduction per gradient and update leaf (which doubled the
    # step's HLO and its compile time): an inf/NaN anywhere makes the norm non-finite, and so
    # does a norm that overflows float32 (|g| > 1e19), which is no step worth taking either.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if state.ema:
        decay = options.ema_decay
        average = lambda old, new: decay * old + (1 - decay) * new
        new_state = new_state.replace(
            ema=jax.tree.map(average, state.ema, {"params": params, "batch_stats": batch_stats})
        )
    if options.skip_nonfinite or scale is not None:  # a skipped step still counts (schedule, data order)
        keep_old = lambda new, old: jnp.where(finite, new, old)
        new_state = jax.tree.map(keep_old, new_state, state).replace(step=state.step + 1)
    outputs = dict(
        loss=loss,
        logits=logits,
        labels=batch["label"],
        learning_rate=schedule(state.step),
        grad_norm=grad_norm,
        nonfinite=(~finite).astype(jnp.int32),
    )
    if scale is not None:
        new_state = new_state.replace(
            loss_scale=update_loss_scale(state.loss_scale, finite, options.loss_scale_period)
        )
        return new_state, ScaledTrainMetrics.single_from_model_output(**outputs, loss_scale=scale)
    return new_state, metrics.TrainMetrics.single_from_model_output(**outputs)


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> metrics.EvalMetrics:
    """Running BatchNorm statistics; padded examples (mask 0) do not count."""
    logits = eval_logits(state, batch["image"], model=model, mean=mean, std=std)
    return metrics.EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, batch["label"]),
        logits=logits,
        labels=batch["label"],
        top5_correct=metrics.top5_correct(logits, batch["label"]),
        mask=batch["mask"],
    )


def eval_logits(
    state: TrainState,
    images: jax.Array,
    *,
    model: flax.linen.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> jax.Array:
    """Inference-mode logits of uint8 NHWC images (running BatchNorm statistics)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model.apply(variables, normalize(images, mean, std), train=False)
