"""Classify image files with a trained checkpoint.

    python -m resnet_jax.predict --workdir DIR [--checkpoint best|latest|STEP] [--top_k 5] [--json] \\
        IMAGE|FOLDER ...

Class names come from the checkpoint, so predictions map back to the dataset's labels. Folders are
searched for image files; a file that cannot be read is skipped with a warning (the exit status is
non-zero only when no image could be classified).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import numpy as np
import PIL.Image
from absl import flags

from resnet_jax import augment, cli, data, progress, sources
from resnet_jax.errors import ImageError
from resnet_jax.inference import load_trained
from resnet_jax.step import eval_logits


def image_files(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(image files, problems): the inputs with folders searched as dataset folders are, every file
    checked to open as an image. Done before the checkpoint loads, so that a typo costs nothing."""
    candidates, problems = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sources.image_files_under(item)
            if not found:
                problems.append(f"{item!r}: no image files ({', '.join(sources.IMAGE_EXTENSIONS)})")
            candidates += found
        elif not os.path.exists(item):
            problems.append(f"{item!r}: no such file or folder")
        else:
            candidates.append(item)
    files = []
    for path in candidates:
        try:
            with PIL.Image.open(path) as image:
                image.verify()
            files.append(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
            problems.append(f"{path!r}: not a readable image ({e})")
    return files, problems


def read_images(paths: list[str], info: data.DatasetInfo) -> np.ndarray:
    """Decode, resize and center-crop image files as evaluation does; `ImageError` names a bad file."""
    height, _, channels = info.eval_image_shape
    images = []
    for path in paths:
        try:
            image = augment.decode_image(path, channels)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read image {path!r}: {e}") from None
        images.append(augment.resize_shorter_and_center_crop(image, height, info.eval_crop))
    return np.stack(images)


def predict_files(workdir: str, paths: list[str], which: str = "latest", top_k: int = 5) -> list[dict]:
    """Top-k classes of each image file (all readable: see `image_files`)."""
    trained = load_trained(workdir, which)
    info = trained.info
    images = read_images(paths, info)
    logits = jax.jit(functools.partial(eval_logits, model=trained.model, mean=info.mean, std=info.std))(
        trained.state, images
    )
    probabilities = np.asarray(jax.nn.softmax(logits))
    k = min(top_k, info.num_classes)
    results = []
    for path, p in zip(paths, probabilities, strict=True):
        best = np.argsort(-p)[:k]
        results.append(
            {
                "image": path,
                "step": trained.step,
                "top_k": [
                    {"class": info.class_names[i], "index": int(i), "probability": float(p[i])} for i in best
                ],
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    flag_values = flags.FlagValues()
    cli.define_workdir(flag_values, "Training workdir (or `python -m resnet_jax.convert` output).")
    cli.define_checkpoint(flag_values)
    flags.DEFINE_integer("top_k", 5, "Classes to show per image.", flag_values=flag_values)
    flags.DEFINE_bool("json", False, "Print JSON instead of text.", flag_values=flag_values)
    paths = cli.parse(
        flag_values, argv, prog="python -m resnet_jax.predict", doc=__doc__, positional="IMAGE|FOLDER ..."
    )
    if not paths:
        cli.fail("no IMAGE given (see python -m resnet_jax.predict --help)")

    def work() -> None:
        files, problems = image_files(paths)
        for problem in problems:
            progress.warn(f"skipped {problem}")
        if not files:
            raise ImageError(f"none of the {len(paths)} input(s) holds a readable image; nothing to classify")
        if problems:
            progress.warn(f"{len(problems)} input(s) skipped; classifying {len(files)} image(s)")
        results = predict_files(flag_values.workdir, files, flag_values.checkpoint, flag_values.top_k)
        if flag_values.json:
            print(json.dumps(results, indent=1))
            return
        for result in results:
            ranked = ", ".join(f"{c['class']} {c['probability']:.1%}" for c in result["top_k"])
            print(f"{result['image']}: {ranked}")

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
