import contextlib
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resnet_jax import costs, layers, models, norms, registry

# torchvision's published counts (1000 classes, 224 px), and He et al.'s CIFAR nets (10 classes).
PUBLISHED = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    # timm's
    "resnet50d": 25_576_264,
    "seresnet50": 28_088_024,
}
# He et al.'s CIFAR nets and Zagoruyko & Komodakis's WRN-d-k (their Table 1 and text).
CIFAR_APPROX = {
    "resnet20": 0.27e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "wrn28_10": 36.5e6,
    "wrn16_8": 11.0e6,
}


@contextlib.contextmanager
def float64_on_the_cpu():
    """float64 on JAX's CPU device, for the tests that compare two formulations to ~1e-12.

    The suite may run on an accelerator host (the device is then the default): TPUs have no
    native float64, and float32 convolutions there (bfloat16 passes) and on NVIDIA GPUs (TF32) are
    not float32-exact. These tests check mathematics, not a backend, so they pin the CPU.
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS names only the accelerator
        pytest.skip("needs JAX's CPU backend (JAX_PLATFORMS leaves it out)")
    with jax.enable_x64(True), jax.default_device(cpu):
        yield


def shapes(name, num_classes, size, channels=3, **options):
    module = models.create(name, num_classes, **options)
    x = jnp.zeros((2, size, size, channels))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    return variables, out


def test_every_model_name_is_written_out_where_it_is_defined():
    """`grep '"resnet50d"' resnet_jax/registry.py` finds the definition (no names made in loops)."""
    source = Path(registry.__file__).read_text()
    assert [name for name in models.names() if f'    "{name}": _' not in source] == []


@pytest.mark.parametrize("name", models.names())
def test_every_registry_name_builds_with_the_right_output_shape_and_parameter_count(name):
    # One trace per name (tracing is the cost): shapes at a small size, where parameter counts are
    # the same as at 224 px (ImageNet nets, 1000 classes) or 32 px (CIFAR nets, 10 classes).
    size, classes = (32, 10) if models.is_cifar(name) else (64, 1000)
    variables, out = shapes(name, classes, size)
    assert out.shape == (2, classes) and out.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    count = sum(x.size for x in jax.tree.leaves(variables["params"]))
    if name in PUBLISHED:
        assert count == PUBLISHED[name]
    if name in CIFAR_APPROX:
        assert abs(count - CIFAR_APPROX[name]) / CIFAR_APPROX[name] < 0.03, count


def test_published_counts_are_checked_and_count_params_agrees():
    assert set(PUBLISHED) | set(CIFAR_APPROX) <= set(models.names())
    assert models.count_params(models.create("resnet18", 1000), 224) == PUBLISHED["resnet18"]


def test_plain_nets_have_the_same_parameters_as_their_residual_twins():
    # Option-A shortcuts (CIFAR) are parameter-free; projection shortcuts (ImageNet) are not.
    assert models.count_params(models.create("plain56", 10), 32) == models.count_params(
        models.create("resnet56", 10), 32
    )
    assert models.count_params(models.create("plain18", 10), 64) < models.count_params(
        models.create("resnet18", 10), 64
    )


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        models.create("resnet19", 10)
    message = str(err.value)
    assert "'resnet19'" in message and "resnet20" in message and "plain56" in message


@pytest.mark.parametrize("option,value", [("dtype", "float64"), ("norm", "layer"), ("activation", "gelu")])
def test_bad_options_are_rejected(option, value):
    with pytest.raises(ValueError, match=f"{option}='{value}'"):
        models.create("resnet20", 10, **{option: value})


def init(name, zero_init_residual=True, size=16, **options):
    module = models.create(name, 10, zero_init_residual=zero_init_residual, **options)
    return module, module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_last_batchnorm_of_each_residual_branch_starts_at_zero():
    _, variables = init("resnet20")
    params = variables["params"]
    blocks = [k for k in params if k.startswith("layer")]
    assert len(blocks) == 9
    for block in blocks:
        np.testing.assert_array_equal(params[block]["bn2"]["scale"], 0.0)
        np.testing.assert_array_equal(params[block]["bn1"]["scale"], 1.0)
    _, variables = init("resnet20", zero_init_residual=False)
    np.testing.assert_array_equal(variables["params"]["layer1_0"]["bn2"]["scale"], 1.0)


def test_plain_nets_keep_the_ordinary_initialisation():
    _, variables = init("plain20")
    for block in (k for k in variables["params"] if k.startswith("layer")):
        np.testing.assert_array_equal(variables["params"][block]["bn2"]["scale"], 1.0)


def test_conv_init_is_he_fan_out_normal():
    _, variables = init("resnet56")
    kernel = variables["params"]["layer3_5"]["conv1"]["kernel"]  # 3x3x64x64
    expected_std = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(float(jnp.std(kernel)) / expected_std - 1) < 0.05


def test_compute_dtype_does_not_change_the_parameter_tree():
    _, f32 = init("resnet20")
    module, bf16 = init("resnet20", dtype="bfloat16")
    assert jax.tree.map(lambda x: (x.shape, x.dtype), f32) == jax.tree.map(lambda x: (x.shape, x.dtype), bf16)
    logits = module.apply(bf16, jnp.ones((2, 16, 16, 3)), train=False)
    assert logits.dtype == jnp.float32


def test_eval_mode_is_deterministic_and_uses_running_statistics():
    module, variables = init("resnet20", zero_init_residual=False)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    a = module.apply(variables, x, train=False)
    b = module.apply(variables, x, train=False)
    np.testing.assert_array_equal(a, b)
    # An example's eval output does not depend on the rest of the batch (no batch statistics). At
    # float32 precision (on TPUs the default is bfloat16 passes, on NVIDIA GPUs TF32), and with room
    # for a summation order that changes with the batch size there: batch statistics would be O(1) off.
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(
            module.apply(variables, x[:1], train=False),
            module.apply(variables, x, train=False)[:1],
            rtol=1e-4,
            atol=1e-4,
        )
    # In train mode it does, and the running statistics move.
    train_out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(
        train_out[:1], module.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0]
    )
    before = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], before)


def test_norm_none_and_other_activations_build():
    module, variables = init("plain20", norm="none", activation="tanh")
    assert "batch_stats" not in variables or not variables["batch_stats"]
    out = module.apply(variables, jnp.ones((1, 16, 16, 3)))
    assert np.isfinite(np.asarray(out)).all()


def test_imagenet_stem_pads_like_pytorch():
    # 7x7/2 conv with 3 pixels each side and 3x3/2 max-pool with 1: 224 -> 112 -> 56 (and 225 -> 113 -> 57).
    module = models.create("resnet18", 10)
    for size, expected in ((224, 56), (225, 57)):
        x = jnp.zeros((1, size, size, 3))
        variables = jax.eval_shape(module.init, jax.random.key(0), x)
        mods = jax.eval_shape(
            lambda v, x=x: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"])[1],
            variables,
        )
        assert mods["intermediates"]["layer1_0"]["__call__"][0].shape[1] == expected


def block_output_sizes(module, size):  # built with fold_bn=False: a folded conv3 outputs no activation
    """Spatial size of every conv output of block layer2_0 (shapes only)."""
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    inter = jax.eval_shape(
        lambda v: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"])[1], variables
    )["intermediates"]["layer2_0"]
    return {k: v["__call__"][0].shape[1] for k, v in inter.items() if k.startswith("conv")}


def test_v1_puts_the_stride_on_the_first_1x1_and_v15_on_the_3x3():
    assert block_output_sizes(models.create("resnet50", 10, fold_bn=False), 64) == {
        "conv1": 16,
        "conv2": 8,
        "conv3": 8,
    }
    assert block_output_sizes(models.create("resnet50_v1", 10, fold_bn=False), 64) == {
        "conv1": 8,
        "conv2": 8,
        "conv3": 8,
    }
    assert block_output_sizes(models.create("resnet50", 10, stride_on="1x1", fold_bn=False), 64)["conv1"] == 8


def test_squeeze_excitation_is_an_option_of_any_block():
    for name in ("resnet20", "preact_resnet18", "resnext50_32x4d"):
        variables, _ = shapes(name, 10, 32, se_ratio=0.25)
        blocks = [v for k, v in variables["params"].items() if k.startswith("layer")]
        assert all(set(block["se"]) == {"fc1", "fc2"} for block in blocks), name
    plain, _ = shapes("resnet18", 10, 32)
    assert "se" not in plain["params"]["layer1_0"]


def test_resnet_d_has_a_deep_stem_and_average_pool_shortcuts():
    variables, _ = shapes("resnet50d", 10, 64)
    params = variables["params"]
    assert params["stem_conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert params["conv1"]["kernel"].shape == (3, 3, 32, 64)
    # Stride 1 in the 1x1 projection: the 2x2 average pool before it does the downsampling.
    assert params["layer2_0"]["shortcut"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)


def rates_and_outputs(drop_path_rate=0.0, dropout_rate=0.0, train=False, seed=0, x=None):
    module = models.create("resnet20", 10, drop_path_rate=drop_path_rate, dropout_rate=dropout_rate)
    x = jnp.ones((8, 8, 8, 3)) if x is None else x
    variables = models.create("resnet20", 10, zero_init_residual=False).init(jax.random.key(0), x)
    rngs = {"dropout": jax.random.key(seed)}
    out = module.apply(variables, x, train=train, rngs=rngs, mutable=["batch_stats"])[0]
    return module, variables, out


def test_stochastic_depth_and_dropout_act_in_training_only():
    _, variables, base = rates_and_outputs()
    module, regularised, eval_out = rates_and_outputs(0.5, 0.5)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, regularised)  # same parameters
    np.testing.assert_allclose(eval_out, base, rtol=1e-6, atol=1e-6)
    a, b = rates_and_outputs(train=True, seed=1)[2], rates_and_outputs(train=True, seed=2)[2]
    np.testing.assert_array_equal(a, b)  # rate 0: no randomness in training
    c, d = (
        rates_and_outputs(0.5, 0.5, train=True, seed=1)[2],
        rates_and_outputs(0.5, 0.5, train=True, seed=2)[2],
    )
    assert not np.allclose(c, d)


def test_drop_path_rate_rises_linearly_to_the_last_block_which_drops_that_share():
    module = models.create("resnet20", 10, drop_path_rate=0.3)
    rates = []

    def record(call, args, kwargs, context):
        if isinstance(context.module, models.BasicBlock) and context.method_name == "__call__":
            rates.append(context.module.drop_path)
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.3, 9), atol=1e-7)
    x = jnp.ones((20_000, 1, 1, 1))
    y = layers.DropPath(0.3, deterministic=False).apply({}, x, rngs={"dropout": jax.random.key(0)})
    dropped = float((y == 0).mean())
    assert abs(dropped - 0.3) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)  # survivors scaled by 1/keep


def test_frozen_norm_uses_and_keeps_the_running_statistics_in_training():
    module, variables = init("resnet20", zero_init_residual=False)
    frozen = models.create("resnet20", 10, zero_init_residual=False, frozen_norm=True)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    out, updates = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, module.apply(variables, x, train=False), rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_average_pool_shortcut_pools_odd_sizes_like_pytorch_ceil_mode():
    x = jnp.arange(25.0).reshape(1, 5, 5, 1)
    y = layers.avg_pool_ceil(x, 2)[0, :, :, 0]
    assert y.shape == (3, 3)
    assert float(y[0, 0]) == (0 + 1 + 5 + 6) / 4 and float(y[2, 2]) == 24.0  # edge: valid pixels only
    assert float(y[0, 2]) == (4 + 9) / 2


def test_model_table_prints_params_and_gflops(capsys):
    assert models.main(["--names", "resnet20", "wrn16_4", "--no_flops"]) == 0
    assert models.main(["--names", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "wrn16_4" in out and "2.75M" in out
    row = [line for line in out.splitlines() if line.startswith("resnet20")][-1].split()
    assert row[2] == "0.27M" and 0.03 < float(row[3]) < 0.1  # ~41M multiply-adds at 32 px
    assert models.main(["--names", "resnet19"]) == 2


@pytest.mark.parametrize("analysis", [None, {}, {"flops": None}, [None], [], {"flops": -1.0}])
def test_model_table_says_unknown_where_xla_counts_no_flops(analysis, monkeypatch, capsys):
    # XLA's cost analysis may return None, a dict without "flops", or None for "flops" (and the CPU
    # model that stands in for plugin backends may be unreachable): the FLOPs are unknown, not a crash.
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: analysis)
    monkeypatch.setattr(
        costs, "cpu_cost_analysis", lambda lowered: analysis if isinstance(analysis, dict) else None
    )
    assert costs.forward_flops(models.create("resnet20", 10), 8) is None
    assert models.main(["--names", "resnet20", "--cifar_image_size", "8"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resnet20")][-1]
    assert row.split() == ["resnet20", "8", "0.27M", "unknown"]
    assert costs.gflops_column(4.1e9) == "   4.100" and costs.gflops_column(None) == "unknown"


def conv_then_batchnorm(x, kernel, scale, bias, train=True):
    """The textbook pair FoldedBatchNorm replaces: a 1x1 nn.Conv, then nn.BatchNorm."""
    features = kernel.shape[-1]
    conv = nn.Conv(features, (1, 1), use_bias=False, dtype=x.dtype, param_dtype=x.dtype)
    norm = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=x.dtype, param_dtype=x.dtype
    )
    y = conv.apply({"params": {"kernel": kernel}}, x)
    stats = {"mean": jnp.full((features,), 0.5, x.dtype), "var": jnp.full((features,), 2.0, x.dtype)}
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
    return norm.apply(variables, y, mutable=["batch_stats"]) if train else (norm.apply(variables, y), None)


def folded(x, kernel, scale, bias, train=True):
    module = norms.FoldedBatchNorm(use_running_average=not train, dtype=x.dtype)
    stats = {"mean": jnp.full(scale.shape, 0.5, x.dtype), "var": jnp.full(scale.shape, 2.0, x.dtype)}
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
    if train:
        return module.apply(variables, x, kernel, mutable=["batch_stats"])
    return module.apply(variables, x, kernel), None


def conv_norm_inputs(dtype, offset=0.0, key=0):
    """ReLU-like inputs (non-negative, mean about one std), He-scaled kernel, scales around 1."""
    k = jax.random.split(jax.random.key(key), 4)
    x = jnp.maximum(jax.random.normal(k[0], (6, 5, 5, 8), dtype), 0) + offset
    kernel = jax.random.normal(k[1], (1, 1, 8, 16), dtype) * np.sqrt(2 / 8)
    scale = 1 + 0.3 * jax.random.normal(k[2], (16,), dtype)
    bias = 0.1 * jax.random.normal(k[3], (16,), dtype)
    return x, kernel, scale, bias


@pytest.mark.parametrize("train", [True, False])
def test_folded_batchnorm_is_conv_then_batchnorm_with_the_same_gradients(train):
    # float64, so any difference is mathematics, not rounding: outputs, the running statistics it
    # writes, and autodiff's gradients for the input, kernel, scale and bias all agree.
    with float64_on_the_cpu():
        inputs = conv_norm_inputs(jnp.float64)
        for f in (folded, conv_then_batchnorm):
            (y, stats) = f(*inputs, train=train)
            if f is folded:
                y_folded, stats_folded = y, stats
        np.testing.assert_allclose(y_folded, y, rtol=0, atol=1e-12)
        if train:
            for name in ("mean", "var"):
                np.testing.assert_allclose(
                    stats_folded["batch_stats"][name], stats["batch_stats"][name], atol=1e-12
                )
        weights = jax.random.normal(jax.random.key(9), y.shape, jnp.float64)  # a loss that uses every output

        def loss(f):
            return lambda *args: jnp.sum(weights * jnp.tanh(f(*args, train=train)[0]))

        ours = jax.grad(loss(folded), argnums=(0, 1, 2, 3))(*inputs)
        theirs = jax.grad(loss(conv_then_batchnorm), argnums=(0, 1, 2, 3))(*inputs)
        for a, b in zip(ours, theirs, strict=True):
            assert float(jnp.max(jnp.abs(b))) > 1e-3  # every gradient is non-trivial
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_folded_batchnorm_is_as_accurate_in_float32_when_the_mean_dwarfs_the_spread():
    # Inputs offset by 30: the outputs' mean is far above their spread, where E[y^2] - E[y]^2
    # would cancel. The centred covariance keeps the folded float32 result as close to float64 as
    # the textbook float32 pair is (both measured against the float64 pair). On the CPU: float32
    # convolutions on a TPU or an NVIDIA GPU round their inputs (bfloat16 passes, TF32) by default.
    with float64_on_the_cpu():
        inputs64 = conv_norm_inputs(jnp.float64, offset=30.0)
        reference, _ = conv_then_batchnorm(*inputs64)
        inputs32 = [a.astype(jnp.float32) for a in inputs64]
        error = {
            f: float(jnp.max(jnp.abs(f(*inputs32)[0] - reference))) for f in (folded, conv_then_batchnorm)
        }
    assert error[folded] <= max(4 * error[conv_then_batchnorm], 1e-5), error


def stem_norm_pairs(y, scale, bias, activation, train):
    """(PooledStemNorm, nn.BatchNorm then the activation then the stem's max-pool): output and the
    running statistics each writes."""
    act = models.ACTIVATIONS[activation]
    stats = {"mean": jnp.full(scale.shape, 0.5, y.dtype), "var": jnp.full(scale.shape, 2.0, y.dtype)}
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
    options = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=y.dtype)
    pooled, new = norms.PooledStemNorm(**options).apply(variables, y, act, mutable=["batch_stats"])
    normed, old = nn.BatchNorm(**options, param_dtype=scale.dtype).apply(
        variables, y, mutable=["batch_stats"]
    )
    return (pooled, new), (layers.max_pool_torch(act(normed)), old)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("train", [True, False])
def test_pooled_stem_norm_is_batchnorm_activation_then_max_pool(activation, train):
    # Negative and positive scales (the sign flip), an odd size (the pool's edge windows), float64:
    # outputs, running statistics and the gradients for the input, scale and bias all agree.
    with float64_on_the_cpu():
        k = jax.random.split(jax.random.key(3), 3)
        y = 2 * jax.random.normal(k[0], (3, 9, 9, 6), jnp.float64) + 1
        scale = jnp.array([1.5, -0.7, 0.3, -2.0, 1.0, -0.1], jnp.float64)
        bias = 0.3 * jax.random.normal(k[1], (6,), jnp.float64)
        (ours, new), (theirs, old) = stem_norm_pairs(y, scale, bias, activation, train)
        assert ours.shape == (3, 5, 5, 6)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        weights = jax.random.normal(k[2], ours.shape, jnp.float64)
        grads = [
            jax.grad(
                lambda *a, i=i: jnp.sum(weights * stem_norm_pairs(*a, activation, train)[i][0]), (0, 1, 2)
            )(y, scale, bias)
            for i in (0, 1)
        ]
        for a, b in zip(*grads, strict=True):
            assert float(jnp.max(jnp.abs(b))) > 1e-3
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_pooled_stem_norm_gives_batchnorm_then_pool_bit_for_bit_in_bfloat16():
    # Rounding is monotone, so pooling before the normalisation selects the same rounded value.
    y = jax.random.normal(jax.random.key(4), (4, 16, 16, 8)).astype(jnp.bfloat16)
    scale = jnp.linspace(-1.5, 1.5, 8)
    bias = jnp.linspace(-0.2, 0.3, 8)
    (ours, new), (theirs, old) = stem_norm_pairs(y, scale, bias, "relu", True)
    assert ours.dtype == theirs.dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours, theirs)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def tiny_bottleneck_net(**options):
    """One bottleneck per stage, 8 filters: stride-1 and strided projections, folded BatchNorms at a
    fraction of ResNet-50's cost."""
    return models.ResNet((1, 1, 1, 1), models.BottleneckBlock, 10, width=8, **options)


def test_fold_bn_builds_the_same_model_with_the_same_parameters_and_gradients():
    # A narrow bottleneck ResNet (one block per stage: stride-1 and strided projections) in float64
    # with folding on and off: one parameter tree, one initialisation, and the same logits, updated
    # statistics and gradients (train) and logits (eval).
    with float64_on_the_cpu():
        x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3), jnp.float64) + 1
        plain, fold = (tiny_bottleneck_net(dtype=jnp.float64, fold_bn=f) for f in (False, True))
        variables = plain.init(jax.random.key(1), x)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, variables, fold.init(jax.random.key(1), x)))
        variables = jax.tree.map(  # non-zero last norms, so every branch matters
            lambda v: v.astype(jnp.float64) + 0.2 * jax.random.normal(jax.random.key(v.size), v.shape),
            variables,
        )

        def loss(module):
            def f(params):
                logits, new = module.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, new)

            return jax.jit(jax.grad(f, has_aux=True))(variables["params"])

        (g0, (l0, s0)), (g1, (l1, s1)) = loss(plain), loss(fold)
        np.testing.assert_allclose(l1, l0, atol=1e-9)
        for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g0, s0)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
        evaluate = jax.jit(lambda module, v: module.apply(v, x), static_argnums=0)
        np.testing.assert_allclose(evaluate(fold, variables), evaluate(plain, variables), atol=1e-9)


