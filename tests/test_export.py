"""Exported artifacts (StableHLO through jax.export, ONNX through jax2onnx) against `predict`'s outputs.

The ONNX tests need the `.[onnx]` extra; CI installs it after the main suite and runs this file again.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from resnet_jax import augment, data, export, models
from resnet_jax.config_checks import complete_config
from resnet_jax.inference import TrainedModel, load_trained
from resnet_jax.predict import predict_files
from resnet_jax.step import TrainState, eval_logits
from tests.conftest import digits_config, run_script

# One network of each family, at 32 px: basic, bottleneck, pre-activation, ResNet-D (deep stem,
# average-pool shortcut), squeeze-and-excitation, ResNeXt (grouped convolutions), CIFAR option A.
FAMILIES = (
    "resnet18",
    "resnet50",
    "preact_resnet18",
    "resnet50d",
    "seresnet50",
    "resnext50_32x4d",
    "resnet20",
)
STABLEHLO_RTOL = 1e-5
ONNX_RTOL = 1e-4


def random_trained(
    name: str, image_size: int = 32, num_classes: int = 10, seed: int = 0, **overrides
) -> TrainedModel:
    """A randomly initialised net with live residual branches and running variances off 1 (so that
    normalisation with the running statistics is exercised, not an identity)."""
    config = complete_config(
        ml_collections.ConfigDict({"model": name, "zero_init_residual": False, **overrides})
    )
    info = data.DatasetInfo(
        name="random",
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        mean=(120.0, 115.0, 100.0),
        std=(60.0, 58.0, 57.0),
        class_names=tuple(f"c{i}" for i in range(num_classes)),
        num_train=1,
        num_eval=1,
        eval_crop=0.875,
    )
    model = models.create_model(config, num_classes)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *info.image_shape)))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 10_000))
    batch_stats = jax.tree.map(
        lambda x: x * (1 + 0.5 * jax.random.uniform(next(keys), x.shape)), variables.get("batch_stats", {})
    )
    state = TrainState(jnp.int32(0), variables["params"], batch_stats, None)
    return TrainedModel(0, config, info, model, state)


def reference(trained: TrainedModel, images: np.ndarray, outputs: str = "probabilities") -> np.ndarray:
    """What `predict` computes: the jit-compiled inference logits, softmaxed."""
    info = trained.info
    logits = jax.jit(lambda s, x: eval_logits(s, x, model=trained.model, mean=info.mean, std=info.std))(
        trained.state, images
    )
    return np.asarray(jax.nn.softmax(logits) if outputs == "probabilities" else logits, np.float32)


def max_relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |a - b| / max |b| per image (the infinity-norm relative error), the worst image.

    Per element, a logit or probability near 0 would turn float32 rounding (1e-7 of the largest
    output) into any relative difference at all.
    """
    scale = np.abs(theirs).max(axis=-1, keepdims=True)
    return float(np.max(np.abs(ours - theirs) / scale))


