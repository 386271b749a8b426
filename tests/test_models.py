import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models

# torchvision's published counts (1000 classes, 224 px), and He et al.'s CIFAR nets (10 classes).
PUBLISHED = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
CIFAR_APPROX = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.7e6}


def shapes(name, num_classes, size, channels=3, **options):
    module = models.create(name, num_classes, **options)
    x = jnp.zeros((2, size, size, channels))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    return variables, out


@pytest.mark.parametrize("name", models.names())
def test_every_registry_name_builds_with_the_right_output_shape(name):
    size = 32 if name.removeprefix("resnet").removeprefix("plain") in ("20", "32", "44", "56", "110") else 64
    variables, out = shapes(name, 7, size)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_imagenet_parameter_counts_match_torchvision(name, count):
    assert models.count_params(models.create(name, 1000), 224) == count


@pytest.mark.parametrize("name,approx", CIFAR_APPROX.items())
def test_cifar_parameter_counts_match_the_paper(name, approx):
    count = models.count_params(models.create(name, 10), 32)
    assert abs(count - approx) / approx < 0.03, count


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
    # An example's eval output does not depend on the rest of the batch (no batch statistics).
    np.testing.assert_allclose(module.apply(variables, x[:1], train=False), a[:1], rtol=1e-5, atol=1e-5)
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
