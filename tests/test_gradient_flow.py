"""The autodiff gradients behind the gradient-flow study, checked against explicit calculus.

float64 tests run inside `jax.enable_x64(True)`, so the rest of the suite keeps float32.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from resnet_jax import gradient_flow, gradient_norms, models
from tests.conftest import run_script

F64 = jnp.float64


def float64_block(block_cls, filters, shortcut):
    """A block with float64 conv and train-mode BatchNorm injected, as `ResNet` injects its own."""
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=F64, param_dtype=F64)
    norm = functools.partial(nn.BatchNorm, use_running_average=False, dtype=F64, param_dtype=F64)
    return block_cls(filters=filters, conv=conv, norm=norm, act=nn.relu, shortcut=shortcut)


def random_params(module, x, key, spread=0.3):
    """Random float64 parameters of `module`'s shapes (no init to compile): He-scaled kernels,
    BatchNorm scales near 1, small biases."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract["params"])
    keys = jax.random.split(key, len(leaves))
    values = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        noise = jax.random.normal(k, leaf.shape, F64)
        kind = path[-1].key
        if kind == "kernel":
            values.append(noise * np.sqrt(2.0 / np.prod(leaf.shape[:-1])))
        else:
            values.append((1.0 if kind == "scale" else 0.0) + spread * noise)
    return jax.tree.unflatten(treedef, values)


def test_residual_block_vjp_is_g_times_identity_plus_branch_jacobian():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), F64)
        block = float64_block(models.PreActBasicBlock, 3, shortcut="pad")
        branch = block.clone(shortcut=None)  # the same layers without the skip: y = F(x)
        params = random_params(block, x, jax.random.key(1))
        assert jax.tree.structure(params) == jax.tree.structure(random_params(branch, x, jax.random.key(1)))
        n = x.size

        @jax.jit
        def measure(x, g):
            def apply(module):
                return lambda x: module.apply({"params": params}, x, mutable=["batch_stats"])[0]

            y, vjp = jax.vjp(apply(block), x)
            (autodiff,) = vjp(g)
            jacobian = jax.jacfwd(apply(branch))(x).reshape(n, n)  # dF_i/dx_j, BN's batch coupling included
            return y, apply(branch)(x), autodiff, jacobian

        g = jax.random.normal(jax.random.key(3), x.shape, F64)
        y, branch_out, autodiff, jacobian = measure(x, g)
        np.testing.assert_allclose(y, x + branch_out, rtol=1e-12, atol=1e-12)
        explicit = g.reshape(n) @ (jnp.eye(n, dtype=F64) + jacobian)
        assert autodiff.dtype == F64
        np.testing.assert_allclose(autodiff.reshape(n), explicit, rtol=1e-10, atol=1e-12)
        # The identity term matters here: the branch alone passes back something else.
        assert not np.allclose(g.reshape(n) @ jacobian, explicit, atol=1e-3)


