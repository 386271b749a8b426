"""Per-block Jacobian spectra of a network, and the product of their norms across depth.

Backprop through a residual block y = x + F(x) multiplies the gradient by J = I + J_F, through a
plain block by J_F alone (and through v1's activation after the sum by act' as well). For every
block `network_spectra` estimates the top, bottom and RMS singular values of the block's Jacobian
(`resnet_jax.spectra`) for its whole map x -> y and for its residual branch x -> F(x) alone
(`BasicBlock.branch_only`), on one probe batch, in train mode (batch statistics: the Jacobian of
the whole batch's map, BatchNorm's coupling of the examples included) or eval mode.

Across depth, |dL/dx_0| <= |dL/dx_L| * prod_i sigma_top(J_i) for the stack of blocks from x_0 (the
first block's input) to x_L (the last block's output): `depth_product` sets that bound, and the
product of RMS singular values (what a random direction sees), against the gradients measured at
every block boundary with `jax.grad`; the per-block gaps say where the bound loses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import gradient_norms, spectra
from resnet_jax.layers import Identity


def block_modules(model: nn.Module, variables: Any, images: jax.Array, train: bool) -> dict[str, nn.Module]:
    """Every block of `model` as an unbound module, in forward order (a trace; nothing is computed)."""
    modules: dict[str, nn.Module] = {}

    def record(call: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if gradient_norms.is_block_call(context):
            modules[context.module.name] = context.module.clone(parent=None)
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"]), variables, images
        )
    return modules


@functools.partial(jax.jit, static_argnames=("model", "train"))
def block_inputs(
    variables: Any, images: jax.Array, *, model: nn.Module, train: bool
) -> tuple[dict[str, jax.Array], jax.Array]:
    """({block name: its input}, the last block's output) for `images` (compiled once per model)."""
    inputs: dict[str, jax.Array] = {}
    outputs: list[jax.Array] = []

    def record(call: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        out = call(*args, **kwargs)
        if gradient_norms.is_block_call(context):
            inputs[context.module.name] = args[0]
            outputs.append(out)
        return out

    with nn.intercept_methods(record):
        model.apply(variables, images, train=train, mutable=["batch_stats"])
    return inputs, outputs[-1]


def block_function(module: nn.Module, variables: Any, train: bool) -> Callable[[jax.Array], jax.Array]:
    """x -> the block's output, with its own params and batch_stats."""
    if train:
        return lambda x: module.apply(variables, x, mutable=["batch_stats"])[0]
    return lambda x: module.apply(variables, x)


def block_settings(module: nn.Module) -> tuple:
    """What a block computes, short of its parameters: its fields, with the conv and norm layers that
    `ResNet` makes anew for every net replaced by the kind of norm. Blocks of nets that differ only
    in their conv dtype would compare equal; the study's nets are all float32."""
    injected = ("name", "parent", "conv", "norm", "fold_norm")
    fields = tuple(
        (f.name, getattr(module, f.name)) for f in dataclasses.fields(module) if f.name not in injected
    )
    return (*fields, ("norm", "none" if module.norm is Identity else "batch"))


class SpectrumEstimator:
    """`spectra.estimate` on blocks, compiled once per `block_settings` and input shape, and reused
    across nets (blocks of plain20 and plain56 with the same filters and stride share a program)."""

    def __init__(self, iterations: int, probes: int, train: bool):
        self.iterations, self.probes, self.train = iterations, probes, train
        self._compiled: dict[tuple, Callable] = {}

    def __call__(self, module: nn.Module, variables: Any, x: jax.Array, key: jax.Array) -> spectra.Spectrum:
        signature = (type(module), block_settings(module), x.shape, str(x.dtype))
        if signature not in self._compiled:

            def run(variables: Any, x: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
                f = block_function(module, variables, self.train)
                return spectra.estimate(f, x, key, iterations=self.iterations, probes=self.probes)

            self._compiled[signature] = jax.jit(run)
        out = jax.eval_shape(block_function(module, variables, self.train), x)
        return spectra.read_spectrum(self._compiled[signature](variables, x, key), x.size, out.size)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def boundary_gradient_norms(
    variables: Any, images: jax.Array, labels: jax.Array, *, model: nn.Module, train: bool
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """(loss, {block: |dL/d its input|}, |dL/d the last block's output|): one `jax.grad`, compiled
    once per model."""
    inputs, last_output = jax.eval_shape(
        functools.partial(block_inputs, model=model, train=train), variables, images
    )
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    # Forward order from the modules: a jit output's dict is sorted, and layer3_17 sorts before layer3_9.
    last = list(block_modules(model, variables, images, train))[-1]

    def loss_fn(at_inputs: dict[str, jax.Array], at_output: dict[str, jax.Array]) -> jax.Array:
        return gradient_norms.batch_loss(model, variables, images, labels, at_inputs, at_output, train)[0]

    loss, (g_in, g_out) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        zeros(inputs), {last: zeros(last_output)}
    )
    norms = {name: gradient_norms.robust_norm(g) for name, g in g_in.items()}
    return loss, norms, gradient_norms.robust_norm(g_out[last])


def network_spectra(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    estimator: SpectrumEstimator,
    key: jax.Array,
) -> dict[str, Any]:
    """Every block's spectra (whole map and branch), the gradient at every block boundary, and the
    depth product, for normalised `images`."""
    train = estimator.train
    modules = block_modules(model, variables, images, train)
    inputs, _ = block_inputs(variables, images, model=model, train=train)
    measured = jax.device_get(boundary_gradient_norms(variables, images, labels, model=model, train=train))
    loss, grad_in = float(measured[0]), [float(measured[1][name]) for name in modules]
    grad_out = [*grad_in[1:], float(measured[2])]
    rows = []
    for i, (name, module) in enumerate(modules.items()):
        x = inputs[name]
        own = {kind: tree[name] for kind, tree in variables.items() if name in tree}
        total = estimator(module, own, x, jax.random.fold_in(key, 2 * i))
        branch = estimator(module.clone(branch_only=True), own, x, jax.random.fold_in(key, 2 * i + 1))
        rows.append(
            {
                "name": name,
                "strides": module.strides,
                "input_shape": list(x.shape[1:]),
                "total": total.to_dict(),
                "branch": branch.to_dict(),
                "grad_in": grad_in[i],
                "grad_out": grad_out[i],
                "gain": _ratio(grad_in[i], grad_out[i]),
            }
        )
    return {"loss": loss, "blocks": rows, "product": depth_product(rows)}


def depth_product(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The product of the blocks' top (a bound) and RMS singular values against the measured gain
    |dL/dx_0| / |dL/dx_L| of the stack, in log10; `gap_by_block` is each block's share of the bound's
    slack, log10(sigma_top / its own measured gain), never negative up to estimation error. A
    non-finite value (a vanished gradient) is NaN, never an error."""
    log = lambda v: math.log10(v) if v > 0 and math.isfinite(v) else math.nan
    measured = log(_ratio(blocks[0]["grad_in"], blocks[-1]["grad_out"]))
    bound = sum(log(b["total"]["top"]) for b in blocks)
    rms = sum(log(b["total"]["rms"]) for b in blocks)
    gaps = [log(b["total"]["top"]) - log(b["gain"]) for b in blocks]
    strided = [g for g, b in zip(gaps, blocks, strict=True) if b["strides"] > 1]
    return {
        "log10_measured_gain": measured,
        "log10_top_product": bound,
        "log10_rms_product": rms,
        "bound_over_measured": 10 ** (bound - measured) if math.isfinite(bound - measured) else math.nan,
        "rms_over_measured": 10 ** (rms - measured) if math.isfinite(rms - measured) else math.nan,
        # geometric means over the blocks: what one block typically does to the gradient
        "per_block_gain": 10 ** (measured / len(blocks)),
        "per_block_top": 10 ** (bound / len(blocks)),
        "per_block_rms": 10 ** (rms / len(blocks)),
        "gap_by_block": gaps,
        "mean_gap_per_block": float(np.mean(gaps)) if gaps else math.nan,
        "gap_in_strided_blocks": float(np.sum(strided)) if strided else 0.0,
        "worst_block": blocks[int(np.nanargmax(gaps))]["name"] if gaps and np.isfinite(gaps).any() else None,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf
