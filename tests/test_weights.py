"""Pretrained-weight import: PyTorch parity, key and shape errors, the convert CLI, fine-tuning."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import compiled_steps, convert, finetune, models, resume, weights
from resnet_jax.step import normalize
from tests.make_torch_reference import (
    ARCHITECTURES,
    DATA,
    build_torch_model,
    random_state_dict,
    reference_input,
    torch_logits,
)

REFERENCE = np.load(DATA)
TOLERANCE = 1e-4  # float32 logits


def reference_case(name):
    spec = json.loads(str(REFERENCE[f"{name}/spec"]))
    state = random_state_dict(spec["keys"], [tuple(s) for s in spec["shapes"]], spec["seed"])
    return spec, state, reference_input(spec["seed"])


def flax_logits(name, variables, images_nchw):
    module = models.create(name, variables["params"]["fc"]["kernel"].shape[-1])
    return np.asarray(jax.jit(module.apply)(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_imported_weights_reproduce_pytorch_logits(name):
    """Stored logits of the hand-written torchvision/timm-layout PyTorch nets (tests/make_torch_reference.py);
    live PyTorch too where torch is installed."""
    spec, state, images = reference_case(name)
    convert_fn = {"torchvision": weights.from_torchvision, "timm": weights.from_timm}[spec["source"]]
    logits = flax_logits(name, convert_fn(state, name), images)
    expected = REFERENCE[f"{name}/logits"]
    assert np.abs(expected).max() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE)
    try:
        import torch  # noqa: F401
    except ImportError:
        return  # the stored reference above is the check (CI installs no torch)
    live = torch_logits(build_torch_model(ARCHITECTURES[name][1]), state, images)
    np.testing.assert_allclose(logits, live, rtol=0, atol=TOLERANCE)


def test_variables_land_in_the_right_collections_and_layouts():
    _, state, _ = reference_case("resnet50d")
    variables = weights.from_timm(state, "resnet50d")
    assert set(variables) == {"params", "batch_stats"}
    p, s = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(p["conv1"]["kernel"], state["conv1.6.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["stem_conv1"]["kernel"], state["conv1.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        p["layer2_0"]["shortcut"]["downsample_bn"]["scale"], state["layer2.0.downsample.2.weight"]
    )
    np.testing.assert_array_equal(s["layer1_0"]["bn2"]["var"], state["layer1.0.bn2.running_var"])
    np.testing.assert_array_equal(p["fc"]["kernel"], state["fc.weight"].T)


def test_grouped_and_torch_tensor_inputs_convert():
    torch = pytest.importorskip("torch", reason="torch is not installed: numpy inputs are tested instead")
    _, state, _ = reference_case("resnext50_32x4d")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    variables = weights.from_torchvision(tensors, "resnext50_32x4d")
    assert variables["params"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 4, 128)  # 32 groups of 4


def test_num_batches_tracked_and_data_parallel_prefix_are_accepted():
    _, state, _ = reference_case("resnet18")
    assert any(k.endswith("num_batches_tracked") for k in state)
    prefixed = {f"module.{k}": v for k, v in state.items()}
    a = weights.from_torchvision(state, "resnet18")
    b = weights.from_torchvision(prefixed, "resnet18")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_missing_unexpected_and_misshapen_keys_are_listed():
    _, state, _ = reference_case("resnet18")
    broken = dict(state)
    del broken["layer1.0.bn1.running_mean"]
    broken["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    broken["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
    with pytest.raises(weights.WeightsError) as err:
        weights.from_torchvision(broken, "resnet18")
    message = str(err.value)
    assert "1 missing keys: layer1.0.bn1.running_mean" in message
    assert "1 unexpected keys: layer9.0.conv1.weight" in message
    assert "layer2.0.conv1.weight (128, 64, 1, 1) (expected (128, 64, 3, 3))" in message
    with pytest.raises(weights.WeightsError, match="missing keys"):  # another architecture's weights
        weights.from_torchvision(state, "resnet34")


def test_models_without_a_counterpart_are_refused_with_the_choices():
    with pytest.raises(weights.WeightsError, match="resnet50d.*no torchvision counterpart.*resnext50_32x4d"):
        weights.from_torchvision({}, "resnet50d")
    with pytest.raises(ValueError, match="source='keras'"):
        weights.convert({}, "resnet50", "keras")


def test_weight_files_load_and_bad_files_say_why(tmp_path, monkeypatch):
    _, state, _ = reference_case("resnet18")
    npz = tmp_path / "w.npz"
    np.savez(npz, **state)
    loaded = weights.load_state_dict(str(npz))
    assert set(loaded) == set(state)
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.load_state_dict(str(tmp_path / "nope.npz"))
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(weights.WeightsError, match=r"unsupported file type '\.h5'.*\.safetensors"):
        weights.load_state_dict(str(tmp_path / "w.h5"))
    (tmp_path / "w.pth").write_bytes(b"not a pickle")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # as if torch were not installed
        with pytest.raises(weights.WeightsError, match="pip install torch.*\\.safetensors or \\.npz"):
            weights.load_state_dict(str(tmp_path / "w.pth"))


def test_safetensors_files_load(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    _, state, _ = reference_case("resnet18")
    safetensors_numpy.save_file(state, str(tmp_path / "w.safetensors"))
    loaded = weights.load_state_dict(str(tmp_path / "w.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, loaded, state)


def test_pth_files_load_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (.pth needs it; .npz is tested)")
    _, state, _ = reference_case("resnet18")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "w.pth")
    assert set(weights.load_state_dict(str(tmp_path / "w.pth"))) == set(state)

    class Payload:  # a pickle that would run code on load is refused
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(weights.WeightsError, match="weights_only=True"):
        weights.load_state_dict(str(tmp_path / "evil.pth"))


def test_convert_writes_a_checkpoint_that_predict_loads(tmp_path, capsys):
    from resnet_jax.predict import predict_files

    spec, state, images = reference_case("resnet18")
    np.savez(tmp_path / "w.npz", **state)
    (tmp_path / "classes.txt").write_text("\n".join(f"name{i}" for i in range(10)))
    argv = ["--model", "resnet18", str(tmp_path / "w.npz"), "--out", str(tmp_path / "out")]
    assert convert.main([*argv, "--class_names", str(tmp_path / "classes.txt"), "--image_size", "32"]) == 0
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(image)
    (result,) = predict_files(str(tmp_path / "out"), [str(image)], top_k=3)
    assert result["top_k"][0]["class"].startswith("name") and len(result["top_k"]) == 3
    # The same checkpoint again, a missing file and an unknown model: one line each, exit code 2.
    capsys.readouterr()
    assert convert.main(argv) == 2
    assert convert.main(["--model", "resnet18", str(tmp_path / "no.npz"), "--out", str(tmp_path / "o2")]) == 2
    assert convert.main(["--model", "resnet19", str(tmp_path / "w.npz"), "--out", str(tmp_path / "o3")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [e.split(":")[0] for e in errors] == ["error"] * 3, errors
    assert (
        "already holds checkpoints" in errors[0] and "does not exist" in errors[1] and "resnet19" in errors[2]
    )


# ---------------------------------------------------------------- fine-tuning


def write_pretrained(directory, num_classes, model="resnet20"):
    """Random 'pretrained' weights for `model` on `num_classes` classes, saved like convert saves."""
    from resnet_jax import checkpoint, data
    from tests.conftest import digits_config

    module = models.create(model, num_classes)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 12, 12, 1)))
    rng = np.random.default_rng(num_classes)

    def value(path, leaf):  # trained-looking: BatchNorm near identity, small kernels
        name = path[-1].key
        if name in ("scale", "var"):
            return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(value, shapes)
    info = data.DatasetInfo("pre", num_classes, (12, 12, 1), (0.0,), (1.0,), ("c",) * num_classes, 1, 1)
    manager = checkpoint.Checkpoints(str(directory), async_save=False)
    manager.save(0, dict(variables), config=digits_config(model=model), dataset_info=info)
    manager.close()
    return variables


def assert_backbone_equal(a, b):
    a = {k: v for k, v in a.items() if k != "fc"}
    b = {k: v for k, v in b.items() if k != "fc"}
    jax.tree.map(np.testing.assert_array_equal, a, jax.device_get(b))


@pytest.mark.slow
def test_fine_tuning_replaces_the_head_and_linear_probing_trains_only_it(tmp_path, make_digits_config):
    from resnet_jax import checkpoint, data, parallel

    config = make_digits_config(num_train_steps=2, freeze_backbone=True)
    dataset = data.load(config)
    steps = compiled_steps.CompiledSteps(config, dataset.info, parallel.create_mesh())

    def start(init_from):
        pretrained = finetune.load_pretrained(str(tmp_path / init_from), config.model)
        workdir = tmp_path / f"run_{init_from}"
        state, step = resume.restore_or_init(steps, checkpoint.Checkpoints(str(workdir)), None, pretrained)
        assert step == 0
        return state

    # The same number of classes: everything is taken over, the head included.
    pretrained = write_pretrained(tmp_path / "pre10", num_classes=10)
    jax.tree.map(np.testing.assert_array_equal, pretrained["params"], jax.device_get(start("pre10").params))
    # Another architecture, or no checkpoint at all: a clear error.
    write_pretrained(tmp_path / "other", num_classes=10, model="resnet32")
    with pytest.raises(weights.WeightsError, match="holds resnet32 weights.*config.model='resnet20'"):
        start("other")
    with pytest.raises(weights.WeightsError, match="config.init_from=.*no checkpoint"):
        start("missing")
    # 7 pretrained classes, 10 in digits: a fresh head on the pretrained backbone.
    pretrained = write_pretrained(tmp_path / "pre7", num_classes=7)
    state = start("pre7")
    assert state.params["fc"]["kernel"].shape == (64, 10)
    assert_backbone_equal(pretrained["params"], state.params)
    assert_backbone_equal(pretrained["batch_stats"], state.batch_stats)
    head = jax.device_get(state.params["fc"])
    # Linear probing (freeze_backbone): two steps change the head only, BatchNorm statistics included.
    batches = data.train_loader(dataset, global_batch_size=config.batch_size, seed=0)
    for _ in range(2):
        batch = parallel.to_global(next(batches), steps.batch_sharding, config.batch_size)
        state = steps.train_step(state, batch)[0]
    batches.close()
    assert_backbone_equal(pretrained["params"], state.params)
    assert_backbone_equal(pretrained["batch_stats"], state.batch_stats)
    assert not np.allclose(head["kernel"], state.params["fc"]["kernel"])
    # The data is normalised like the pretrained weights' data (saved beside them), and a missing
    # init_from fails here, before train_and_evaluate compiles anything.
    logged = []
    pretrained = finetune.load_pretrained(str(tmp_path / "pre7"), config.model)
    normalised = finetune.with_pretrained_normalization(dataset, pretrained, logged.append)
    assert (
        (normalised.info.mean, normalised.info.std)
        == ((0.0,), (1.0,))
        != (dataset.info.mean, dataset.info.std)
    )
    assert "normalising inputs like the pretrained weights" in logged[0]
    with pytest.raises(weights.WeightsError, match="config.init_from=.*no checkpoint"):
        finetune.load_pretrained(str(tmp_path / "missing"), config.model)


@pytest.mark.parametrize("height,width", [(375, 500), (427, 640), (500, 333), (256, 256), (301, 300)])
def test_eval_preprocessing_is_torchvisions(height, width):
    """Resize(256) (shorter side; the longer one truncated), CenterCrop(224) (offset rounded half to
    even), ToTensor + Normalize(ImageNet mean/std): torchvision's documented arithmetic, written out."""
    from PIL import Image

    from resnet_jax import augment

    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    short, long = sorted((height, width))
    new_long = int(256 * long / short)
    new_h, new_w = (256, new_long) if height <= width else (new_long, 256)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    expected = resized[top : top + 224, left : left + 224]
    ours = augment.resize_shorter_and_center_crop(image, 224, augment.IMAGENET_EVAL_CROP)
    np.testing.assert_array_equal(ours, expected)
    tensor = (expected / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    normalized = normalize(jnp.asarray(ours), weights.IMAGENET_MEAN, weights.IMAGENET_STD)
    np.testing.assert_allclose(normalized, tensor, rtol=0, atol=1e-5)