def test_only_stride_1_convolutions_before_plain_batchnorm_are_folded():
    def folded_names(name, kind="FoldedBatchNorm", **options):
        module = models.create(name, 10, **options)
        table = module.tabulate(
            jax.random.key(0), jnp.zeros((2, 32, 32, 3)), depth=3, console_kwargs={"width": 400}
        )
        return {line.split("│")[1].strip() for line in table.splitlines() if kind in line}

    names = folded_names("resnet50")
    assert "layer1_0/bn3" in names and "layer4_2/bn3" in names and "layer1_0/shortcut/downsample_bn" in names
    assert "layer2_0/shortcut/downsample_bn" not in names  # strided: stays conv + BatchNorm
    assert len(names) == 16 + 1
    assert not folded_names("resnet50", fold_bn=False)
    assert not folded_names("resnet50", bn_group_size=2)  # ghost BN keeps its own statistics
    assert not folded_names("resnet18") and not folded_names("preact_resnet50")
    # The ImageNet stem's BatchNorm runs after its max-pool under the same switch.
    assert (
        folded_names("resnet18", "PooledStemNorm") == folded_names("resnet50d", "PooledStemNorm") == {"bn1"}
    )
    assert not folded_names("resnet50", "PooledStemNorm", fold_bn=False)
    assert not folded_names("resnet50", "PooledStemNorm", bn_group_size=2)
    assert not folded_names("preact_resnet50", "PooledStemNorm") and not folded_names(
        "resnet20", "PooledStemNorm"
    )


