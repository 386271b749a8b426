"""docs/preflight.md's table: `python -m resnet_jax.preflight --max_batch` for every reference config
on the slices and hosts people rent most, one command per config.

    python benchmarks/preflight_table.py --out runs/preflight_table [--configs digits,cifar10_resnet20]

Writes DIR/CONFIG.json (the preflight's own JSON) and prints the markdown table (DIR/table.md).
Every ResNet-50 compile for a TPU takes 1-2 minutes on a 2-core CPU; the whole table takes hours
there, so `--max_batch_compiles` bounds the search per target (3 by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("v5e-8", "v5p-8", "v4-8", "a100-80gbx8", "h100x8")
CONFIGS = (
    "digits",
    "cifar10_resnet20",
    "cifar10_resnet56",
    "cifar10_resnet110",
    "cifar10_resnet18",
    "default",
    "imagenet_resnet50",
    "imagenet_resnet50_lars",
    "imagenet_resnet50_strong",
    "finetune_folder",
)
# Configs whose dataset is a folder that is not here: compile for ImageNet's 1000 classes.
EXTRA_ARGS = {"finetune_folder": ("--num_classes=1000",)}
# A TPU compile of ResNet-50 takes 1-2 minutes here: the TPU max-batch search runs for these only.
MAX_BATCH_ON_TPU = ("digits", "cifar10_resnet20", "imagenet_resnet50")


def run(config: str, out: Path, compiles: int, evaluate: bool) -> list[dict]:
    """The preflight's rows for `config`: GPU targets with --max_batch, TPU targets with it where
    MAX_BATCH_ON_TPU says (two commands, so that each platform gets its own search)."""
    rows = []
    for platform in ("gpu", "tpu"):
        chosen = [t for t in TARGETS if (t[0] == "v") == (platform == "tpu")]
        path = out / f"{config}.{platform}.json"
        search = platform == "gpu" or config in MAX_BATCH_ON_TPU
        if not path.exists():
            command = [
                sys.executable,
                "-m",
                "resnet_jax.preflight",
                f"--config={ROOT / 'configs' / (config + '.py')}",
                *(f"--target={t}" for t in chosen),
                *(("--max_batch", f"--max_batch_compiles={compiles}") if search else ()),
                *(() if evaluate else ("--noeval",)),
                f"--json={path}",
                *EXTRA_ARGS.get(config, ()),
            ]
            start = time.perf_counter()
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            print(
                f"{config} ({platform}): exit {result.returncode} in {seconds:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            if not path.exists():
                raise SystemExit(f"{config}: no JSON; stderr:\n{result.stderr[-2000:]}")
        rows += json.loads(path.read_text())["targets"]
    return rows


def cell(row: dict) -> str:
    if row["verdict"] == "does not compile":
        return "does not compile"
    memory = f"{row['bytes_per_device'] / 2**30:.1f} GiB" if row["bytes_per_device"] else "-"
    verdict = "fits" if row["verdict"] == "fits" else row["verdict"]
    largest, miss = row["max_batch"], row["first_batch_that_does_not_fit"]
    if largest is None and miss is None:
        return f"{memory}, {verdict}"
    top = "-" if largest is None else f"{largest:,}" + ("" if miss else "+")
    return f"{memory}, {verdict}, max {top}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/preflight_table")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--max_batch_compiles", type=int, default=3)
    parser.add_argument("--noeval", dest="eval", action="store_false", help="compile the train steps only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| config (global batch) | " + " | ".join(TARGETS) + " |",
        "| --- |" + " --- |" * len(TARGETS),
    ]
    for config in args.configs.split(","):
        rows = {r["target"]: r for r in run(config, out, args.max_batch_compiles, args.eval)}
        batch = next(iter(rows.values()))["batch_size"]
        lines.append(f"| `{config}` ({batch:,}) | " + " | ".join(cell(rows[t]) for t in TARGETS) + " |")
        (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
