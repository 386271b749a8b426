"""Classify image files with a trained checkpoint.

    python -m resnet_jax.predict --workdir DIR [--checkpoint best|latest|STEP] [--top_k 5] [--json] IMAGE ...

Class names come from the checkpoint, so predictions map back to the dataset's labels.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import numpy as np

from resnet_jax import augment, checkpoint
from resnet_jax.inference import load_trained
from resnet_jax.step import eval_logits


def predict_files(workdir: str, paths: list[str], which: str = "latest", top_k: int = 5) -> list[dict]:
    trained = load_trained(workdir, which)
    info = trained.info
    height, _, channels = info.image_shape
    images = []
    for path in paths:
        try:
            image = augment.decode_image(path, channels)
        except (OSError, ValueError) as e:
            raise checkpoint.CheckpointError(f"cannot read image {path!r}: {e}") from None
        images.append(augment.resize_shorter_and_center_crop(image, height, info.eval_crop))
    logits = jax.jit(functools.partial(eval_logits, model=trained.model, mean=info.mean, std=info.std))(
        trained.state, np.stack(images)
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
    parser = argparse.ArgumentParser(prog="python -m resnet_jax.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="latest", help="best, latest or a step number")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    try:
        results = predict_files(args.workdir, args.images, args.checkpoint, args.top_k)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for result in results:
        ranked = ", ".join(f"{c['class']} {c['probability']:.1%}" for c in result["top_k"])
        print(f"{result['image']}: {ranked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