def images(count: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def run_stablehlo(blob: bytes, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.export.deserialize(blob).call(x))


def onnx_session(blob: bytes):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need pip install -e '.[onnx]'")
    pytest.importorskip("jax2onnx", reason="the ONNX tests need pip install -e '.[onnx]'")
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def onnx_logits(trained: TrainedModel, x: np.ndarray) -> np.ndarray:
    """The logits of `trained` exported to ONNX, run by onnxruntime on `x`."""
    (logits,) = onnx_session(export.to_onnx(trained, "logits")).run(None, {"images": x})
    return logits


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_to_stablehlo_with_parity(name):
    trained = random_trained(name)
    blob = export.to_stablehlo(trained)
    x = images(3, trained.info.image_shape)
    assert max_relative_difference(run_stablehlo(blob, x), reference(trained, x)) <= STABLEHLO_RTOL


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_to_onnx_with_parity(name):
    pytest.importorskip("jax2onnx", reason="the ONNX tests need pip install -e '.[onnx]'")
    trained = random_trained(name)
    x = images(3, trained.info.image_shape)
    assert max_relative_difference(onnx_logits(trained, x), reference(trained, x, "logits")) <= ONNX_RTOL


def test_a_net_built_as_on_tpus_exports_to_onnx_with_parity():
    # fold_bn (the default on TPU meshes): FoldedBatchNorm layers and the stem normalised after its
    # max-pool, whose -inf padding ONNX export makes explicit.
    pytest.importorskip("jax2onnx", reason="the ONNX tests need pip install -e '.[onnx]'")
    trained = random_trained("resnet50", fold_bn="on")
    assert trained.model.fold_bn
    x = images(3, trained.info.image_shape)
    ours = onnx_logits(trained, x)
    assert max_relative_difference(ours, reference(trained, x, "logits")) <= ONNX_RTOL
    unfolded = dataclasses.replace(trained, model=trained.model.clone(fold_bn=False))
    assert max_relative_difference(ours, reference(unfolded, x, "logits")) <= ONNX_RTOL


def test_the_batch_dimension_is_symbolic_and_bad_inputs_are_clear_errors():
    trained = random_trained("resnet20", image_size=16)
    blob = export.to_stablehlo(trained, "logits")
    exported = jax.export.deserialize(blob)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert str(exported.in_avals[0].shape[0]) == "batch" and exported.in_avals[0].dtype == jnp.uint8
    for batch in (1, 5, 17):  # never seen at export
        x = images(batch, trained.info.image_shape, seed=batch)
        ours = run_stablehlo(blob, x)
        assert ours.shape == (batch, 10)
        assert max_relative_difference(ours, reference(trained, x, "logits")) <= STABLEHLO_RTOL
    x = images(2, trained.info.image_shape)
    with pytest.raises(
        ValueError, match="Dtype mismatch for args\\[0\\]: expected uint8 and called with float32"
    ):
        exported.call(x.astype(np.float32))
    with pytest.raises(ValueError, match="Shape mismatch .* expected \\(batch, 16, 16, 3\\)"):
        exported.call(np.zeros((2, 20, 20, 3), np.uint8))


def test_onnx_takes_any_batch_and_rejects_bad_inputs_clearly():
    pytest.importorskip("jax2onnx", reason="the ONNX tests need pip install -e '.[onnx]'")
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    trained = random_trained("resnet20", image_size=16)
    session = onnx_session(export.to_onnx(trained))
    (spec,) = session.get_inputs()
    assert spec.name == "images" and spec.type == "tensor(uint8)" and spec.shape[1:] == [16, 16, 3]
    for batch in (1, 6):
        x = images(batch, trained.info.image_shape, seed=batch)
        (ours,) = session.run(None, {"images": x})
        assert max_relative_difference(ours, reference(trained, x)) <= ONNX_RTOL
    with pytest.raises(
        InvalidArgument, match="Unexpected input data type.*expected: \\(tensor\\(uint8\\)\\)"
    ):
        session.run(None, {"images": images(2, (16, 16, 3)).astype(np.float32)})
    with pytest.raises(InvalidArgument, match="Got invalid dimensions for input: images"):
        session.run(None, {"images": np.zeros((2, 20, 20, 3), np.uint8)})


# ------------------------------------------------------------ trained checkpoints, end to end


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def digits_run(request, tmp_path_factory):
    """A short digits run (and a few eval images as PNG files), in float32 and in bfloat16."""
    from resnet_jax.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp(f"digits_{request.param}")
    config = digits_config(num_train_steps=44, dtype=request.param, ema_decay=0.9, log_every_steps=22)
    train_and_evaluate(config, str(workdir))
    dataset = data.load(config)
    paths = []
    for i in range(6):
        path = workdir / f"digit{i}.png"
        Image.fromarray(dataset.eval_source[i]["image"][..., 0]).save(path)
        paths.append(str(path))
    return workdir, paths, request.param


def predicted_probabilities(workdir, paths) -> np.ndarray:
    """`predict`'s probabilities for every class, in class order."""
    results = predict_files(str(workdir), paths, top_k=10)
    out = np.zeros((len(paths), 10), np.float32)
    for row, result in zip(out, results, strict=True):
        for entry in result["top_k"]:
            row[entry["index"]] = entry["probability"]
    return out


def preprocessed(paths, meta) -> np.ndarray:
    """The server's side: decode, resize and crop as the metadata says (digits: 8 px up to 12 px)."""
    rule = meta["preprocessing"]
    size, crop = rule["center_crop"][0], rule["crop_fraction"]
    assert rule["resize_shorter_side_to"] == round(size / crop)
    channels = meta["input"]["shape"][-1]
    return np.stack(
        [augment.resize_shorter_and_center_crop(augment.decode_image(p, channels), size, crop) for p in paths]
    )


def test_export_command_writes_stablehlo_that_matches_predict(digits_run):
    workdir, paths, dtype = digits_run
    out = workdir / "model.jax_exported"
    result = run_script(
        "-m", "resnet_jax.export", "--workdir", str(workdir), "--format", "stablehlo", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stablehlo written to {out}" in result.stdout
    meta = json.loads((workdir / "model.jax_exported.json").read_text())
    assert meta["input"] == {
        "name": "images",
        "dtype": "uint8",
        "shape": ["batch", 12, 12, 1],
        "layout": "NHWC",
    }
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["step"] == 44
    assert meta["weights"] == "exponential moving average" and meta["compute_dtype"] == dtype
    trained = load_trained(str(workdir))
    x = preprocessed(paths, meta)
    ours = run_stablehlo(out.read_bytes(), x)
    assert max_relative_difference(ours, reference(trained, x)) <= STABLEHLO_RTOL
    assert max_relative_difference(ours, predicted_probabilities(workdir, paths)) <= STABLEHLO_RTOL


def test_export_command_writes_onnx_that_matches_predict(digits_run):
    pytest.importorskip("jax2onnx", reason="the ONNX tests need pip install -e '.[onnx]'")
    workdir, paths, dtype = digits_run
    out, meta_path = export.export_checkpoint(str(workdir), "onnx")
    assert out.endswith("export/resnet20_step44.onnx") and meta_path == out + ".json"
    meta = json.loads(Path(meta_path).read_text())
    assert meta["compute_dtype"] == "float32"
    session = onnx_session(Path(out).read_bytes())
    x = preprocessed(paths, meta)
    (ours,) = session.run(None, {"images": x})
    trained = load_trained(str(workdir))
    float32 = export.with_float32_compute(trained)
    assert max_relative_difference(ours, reference(float32, x)) <= ONNX_RTOL
    predicted = predicted_probabilities(workdir, paths)
    if dtype == "float32":
        assert max_relative_difference(ours, predicted) <= ONNX_RTOL
    else:  # predict computes in bfloat16, the ONNX graph in float32: close, and the same class
        np.testing.assert_allclose(ours, predicted, atol=0.05)  # wherever it is not a near-tie
        top2 = np.sort(predicted, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.05
        assert clear.sum() >= 4, predicted  # two epochs in, most digits are clear calls
        np.testing.assert_array_equal(ours.argmax(-1)[clear], predicted.argmax(-1)[clear])


def test_a_stablehlo_artifact_loads_with_jax_alone(digits_run, tmp_path):
    """The artifact is self-contained: no resnet_jax (nor flax) in the process that serves it."""
    workdir, paths, _ = digits_run
    out, _ = export.export_checkpoint(str(workdir), "stablehlo", out=str(tmp_path / "m.jax_exported"))
    x = preprocessed(paths, json.loads((tmp_path / "m.jax_exported.json").read_text()))
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["resnet_jax"] = None  # importing it would fail
        sys.modules["flax"] = None
        import jax, numpy as np
        exported = jax.export.deserialize(open({out!r}, "rb").read())
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(exported.call(np.load({str(tmp_path / "x.npy")!r}))))
        assert not any(name.startswith(("resnet_jax", "flax")) for name in sys.modules if sys.modules[name])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), run_stablehlo(Path(out).read_bytes(), x))