def test_grad_of_a_small_resnet_matches_central_finite_differences():
    with jax.enable_x64(True):
        module = models.create("resnet20", 10, dtype=F64, zero_init_residual=False)
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1), F64)
        labels = jnp.array([0, 3, 7, 9])
        flat, unravel = ravel_pytree(random_params(module, x, jax.random.key(1), spread=0.1))

        @jax.jit
        def loss_and_grad(theta):
            loss = lambda theta: gradient_norms.batch_loss(module, {"params": unravel(theta)}, x, labels)[0]
            return jax.value_and_grad(loss)(theta)

        loss = lambda theta: loss_and_grad(theta)[0]
        value, grad = loss_and_grad(flat)
        assert value.dtype == grad.dtype == F64 and np.isfinite(value)
        eps = 1e-5
        for i in np.random.default_rng(0).choice(flat.size, 12, replace=False):
            step = jnp.zeros_like(flat).at[i].set(eps)
            numeric = (loss(flat + step) - loss(flat - step)) / (2 * eps)
            np.testing.assert_allclose(grad[i], numeric, rtol=1e-6, atol=1e-9, err_msg=f"parameter {i}")
        # And along one random direction through all parameters at once.
        direction = jax.random.normal(jax.random.key(3), flat.shape, F64)
        direction /= jnp.linalg.norm(direction)
        numeric = (loss(flat + eps * direction) - loss(flat - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(grad @ direction, numeric, rtol=1e-6)


def test_sigmoid_without_norm_the_plain_net_starves_the_input_of_gradient():
    """Depth 20, sigmoid, no normalisation, at initialisation, 16x16 px: |dL/dx| at the input image.

    Measured here (seeds 0-2 of the init, random N(0,1) images):
      plain / v1 residual           2.0e-4 .. 3.3e-4
      v1 residual / pre-activation  2.0e-6 .. 3.1e-6   (sigma' after every sum still shrinks it)
      plain / pre-activation        6.2e-10 .. 6.7e-10
      first/last conv grad ratio    plain ~2.5e-11, pre-activation ~4e-2
    The thresholds keep a margin of 30x or more over every measured value.
    """
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    labels = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    profiles = {}
    for family in gradient_norms.FAMILIES:
        module = models.create(f"{family}20", 10, norm="none", activation="sigmoid", zero_init_residual=False)
        variables = module.init(jax.random.key(0), x[:1])
        profiles[family] = gradient_norms.profiler(module, variables, x, labels)(variables)
    plain, v1, preact = (profiles[f]["input_grad_norm"] for f in gradient_norms.FAMILIES)
    assert all(np.isfinite([plain, v1, preact])) and plain > 0
    assert plain / preact < 1e-6  # more than a million times less
    assert plain / v1 < 1e-2
    assert v1 / preact < 1e-4
    assert profiles["plain"]["first_last_ratio"] < 1e-8 < 1e-3 < profiles["preact_resnet"]["first_last_ratio"]
    assert len(profiles["plain"]["layers"]) == 20 and len(profiles["plain"]["block_inputs"]) == 9


def test_preact_nets_start_as_identity_stacks_with_zero_init_and_keep_the_parameter_count():
    module = models.create("preact_resnet20", 10)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = module.init(jax.random.key(1), x)
    assert "bn1" not in variables["params"] and "final_bn" in variables["params"]
    _, state = module.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    stem = state["intermediates"]["conv1"]["__call__"][0]
    out = state["intermediates"]["layer1_2"]["__call__"][0]
    np.testing.assert_array_equal(out, stem)  # zeroed last convs: stage 1 passes the stem through
    # The stem BN (16 channels) moves to the end (64), and each stage's first bn1 normalises the
    # narrower input: -32 -32 -64 +128, the same count as the v1 net.
    assert models.count_params(module, 32) == models.count_params(models.create("resnet20", 10), 32)


def test_summary_statements_follow_the_numbers():
    def run(family, depth, ratio, final):
        profile = {"input_grad_norm": 1.0, "first_last_ratio": ratio}
        return dict(
            model=f"{family}{depth}",
            family=family,
            depth=depth,
            norm="batch",
            activation="relu",
            init=profile,
            trained=profile,
            final_train_loss=final,
        )

    runs = [
        run("plain", 20, 2.0, 0.10),
        run("plain", 56, 1e3, 0.40),
        run("preact_resnet", 20, 1.0, 0.10),
        run("preact_resnet", 56, 1.0, 0.08),
    ]
    summary = gradient_flow.summarize(runs)
    plain56 = next(line for line in summary["vanishing"] if line.startswith("plain56"))
    assert "explode" in plain56 and "1.00e+03" in plain56
    verdicts = {d["family"]: d["deeper_trains_worse"] for d in summary["degradation"]}
    assert verdicts == {"plain": True, "preact_resnet": False}
    assert "| plain56 | batch | relu |" in summary["table"]


@pytest.mark.slow
def test_cli_writes_the_json_and_the_plots(tmp_path):
    out = tmp_path / "flow"
    args = ["--depths", "20", "--families", "plain,preact_resnet", "--norm", "batch", "--steps", "3"]
    result = run_script(
        "-m", "resnet_jax.gradient_flow", *args, "--image_size", "8", "--batch_size", "16", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "gradient_flow.json").read_text())
    assert [r["model"] for r in document["runs"]] == ["plain20", "preact_resnet20"]
    for r in document["runs"]:
        assert len(r["train_loss"]) == 3 and all(np.isfinite(r["train_loss"]))
        for when in ("init", "trained"):
            layers = r[when]["layers"]
            assert len(layers) == 20 and layers[0]["name"] == "conv1" and layers[-1]["name"] == "fc"
            assert len(r[when]["block_inputs"]) == 9
            assert all(entry["grad_norm"] > 0 for entry in layers)
            assert r[when]["input_grad_norm"] > 0
    assert document["runs"][0]["init"]["layers"][1]["name"] == "layer1_0/conv1"
    assert "plain20 (norm=batch, relu)" in (out / "summary.md").read_text()
    assert "plain20" in result.stdout
    for name in ("gradient_norms.png", "block_input_gradients.png", "training_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
