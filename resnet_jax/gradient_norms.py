"""Gradient norms of one batch through plain and residual nets, measured with `jax.grad`.

Backprop through a residual block y = x + F(x) gives dL/dx = dL/dy (I + dF/dx): the identity
term carries the gradient even where dF/dx is small, while a plain stack multiplies Jacobians.
For plain (`plainN`), v1 residual (`resnetN`, activation after the sum) and pre-activation
(`preact_resnetN`, a clean identity path) nets, one `jax.value_and_grad` gives:

- the gradient norm of every main-path weight layer (stem conv, block convs, classifier), in
  forward order, and of the projection-shortcut convs;
- the gradient norm of the activation entering every block (a zero perturbation added there by a
  Flax method interceptor, differentiated like any other input);
- the gradient norm that reaches the input image.

The studies (`gradient_flow`, `jacobians`, `block_spectra`) build on these pieces.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from resnet_jax import models
from resnet_jax.errors import check_choice
from resnet_jax.step import cross_entropy

FAMILIES = ("plain", "resnet", "preact_resnet")


def model_name(family: str, depth: int) -> str:
    """Registry name of a study model, checked against the registry."""
    check_choice("family", family, FAMILIES)
    name = f"{family}{depth}"
    check_choice("model", name, models.names())
    return name


def check_nets(
    families: Iterable[str], depths: Iterable[int], norms: Iterable[str], activations: Iterable[str]
) -> None:
    """Fail before anything is computed unless every net a study would build exists."""
    for family, depth in itertools.product(families, depths):
        model_name(family, depth)
    for norm in norms:
        check_choice("--norm", norm, models.NORMS)
    for activation in activations:
        check_choice("--activation", activation, tuple(models.ACTIVATIONS))


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


def gradient_norms(
    module: nn.Module,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    labels: jax.Array,
    block_shapes: dict[str, tuple[int, ...]],
) -> dict[str, Any]:
    """`loss`, `input` (dL/d image), `blocks` (dL/d block input) and `kernels` (dL/dW per layer):
    one `jax.value_and_grad` for everything measured."""
    zeros = {name: jnp.zeros((images.shape[0], *shape), images.dtype) for name, shape in block_shapes.items()}
    loss_fn = lambda p, x, e: batch_loss(module, {"params": p, "batch_stats": batch_stats}, x, labels, e)
    (loss, _), (param_grads, image_grads, block_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True
    )(params, images, zeros)
    kernels = {
        "/".join(path[:-1]): robust_norm(grad)
        for path, grad in traverse_util.flatten_dict(param_grads).items()
        if path[-1] == "kernel"
    }
    return {
        "loss": loss,
        "input": robust_norm(image_grads),
        "blocks": {name: robust_norm(grad) for name, grad in block_grads.items()},
        "kernels": kernels,
    }


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
    """Host-side profile from `gradient_norms`, layers in forward order.

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
        "first_last_ratio": ratio(convs[0]["grad_norm"], convs[-1]["grad_norm"]),
        "layers": layers,
        "shortcut_convs": [entry(name, norms["kernels"][name]) for name in kernels if "shortcut" in name],
        "block_inputs": [entry(name, norms["blocks"][name]) for name in block_names],
    }


def profiler(
    module: nn.Module, variables: Any, images: jax.Array, labels: jax.Array
) -> Callable[[Any], dict[str, Any]]:
    """`profile(variables)`: every gradient statistic of this batch of (normalised) images, compiled
    once, so that a net is measured again after training without a second compile."""
    shapes = block_input_shapes(module, variables, images)
    measure = jax.jit(functools.partial(gradient_norms, module, block_shapes=shapes))

    def profile(variables: Any) -> dict[str, Any]:
        return read_profile(
            measure(variables["params"], variables.get("batch_stats", {}), images, labels), shapes
        )

    return profile


def ratio(a: float, b: float) -> float:
    """a / b, infinite where b is 0."""
    return a / b if b else math.inf
