"""Serve a trained run without this package: a checkpoint as a StableHLO artifact or an ONNX model.

    python -m resnet_jax.export --workdir DIR [--checkpoint best|latest|STEP] --format stablehlo|onnx
        [--outputs probabilities|logits] [--out FILE]

Both graphs take uint8 NHWC images at the checkpoint's eval size, with any batch size, and return
float32 class probabilities (or logits). The dataset's normalisation is baked in, and so are the
weights (their EMA when the run kept one, as `evaluate` uses), so a server passes raw pixels after
the resize and center crop that the JSON beside the artifact describes.

- StableHLO: `jax.export` serialization, lowered for cpu, cuda and tpu; loading it needs only JAX
  (`jax.export.deserialize(blob).call(images)`). It computes in the run's dtype.
- ONNX: through `jax2onnx` (the `.[onnx]` extra); runs in ONNX Runtime and every ONNX server. It
  computes in float32 whatever the training dtype (ONNX Runtime's CPU kernels have no bfloat16
  convolutions).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from resnet_jax import cli
from resnet_jax.errors import UserError, check_choice
from resnet_jax.inference import TrainedModel, load_trained
from resnet_jax.step import eval_logits

FORMATS = ("stablehlo", "onnx")
OUTPUTS = ("probabilities", "logits")
PLATFORMS = ("cpu", "cuda", "tpu")
SUFFIXES = {"stablehlo": ".jax_exported", "onnx": ".onnx"}
ONNX_OPSET = 21  # ONNX Runtime 1.20 (2024) and later
METADATA_VERSION = 1


class ExportError(UserError, ValueError):
    """A checkpoint or option that cannot be exported; the message names it and what would work."""


def serving_function(
    trained: TrainedModel, outputs: str = "probabilities"
) -> Callable[[jax.Array], jax.Array]:
    """uint8 NHWC images -> float32 probabilities or logits, with the weights closed over."""
    check_choice("--outputs", outputs, OUTPUTS)
    info = trained.info
    logits_of = functools.partial(
        eval_logits, trained.state, model=trained.model, mean=info.mean, std=info.std
    )

    def serve(images: jax.Array) -> jax.Array:
        logits = logits_of(images).astype(jnp.float32)
        return jax.nn.softmax(logits) if outputs == "probabilities" else logits

    return serve


def input_spec(trained: TrainedModel, batch: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, *trained.info.eval_image_shape), jnp.uint8)


def with_float32_compute(trained: TrainedModel) -> TrainedModel:
    """The same weights in a model that computes in float32 (params are float32 in every run)."""
    if trained.model.dtype == jnp.float32:
        return trained
    return dataclasses.replace(trained, model=trained.model.clone(dtype=jnp.float32))


def to_stablehlo(
    trained: TrainedModel, outputs: str = "probabilities", platforms: Sequence[str] = PLATFORMS
) -> bytes:
    """The serialized `jax.export.Exported` of the serving function, for any batch size."""
    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(serving_function(trained, outputs)), platforms=tuple(platforms))(
        input_spec(trained, batch)
    )
    return bytes(exported.serialize())


def to_onnx(trained: TrainedModel, outputs: str = "probabilities") -> bytes:
    """The serving function as an ONNX model (float32 compute) with a symbolic batch dimension."""
    try:
        import jax2onnx
    except ImportError:
        raise ExportError(
            "--format onnx needs the ONNX extra: pip install 'resnet_jax[onnx]' (jax2onnx, onnx, onnxruntime)"
        ) from None
    trained = with_float32_compute(trained)
    trained = dataclasses.replace(trained, model=trained.model.clone(explicit_pool_padding=True))
    model = jax2onnx.to_onnx(
        serving_function(trained, outputs),
        [input_spec(trained, "batch")],
        model_name=trained.config.model,
        opset=ONNX_OPSET,
        input_names=["images"],
        output_names=[outputs],
    )
    # jax2onnx annotates intermediate shapes in its own (NCHW) layout; ONNX Runtime re-infers them.
    model.graph.ClearField("value_info")
    return model.SerializeToString()


def metadata(trained: TrainedModel, fmt: str, outputs: str) -> dict[str, Any]:
    """What a server needs beside the graph: the input contract, the preprocessing and the labels."""
    info = trained.info
    height, width, channels = info.eval_image_shape
    return {
        "format": fmt,
        "metadata_version": METADATA_VERSION,
        "model": trained.config.model,
        "step": trained.step,
        "dataset": info.name,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", height, width, channels],
            "layout": "NHWC",
        },
        "output": {"name": outputs, "dtype": "float32", "shape": ["batch", info.num_classes]},
        "preprocessing": {
            "resize_shorter_side_to": round(height / info.eval_crop),
            "center_crop": [height, width],
            "crop_fraction": info.eval_crop,
            "channels": "RGB" if channels == 3 else "grayscale",
            "normalization": "baked in: (pixel - mean) / std",
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "class_names": list(info.class_names),
        "compute_dtype": "float32" if fmt == "onnx" else str(jnp.dtype(trained.model.dtype)),
        "weights": "exponential moving average" if trained.config.ema_decay > 0 else "trained",
        "platforms": list(PLATFORMS) if fmt == "stablehlo" else ["any ONNX runtime"],
        "versions": {name: _version(name) for name in ("resnet_jax", "jax", "flax", "jax2onnx")},
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_checkpoint(
    workdir: str,
    fmt: str,
    *,
    which: str = "latest",
    outputs: str = "probabilities",
    out: str | None = None,
) -> tuple[str, str]:
    """Write the artifact and its JSON metadata; returns both paths."""
    check_choice("--format", fmt, FORMATS)
    check_choice("--outputs", outputs, OUTPUTS)
    trained = load_trained(workdir, which)
    if trained.info.num_classes < 1 or len(trained.info.image_shape) != 3:
        raise ExportError(f"the checkpoint in {workdir} has no usable dataset metadata")
    blob = to_stablehlo(trained, outputs) if fmt == "stablehlo" else to_onnx(trained, outputs)
    out = out or os.path.join(workdir, "export", f"{trained.config.model}_step{trained.step}{SUFFIXES[fmt]}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta_path = out + ".json"  # per artifact: exporting one format never touches the other's files
    _write_atomically(out, blob)
    _write_atomically(meta_path, (json.dumps(metadata(trained, fmt, outputs), indent=1) + "\n").encode())
    return out, meta_path


def _write_atomically(path: str, content: bytes) -> None:
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(content)
    os.replace(partial, path)


def main(argv: Sequence[str] | None = None) -> int:
    flag_values = flags.FlagValues()
    cli.define_workdir(flag_values, "Training workdir (or `python -m resnet_jax.convert` output).")
    cli.define_checkpoint(flag_values)
    flags.DEFINE_enum("format", "stablehlo", FORMATS, "Artifact format.", flag_values=flag_values)
    flags.DEFINE_enum("outputs", "probabilities", OUTPUTS, "What the graph returns.", flag_values=flag_values)
    flags.DEFINE_string(
        "out",
        None,
        "File to write (default: WORKDIR/export/MODEL_stepS.jax_exported or .onnx).",
        flag_values=flag_values,
    )
    cli.parse(flag_values, argv, prog="python -m resnet_jax.export", doc=__doc__)

    def work() -> None:
        out, meta_path = export_checkpoint(
            flag_values.workdir,
            flag_values.format,
            which=flag_values.checkpoint,
            outputs=flag_values.outputs,
            out=flag_values.out,
        )
        size = os.path.getsize(out) / 2**20
        print(f"{flag_values.format} written to {out} ({size:.1f} MiB), metadata: {meta_path}")

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