def test_export_errors_are_one_line(tmp_path):
    result = run_script(
        "-m", "resnet_jax.export", "--workdir", str(tmp_path / "none"), "--format", "stablehlo"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr[-2000:]
    result = run_script("-m", "resnet_jax.export", "--workdir", str(tmp_path), "--format", "tflite")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tflite" in result.stderr and "stablehlo" in result.stderr


def test_each_format_writes_its_own_metadata_file(tmp_path, monkeypatch):
    """Exporting ONNX must not overwrite the StableHLO artifact's metadata (and the other way round)."""
    trained = types.SimpleNamespace(info=types.SimpleNamespace(num_classes=10, image_shape=(12, 12, 1)))
    trained.config, trained.step = types.SimpleNamespace(model="resnet20"), 7
    monkeypatch.setattr(export, "load_trained", lambda workdir, which: trained)
    monkeypatch.setattr(export, "to_stablehlo", lambda trained, outputs: b"stablehlo")
    monkeypatch.setattr(export, "to_onnx", lambda trained, outputs: b"onnx")
    monkeypatch.setattr(export, "metadata", lambda trained, fmt, outputs: {"format": fmt})
    written = {fmt: export.export_checkpoint(str(tmp_path), fmt) for fmt in ("stablehlo", "onnx")}
    for fmt, (out, meta_path) in written.items():
        assert meta_path == out + ".json"
        assert json.loads(Path(meta_path).read_text()) == {"format": fmt}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "resnet20_step7.jax_exported",
        "resnet20_step7.jax_exported.json",
        "resnet20_step7.onnx",
        "resnet20_step7.onnx.json",
    ]
