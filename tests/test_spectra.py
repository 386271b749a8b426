"""The singular-value estimator (`resnet_jax.spectra`) against exact Jacobians of small float64
blocks, and the blocks' `branch_only` mode that the Jacobian study measures."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models, spectra

F64 = jnp.float64


def float64_block(block_cls, filters, strides=1, shortcut="pad", norm=True, **kw):
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=F64, param_dtype=F64)
    batch_norm = functools.partial(nn.BatchNorm, use_running_average=False, dtype=F64, param_dtype=F64)
    return block_cls(
        filters=filters,
        strides=strides,
        conv=conv,
        norm=batch_norm if norm else models.Identity,
        act=nn.relu,
        shortcut=shortcut,
        zero_init_residual=False,
        **kw,
    )


def apply_fn(block, variables):
    return lambda x: block.apply(variables, x, mutable=["batch_stats"])[0]


def exact_singular_values(f, x):
    jacobian = jax.jacfwd(f)(x).reshape(-1, x.size)
    values = np.linalg.svd(np.asarray(jacobian), compute_uv=False)
    return values[: min(jacobian.shape)]


@pytest.mark.parametrize(
    ("block_cls", "strides", "filters"),
    [(models.BasicBlock, 1, 3), (models.BasicBlock, 2, 6), (models.PreActBasicBlock, 1, 3)],
)
def test_estimates_match_the_exact_jacobian_of_a_float64_block(block_cls, strides, filters):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), F64)
        block = float64_block(block_cls, filters, strides)
        f = apply_fn(block, block.init(jax.random.key(1), x))
        exact = exact_singular_values(f, x)  # 96 or 48 values
        few = spectra.spectrum(f, x, jax.random.key(2), iterations=24, probes=4)
        assert (
            few.iterations == 24 and few.dim_in == 96 and few.dim_out == x.size // strides**2 * filters // 3
        )
        np.testing.assert_allclose(few.top, exact[0], rtol=1e-3)
        assert few.bottom >= exact[-1] - 1e-9  # a Ritz value: never below the smallest
        full = spectra.spectrum(f, x, jax.random.key(2), iterations=10_000, probes=4000)
        assert full.iterations == exact.size  # capped at the dimension: the whole spectrum
        np.testing.assert_allclose(full.top, exact[0], rtol=1e-9)
        np.testing.assert_allclose(full.bottom, exact[-1], atol=1e-6)
        np.testing.assert_allclose(full.rms, np.sqrt(np.mean(exact**2)), rtol=0.05)


def test_an_identity_block_has_every_singular_value_one_and_its_branch_zero():
    # A pre-activation block with zero-initialised residual branch passes its input through.
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
    norm = functools.partial(nn.BatchNorm, use_running_average=False)
    block = models.PreActBasicBlock(filters=4, conv=conv, norm=norm, act=nn.relu, shortcut="pad")
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 4))
    variables = block.init(jax.random.key(1), x)
    total = spectra.spectrum(apply_fn(block, variables), x, jax.random.key(2), iterations=8)
    assert (total.top, total.bottom, total.rms) == pytest.approx((1.0, 1.0, 1.0), abs=1e-6)
    branch = spectra.spectrum(apply_fn(block.clone(branch_only=True), variables), x, jax.random.key(2))
    assert branch.top == 0.0 and branch.rms == 0.0


def test_scaling_a_plain_blocks_kernels_scales_its_singular_values():
    with jax.enable_x64(True):
        block = float64_block(models.BasicBlock, 3, shortcut=None, norm=False)  # relu(conv(relu(conv x)))
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), F64)
        variables = block.init(jax.random.key(1), x)
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, v: v * {"conv1": 2.0, "conv2": 3.0}[path[1].key] if path[-1].key == "kernel" else v,
            variables,
        )
        base, times_six = (
            spectra.spectrum(apply_fn(block, v), x, jax.random.key(2), iterations=24, probes=64)
            for v in (variables, scaled)
        )
        np.testing.assert_allclose(times_six.top, 6 * base.top, rtol=1e-3)  # relu is positively homogeneous
        np.testing.assert_allclose(times_six.rms, 6 * base.rms, rtol=1e-9)  # same probes
        np.testing.assert_allclose(
            base.top, exact_singular_values(apply_fn(block, variables), x)[0], rtol=1e-3
        )


@pytest.mark.parametrize("block_cls", [models.BasicBlock, models.PreActBasicBlock])
def test_branch_only_is_the_branch_that_the_block_adds_to_its_shortcut(block_cls):
    with jax.enable_x64(True):
        block = float64_block(block_cls, 6, strides=2)
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), F64)
        variables = block.init(jax.random.key(1), x)
        y, branch = apply_fn(block, variables)(x), apply_fn(block.clone(branch_only=True), variables)(x)
        skip = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (1, 2)))  # option A
        expected = skip + branch if block_cls is models.PreActBasicBlock else nn.relu(skip + branch)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        assert not np.allclose(y, branch)