def test_stem_pool_padding_in_the_window_or_explicit_gives_the_same_numbers():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    window = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(layers.max_pool_torch(x))))(x)
    explicit = jax.value_and_grad(
        lambda x: jnp.sum(jnp.sin(layers.max_pool_torch(x, explicit_padding=True)))
    )(x)
    for a, b in zip(window, explicit, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fold_bn_auto_folds_on_tpu_meshes_only():
    import ml_collections

    from resnet_jax.config_checks import check_config

    assert [models.folds_bn("auto", p) for p in ("tpu", "gpu", "cuda", "cpu")] == [True, False, False, False]
    assert models.folds_bn("on", "cpu") and not models.folds_bn("off", "tpu")
    config = check_config(ml_collections.ConfigDict({"model": "resnet50", "dataset": "digits"}))
    assert config.fold_bn == "auto"
    assert (
        models.create_model(config, 10, "tpu").fold_bn and not models.create_model(config, 10, "cpu").fold_bn
    )
    # Without a platform: this machine's default backend decides (the suite also runs on TPU hosts).
    assert models.create_model(config, 10).fold_bn == (jax.default_backend() == "tpu")
    with pytest.raises(ValueError, match="config.fold_bn='true' is not valid; choose one of: auto, on, off"):
        models.folds_bn("true", "tpu")


@pytest.mark.parametrize("size, pad_input_channels", [(8, 0), (14, 0), (32, 0), (14, 4)])
def test_the_space_to_depth_stem_is_the_7x7_stride_2_convolution(size, pad_input_channels):
    """The same parameter, the same outputs and gradients as `nn.Conv(64, (7, 7), (2, 2))` with
    PyTorch's padding, in float64 (odd block counts included: 14 px is 7 blocks), with the image
    padded to 4 channels (16 in blocks) too."""
    from resnet_jax import stems

    with float64_on_the_cpu():
        x = jax.random.normal(jax.random.key(0), (2, size, size, 3), jnp.float64)
        common = dict(use_bias=True, kernel_init=layers.conv_kernel_init, dtype=jnp.float64)
        plain = nn.Conv(
            16, (7, 7), (2, 2), padding=layers.torch_padding(7), param_dtype=jnp.float64, **common
        )
        blocked = stems.StemConv(
            16, 7, 2, space_to_depth=True, pad_input_channels=pad_input_channels, **common
        )
        variables = plain.init(jax.random.key(1), x)
        variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
        assert jax.tree.map(jnp.shape, blocked.init(jax.random.key(1), x)) == jax.tree.map(
            jnp.shape, variables
        )
        np.testing.assert_allclose(blocked.apply(variables, x), plain.apply(variables, x), atol=1e-12)
        grad = lambda m: jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2))(variables)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-10), grad(blocked), grad(plain))


