"""Per-block spectra of whole networks (`resnet_jax.block_spectra`): the measured gradient at every
block boundary against the blocks' singular values, the depth product, and the plots and summary
when a gradient underflows."""

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import block_spectra, gradient_norms, jacobians, models, study_plots


def small_net(name, **kw):
    model = models.create(name, 10, zero_init_residual=False, **kw)
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    labels = jax.random.randint(jax.random.key(1), (8,), 0, 10)
    return model, model.init(jax.random.key(2), x), x, labels


@functools.cache
def measured_net(name, mode="train"):
    model, variables, x, labels = small_net(name)
    if mode == "eval":  # running statistics that are not the identity
        stats = jax.tree.map(
            lambda v: v + 0.5 * jax.random.uniform(jax.random.key(4), v.shape), variables["batch_stats"]
        )
        variables = {**variables, "batch_stats": stats}
    estimator = block_spectra.SpectrumEstimator(iterations=16, probes=2, train=mode == "train")
    return block_spectra.network_spectra(model, variables, x, labels, estimator, jax.random.key(3))


@pytest.mark.parametrize(
    ("name", "mode"), [("plain20", "train"), ("resnet20", "train"), ("preact_resnet20", "eval")]
)
def test_every_measured_block_gain_stays_under_its_top_singular_value(name, mode):
    result = measured_net(name, mode)
    blocks = result["blocks"]
    assert [b["name"] for b in blocks] == [f"layer{s}_{i}" for s in (1, 2, 3) for i in range(3)]
    assert [b["strides"] for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    for b in blocks:
        assert 0 < b["gain"] <= b["total"]["top"] * (1 + 1e-3), b["name"]
        assert b["total"]["bottom"] <= b["total"]["rms"] <= b["total"]["top"]
    for a, b in zip(blocks, blocks[1:], strict=False):
        assert a["grad_out"] == b["grad_in"]  # one boundary, one gradient
    product = result["product"]
    assert product["log10_top_product"] >= product["log10_measured_gain"]
    assert product["bound_over_measured"] >= 1.0
    gaps = product["gap_by_block"]
    np.testing.assert_allclose(
        sum(gaps), product["log10_top_product"] - product["log10_measured_gain"], rtol=1e-6
    )


def test_a_gradient_that_underflowed_to_zero_reads_n_a_in_the_summary_and_leaves_a_gap_in_the_plots(tmp_path):
    result = copy.deepcopy(measured_net("plain20", "train"))
    result["blocks"][0].update(grad_in=0.0, gain=0.0)  # sigmoid plain110's |dL/dx_0| in float32
    result["product"] = block_spectra.depth_product(result["blocks"])
    assert math.isnan(result["product"]["log10_measured_gain"])
    run = dict(model="plain20", family="plain", depth=20, norm="batch", activation="relu")
    run.update(init=result, trained=None, training=None)
    estimator = {"mode": "train", "probe_size": 8, "iterations": 16, "probes": 2}
    document = {"dataset": {"name": "random"}, "estimator": estimator, "runs": [run]}
    document["summary"] = jacobians.summarize([run])
    text = jacobians.summary_text(document)
    assert "plain20 (norm=batch, relu, init): measured |dL/dx_0| / |dL/dx_L| = n/a (n/a per block)" in text
    assert "bound / measured n/a" in text and "Degradation" not in text
    paths = study_plots.plot_jacobians(document, str(tmp_path / "not" / "yet"))  # the folder is created
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "jacobian_spectra.png",
        "branch_spectra.png",
        "depth_product.png",
    ]


def test_sigmoid_without_norm_plain_blocks_shrink_while_pre_activation_blocks_stay_near_one():
    tops = {}
    for family in ("plain", "preact_resnet"):
        model, variables, x, labels = small_net(f"{family}20", norm="none", activation="sigmoid")
        estimator = block_spectra.SpectrumEstimator(iterations=12, probes=2, train=True)
        result = block_spectra.network_spectra(model, variables, x, labels, estimator, jax.random.key(3))
        tops[family] = np.array([b["total"]["top"] for b in result["blocks"]])
    # sigmoid' <= 1/4 after every plain block; the pre-activation block adds its branch to x itself.
    assert tops["plain"].max() < 0.5 < 0.9 < tops["preact_resnet"].min()


def test_the_last_blocks_gradient_is_taken_at_the_last_block_of_a_net_with_more_than_ten_per_stage():
    # resnet110 has 18 blocks per stage: sorted by name, layer3_17 would come before layer3_9.
    model = models.create("resnet110", 10, zero_init_residual=False)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    labels = jnp.array([1, 7])
    variables = model.init(jax.random.key(1), x)
    names = list(block_spectra.block_modules(model, variables, x, True))
    assert names[-3:] == ["layer3_15", "layer3_16", "layer3_17"] and len(names) == 54
    _, inputs, last = block_spectra.boundary_gradient_norms(variables, x, labels, model=model, train=True)
    _, last_output = block_spectra.block_inputs(variables, x, model=model, train=True)

    def loss(at_output):
        return gradient_norms.batch_loss(
            model, variables, x, labels, output_perturbations={"layer3_17": at_output}
        )[0]

    expected = jnp.linalg.norm(jax.grad(loss)(jnp.zeros_like(last_output)))
    np.testing.assert_allclose(last, expected, rtol=1e-5)
    assert set(inputs) == set(names)
