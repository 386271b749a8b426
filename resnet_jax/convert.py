"""Convert torchvision or timm ResNet weights into a checkpoint for evaluate, predict and fine-tuning.

The checkpoint directory works as `--workdir` of evaluate/predict and as `config.init_from`.

    python -m resnet_jax.convert --from torchvision --model resnet50 resnet50-11ad3fa6.pth --out DIR
        [--class_names imagenet_classes.txt] [--image_size 224] [--eval_crop 0.875] [--normalization imagenet]

Reads `.pth`/`.pt`/`.bin` (with torch installed, `torch.load(..., weights_only=True)`),
`.safetensors` or `.npz`, and writes DIR/checkpoints/0 like a training run would: the weights, an
ImageNet config for the model (from configs/default.py) and the dataset metadata that pretrained
torchvision/timm models expect (ImageNet mean/std, resize to size/0.875 and center-crop; timm's
`resnetv2_*` weights want `--normalization inception`, and timm's recipes often `--eval_crop 0.95`:
see the weights' `pretrained_cfg`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
from absl import flags

from resnet_jax import checkpoint, cli, data, models, weights
from resnet_jax.errors import check_choice

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"
IMAGENET_SIZES = {"train": 1_281_167, "eval": 50_000}
# Input normalisation in uint8 units: torchvision's and most timm weights use ImageNet's mean/std;
# timm's ResNetV2 and BiT weights the "Inception" 0.5/0.5 (see the weights' pretrained_cfg).
NORMALIZATIONS = {
    "imagenet": (weights.IMAGENET_MEAN, weights.IMAGENET_STD),
    "inception": ((127.5,) * 3, (127.5,) * 3),
}


def read_class_names(path: str | None, num_classes: int) -> tuple[str, ...]:
    """One name per line, or a JSON list; `class_<i>` without a file."""
    if path is None:
        return tuple(f"class_{i}" for i in range(num_classes))
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise weights.WeightsError(f"cannot read class names from {path!r}: {e.strerror or e}") from None
    names = (
        json.loads(text) if text.lstrip().startswith("[") else [line.strip() for line in text.splitlines()]
    )
    names = [str(n) for n in names if str(n)]
    if len(names) != num_classes:
        raise weights.WeightsError(
            f"{path!r} holds {len(names)} class names; the model has {num_classes} classes"
        )
    return tuple(names)


def convert_file(
    path: str,
    source: str,
    name: str,
    out: str,
    *,
    class_names: str | None = None,
    image_size: int = 224,
    eval_crop: float = 0.875,
    normalization: str = "imagenet",
    config_path: str | os.PathLike = DEFAULT_CONFIG,
) -> str:
    """Convert `path` and write the checkpoint under `out`; returns the checkpoint directory."""
    check_choice("--model", name, models.names())
    check_choice("--normalization", normalization, tuple(NORMALIZATIONS))
    if not 0.0 < eval_crop <= 1.0:
        raise weights.WeightsError(f"--eval_crop={eval_crop} must be in (0, 1]")
    existing = checkpoint.checkpoint_dir(out)
    if os.path.isdir(existing) and os.listdir(existing):
        raise weights.WeightsError(f"{out} already holds checkpoints; choose a new --out directory")
    variables = weights.convert(weights.load_state_dict(path), name, source)
    num_classes = int(variables["params"]["fc"]["kernel"].shape[-1])
    config = cli.load_config(config_path)
    config.model = name
    config.dataset = "tfds:imagenet2012"
    config.image_size = image_size
    info = data.DatasetInfo(
        name="imagenet2012",
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        mean=NORMALIZATIONS[normalization][0],
        std=NORMALIZATIONS[normalization][1],
        class_names=read_class_names(class_names, num_classes),
        num_train=IMAGENET_SIZES["train"],
        num_eval=IMAGENET_SIZES["eval"],
        eval_crop=eval_crop,
        augment="imagenet",
    )
    state = {"step": jnp.zeros((), jnp.int32), **variables}
    checkpoints = checkpoint.Checkpoints(out, keep=1, async_save=False)
    try:
        checkpoints.save(0, state, config=config, dataset_info=info)
    finally:
        checkpoints.close()
    return checkpoints.directory


def main(argv: list[str] | None = None) -> int:
    flag_values = flags.FlagValues()
    flags.DEFINE_enum(
        "from", "torchvision", tuple(weights.SOURCES), "Where the weights come from.", flag_values=flag_values
    )
    flags.DEFINE_string("model", None, "Registry name, e.g. resnet50.", flag_values=flag_values)
    flags.DEFINE_string(
        "out", None, "Directory to write (a workdir for evaluate/predict).", flag_values=flag_values
    )
    flags.mark_flags_as_required(["model", "out"], flag_values=flag_values)
    flags.DEFINE_string(
        "class_names", None, "Text file, one class name per line (or a JSON list).", flag_values=flag_values
    )
    flags.DEFINE_integer("image_size", 224, "Eval image size.", flag_values=flag_values)
    flags.DEFINE_float(
        "eval_crop", 0.875, "Resize to size / crop, then center-crop.", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "normalization", "imagenet", tuple(NORMALIZATIONS), "Input statistics.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "config", str(DEFAULT_CONFIG), "Base config (default: configs/default.py).", flag_values=flag_values
    )
    files = cli.parse(
        flag_values, argv, prog="python -m resnet_jax.convert", doc=__doc__, positional="WEIGHTS"
    )
    if len(files) != 1:
        cli.fail(
            "give one weights file: .pth, .pt, .bin, .safetensors or .npz "
            "(see python -m resnet_jax.convert --help)"
        )
    source, model, out = flag_values["from"].value, flag_values.model, flag_values.out

    def work() -> None:
        directory = convert_file(
            files[0],
            source,
            model,
            out,
            class_names=flag_values.class_names,
            image_size=flag_values.image_size,
            eval_crop=flag_values.eval_crop,
            normalization=flag_values.normalization,
            config_path=flag_values.config,
        )
        print(f"{source} {model} -> {directory}/0")
        print(f"  evaluate: python -m resnet_jax.evaluate --workdir {out}")
        print(f"  predict:  python -m resnet_jax.predict --workdir {out} IMAGE ...")
        print(f"  finetune: python train.py --config configs/finetune_folder.py --config.init_from={out} ...")

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