def test_a_resnet_with_the_space_to_depth_stem_loads_the_same_weights_and_gives_the_same_logits():
    with float64_on_the_cpu():
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float64)
        plain, blocked = (
            models.create("resnet18", 10, dtype=jnp.float64, space_to_depth=s) for s in (False, True)
        )
        variables = plain.init(jax.random.key(1), x)
        assert jax.tree.map(jnp.shape, blocked.init(jax.random.key(1), x)) == jax.tree.map(
            jnp.shape, variables
        )
        np.testing.assert_allclose(blocked.apply(variables, x), plain.apply(variables, x), atol=1e-9)
    with pytest.raises(ValueError, match="space_to_depth computes the ImageNet stem's 7x7 convolution"):
        models.create("resnet20", 10, space_to_depth=True)


@pytest.mark.parametrize(
    "name, size, space_to_depth",
    [("resnet18", 32, False), ("resnet18", 32, True), ("resnet20", 16, False), ("resnet18d", 32, False)],
)
def test_padding_the_image_to_4_channels_keeps_parameters_logits_and_gradients(name, size, space_to_depth):
    """ImageNet, CIFAR and deep stems (whose first convolution is `stem_conv1`), and the ImageNet
    stem on 2x2 blocks (16 channels): one parameter tree, the same training-mode logits and
    gradients in float64."""
    with float64_on_the_cpu():
        x = jax.random.normal(jax.random.key(0), (2, size, size, 3), jnp.float64)
        plain, padded = (
            models.create(name, 10, dtype=jnp.float64, space_to_depth=space_to_depth, pad_input_channels=c)
            for c in (0, 4)
        )
        variables = assert_same_training_function(plain, padded, x)
        assert variables["params"]["stem_conv1" if name == "resnet18d" else "conv1"]["kernel"].shape[2] == 3
        eqns = jax.make_jaxpr(functools.partial(padded.apply, train=False))(variables, x).eqns
        first = next(e for e in eqns if e.primitive.name == "conv_general_dilated")
        assert first.invars[0].aval.shape[-1] == (16 if space_to_depth else 4)


def assert_same_training_function(reference, other, x):
    """In float64: `other` has `reference`'s parameter tree and, at `reference`'s initialisation,
    the same training-mode logits, updated running statistics and gradients. Returns the variables."""
    variables = jax.jit(reference.init)(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, jax.eval_shape(other.init, jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables
    )

    def loss(module, params):
        logits, new = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits)), (logits, new["batch_stats"])

    grad = lambda module: jax.jit(jax.grad(functools.partial(loss, module), has_aux=True))
    want_grad, want = grad(reference)(variables["params"])
    got_grad, got = grad(other)(variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9), got, want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9), got_grad, want_grad)
    return variables


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("form", norms.BN_FORMS)
def test_our_batchnorm_in_either_form_is_flax_batchnorm_with_the_same_gradients(form, train):
    # float64 on inputs whose mean is several times their spread: outputs, the running statistics
    # and autodiff's gradients for the input, scale and bias equal nn.BatchNorm's.
    with float64_on_the_cpu():
        k = jax.random.split(jax.random.key(4), 3)
        x = 3 + jax.random.normal(k[0], (4, 5, 5, 6), jnp.float64)
        params = {
            "scale": 1 + 0.3 * jax.random.normal(k[1], (6,), jnp.float64),
            "bias": 0.2 * jax.random.normal(k[2], (6,), jnp.float64),
        }
        stats = {"mean": jnp.full((6,), 0.5, jnp.float64), "var": jnp.full((6,), 2.0, jnp.float64)}
        options = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float64)
        ours = norms.BatchNorm(**options, form=form)
        flax_bn = nn.BatchNorm(**options, param_dtype=jnp.float64)
        weights = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)

        def loss(module, x, params):
            y, new = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(weights * jnp.tanh(y)), (y, new["batch_stats"])

        (got_grads, (got, got_stats)), (want_grads, (want, want_stats)) = (
            jax.grad(functools.partial(loss, module), argnums=(0, 1), has_aux=True)(x, params)
            for module in (ours, flax_bn)
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        for name in ("mean", "var"):
            np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=0, atol=1e-12)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            assert float(jnp.max(jnp.abs(b))) > 1e-3
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "name, size, options",
    [
        ("resnet18", 32, {}),
        ("resnet20", 16, {}),
        ("tiny_bottleneck", 32, {"fold_bn": True}),
        ("resnet20", 16, {"bn_group_size": 2}),
    ],
)
def test_the_affine_batchnorm_form_keeps_parameters_logits_and_gradients(name, size, options):
    """Plain, folded and ghost BatchNorms: one parameter tree; the same training-mode logits,
    running statistics and gradients in float64."""
    with float64_on_the_cpu():
        x = jax.random.normal(jax.random.key(0), (4, size, size, 3), jnp.float64)
        build = (
            tiny_bottleneck_net if name == "tiny_bottleneck" else functools.partial(models.create, name, 10)
        )
        centered, affine = (build(dtype=jnp.float64, bn_form=form, **options) for form in norms.BN_FORMS)
        variables = assert_same_training_function(centered, affine, x)
        # The centered form runs flax's module, the affine one ours; folded norms keep their own.
        affine_of = {(nn.BatchNorm, None): (norms.BatchNorm, "affine")}
        affine_of[norms.GhostBatchNorm, "centered"] = (norms.GhostBatchNorm, "affine")
        used = batch_norms_called(centered, variables, x)
        assert used & set(affine_of)
        assert batch_norms_called(affine, variables, x) == {affine_of.get(pair, pair) for pair in used}
    with pytest.raises(ValueError, match="bn_form='folded' is not valid; choose one of: centered, affine"):
        models.create("resnet18", 10, bn_form="folded")
    assert models.create_model(check_config_with(bn_form="affine"), 10).bn_form == "affine"


def batch_norms_called(module, variables, x):
    """(class, form) of every norm module a training-mode forward pass calls; form None: flax's."""
    seen = set()

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "Norm" in type(context.module).__name__:
            seen.add((type(context.module), getattr(context.module, "form", None)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        module.apply(variables, x, train=True, mutable=["batch_stats"])
    return seen


def check_config_with(**overrides):
    from resnet_jax.config_checks import check_config
    from tests.conftest import digits_config

    return check_config(digits_config(model="resnet18", **overrides))


def test_padding_fewer_channels_than_the_image_has_is_refused():
    from resnet_jax.config_checks import check_config
    from tests.conftest import digits_config

    module = models.create_model(check_config(digits_config(model="resnet18", pad_input_channels=2)), 10)
    assert module.pad_input_channels == 2
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))  # digits: one channel
    with pytest.raises(ValueError) as error:
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert str(error.value) == (
        "pad_input_channels=2 is fewer than the image's 3 channels: use 0 (off) or at least 3"
    )
    with pytest.raises(ValueError, match="pad_input_channels=-1 must be 0 .off. or a positive integer"):
        models.create("resnet18", 10, pad_input_channels=-1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(model="resnet18", image_size=33),
            "config.space_to_depth_stem=True needs even image sides, not image_size=33",
        ),
        (
            dict(model="resnet20"),
            "config.space_to_depth_stem=True needs an ImageNet stem (resnet20 has none)",
        ),
    ],
)
def test_the_space_to_depth_stem_refuses_odd_sizes_and_other_stems(overrides, message):
    from resnet_jax.config_checks import ConfigError, check_config
    from tests.conftest import digits_config

    with pytest.raises(ConfigError) as error:
        check_config(digits_config(space_to_depth_stem=True, **overrides))
    assert str(error.value) == message
