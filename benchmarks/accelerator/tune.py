"""A/B runs of one train step under different XLA flags and batch sizes: one change at a time
against a baseline, each in a fresh process (XLA reads its flags once, at start-up).

    python benchmarks/accelerator/tune.py --out DIR [--budget_s 240] [--variant NAME=FLAGS[@BATCH] ...]

A variant is a name, the XLA flags it adds to the environment's `XLA_FLAGS` (or `--config.KEY=VALUE`
overrides of the step, passed to benchmark.py), and optionally its own per-device batch after `@`
(`batch512=@512`, `no_cmd_buffers=--xla_gpu_enable_command_buffer=`, `s2d=--config.space_to_depth_stem=True`).
Without `--variant` the defaults below run: the ones worth trying on an NVIDIA GPU. The baseline
runs first and again last, so that drift of the machine over the run shows as the gap between
the two. Variants that no longer fit the budget are skipped and listed. `DIR/tune.json` and
`DIR/tune.md` are rewritten after every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check import benchmark_command, child_environment, run_process, tables, with_xla_flags  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    flags: str = ""  # XLA flags, and --config.KEY=VALUE overrides of the step
    per_device_batch: int | None = None  # None: --per_device_batch_size

    def xla_flags(self) -> str:
        return " ".join(f for f in self.flags.split() if not f.startswith("--config."))

    def config_overrides(self) -> list[str]:
        return [f for f in self.flags.split() if f.startswith("--config.")]


# XLA's default command-buffer (CUDA graph) types in jaxlib 0.11: plain cuDNN convolutions are not
# among them, so every convolution of a ResNet splits the step's graphs.
DEFAULT_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,DYNAMIC_SLICE_FUSION"
# Candidates for ResNet-50 bfloat16 training on one Hopper GPU, each a single change, most
# promising first.
GPU_VARIANTS = (
    Variant("baseline"),
    # Fewer kernels and HBM bytes in the compiled program (docs/benchmarks.md, "The step's kernels,
    # counted on a CPU"): 1,179 -> 1,057 / 1,081 / 959 kernels per step at batch 256.
    Variant("bn_form_affine", "--config.bn_form=affine"),
    Variant("concatenated_grad_norm", "--config.grad_norm=concatenated"),
    Variant("affine_and_concatenated", "--config.bn_form=affine --config.grad_norm=concatenated"),
    # +0.4 % at batch 256 on an H200, but the step crashed at 512 (cuDNN status 5003 while tracing
    # the graph, jaxlib 0.11.2): kept as a candidate to re-measure, never as a default.
    Variant(
        "graphs_with_convolutions", f"--xla_gpu_enable_command_buffer={DEFAULT_COMMAND_BUFFERS},CONVOLUTION"
    ),
    Variant("batch_512", per_device_batch=512),
    Variant("no_command_buffers", "--xla_gpu_enable_command_buffer="),
    Variant("conv_as_fusions", "--xla_gpu_experimental_enable_conv_fusion=true"),
    Variant("latency_hiding_scheduler", "--xla_gpu_enable_latency_hiding_scheduler=true"),
    # Issue 31's memory-traffic variants, each the same model to float rounding (tested in float64).
    Variant("space_to_depth_stem", "--config.space_to_depth_stem=True"),
    # NVIDIA's 3 -> 4 channels: XLA hands cuDNN the stem convolution with C=3 as it is.
    Variant("pad_input_channels_4", "--config.pad_input_channels=4"),
    Variant("fold_bn", "--config.fold_bn=on"),
)
SMOKE_VARIANTS = (Variant("baseline"), Variant("batch_8", per_device_batch=8))


def parse_variant(text: str) -> Variant:
    """NAME=FLAGS[@BATCH] -> Variant; the error names the bad text and the form."""
    name, sep, rest = text.partition("=")
    flags, _, batch = rest.partition("@")
    if not sep or not name or (batch and not batch.isdigit()) or batch == "0":
        raise ValueError(f"--variant={text!r}: expected NAME=XLA_FLAGS[@PER_DEVICE_BATCH], e.g. big=@512")
    return Variant(name, flags.strip(), int(batch) if batch else None)


def run(args: argparse.Namespace, variants: list[Variant]) -> int:
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base_flags = os.environ.get("XLA_FLAGS", "")
    result: dict[str, Any] = {"command": sys.argv, "base_xla_flags": base_flags, "rows": [], "skipped": []}
    baseline = baseline_from(args) if args.baseline_json else None
    if baseline is not None:
        result["rows"].append(baseline)
        variants = [v for v in variants if v.name != "baseline"]
    elif variants[0].name == "baseline":
        variants = [*variants, Variant("baseline_again")]  # drift over the run, if the budget allows
    # Convolution and fusion autotuning results carry over between the variants' processes (same
    # shapes, same choices), which saves compile time and leaves the timed step as it is.
    (out / "autotune_cache").mkdir(exist_ok=True)
    autotune_cache = f"--xla_gpu_per_fusion_autotune_cache_dir={out / 'autotune_cache'}"
    longest = 0.0
    with open(out / "tune.log", "a") as log_file:
        for variant in variants:
            remaining = args.budget_s - (time.perf_counter() - start)
            if remaining < max(longest, 10):
                result["skipped"].append(variant.name)
                print(f"{variant.name}: skipped, {remaining:.0f}s of the budget left", flush=True)
                continue
            batch = variant.per_device_batch or args.per_device_batch_size
            path = out / "parts" / f"{variant.name}.json"
            path.unlink(missing_ok=True)
            env = with_xla_flags(child_environment(args.smoke), autotune_cache, variant.xla_flags())
            command = benchmark_command(
                [
                    f"--model={args.model}",
                    f"--image_size={args.image_size}",
                    f"--dtype={args.dtype}",
                    f"--per_device_batch_size={batch}",
                    f"--steps={args.steps}",
                    f"--warmup_steps={args.warmup_steps}",
                    *variant.config_overrides(),
                ],
                path,
            )
            print(f"{variant.name}: XLA_FLAGS={env['XLA_FLAGS']!r}, per-device batch {batch}", flush=True)
            status, seconds = run_process(command, remaining, log_file, env)
            longest = max(longest, seconds)
            row: dict[str, Any] = {"variant": variant.name, "flags": variant.flags, "status": status}
            if path.exists():
                row |= summary(json.loads(path.read_text())[0])
                print(f"  {row['images_per_sec_per_device']:.1f} img/s per device", flush=True)
            else:
                print(f"  {status} (see tune.log)", flush=True)
            result["rows"].append(row)
            (out / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
            (out / "tune.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


SUMMARY_KEYS = (
    "per_device_batch_size",
    "images_per_sec_per_device",
    "step_time_median_ms",
    "step_time_p90_ms",
    "compile_seconds",
    "mfu",
    "peak_memory_bytes",
)


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """The figures a tuning row keeps of a `benchmark.py` row."""
    return {key: row[key] for key in SUMMARY_KEYS}


def baseline_from(args: argparse.Namespace) -> dict[str, Any] | None:
    """The baseline row from an earlier `benchmark.py --json` file (the accelerator check's), so
    that a short slot is not spent measuring it twice; None (measure it) when it has none."""
    path = Path(args.baseline_json)
    if not path.exists():
        print(f"no {path}: measuring the baseline", flush=True)
        return None
    rows = json.loads(path.read_text())
    rows = rows if isinstance(rows, list) else rows.get("benchmark", [])  # benchmark.py's or check.json
    for row in rows:
        if (row["model"], row["mode"], row["dtype"], row["image_size"], row["per_device_batch_size"]) == (
            args.model,
            "train",
            args.dtype,
            args.image_size,
            args.per_device_batch_size,
        ):
            return {
                "variant": "baseline",
                "flags": "",
                "status": "ok",
                "source": args.baseline_json,
                **summary(row),
            }
    print(f"{path} has no train row of this configuration: measuring the baseline", flush=True)
    return None


def markdown(result: dict[str, Any]) -> str:
    baseline = next((r for r in result["rows"] if r["variant"] == "baseline" and r["status"] == "ok"), None)
    rows = []
    for r in result["rows"]:
        speed = r.get("images_per_sec_per_device")
        change = (
            f"{speed / baseline['images_per_sec_per_device'] - 1:+.1%}"
            if speed and baseline is not None
            else "-"
        )
        rows.append(
            [
                r["variant"],
                f"`{r['flags']}`" if r["flags"] else "",
                str(r.get("per_device_batch_size", "-")),
                f"{speed:.1f}" if speed else r["status"],
                change,
                f"{r['step_time_median_ms']:.1f}" if speed else "-",
                f"{r['compile_seconds']:.1f}" if speed else "-",
                f"{r['mfu']:.1%}" if speed and r.get("mfu") else "-",
            ]
        )
    lines = tables.markdown(
        [
            "variant",
            "XLA flags added",
            "batch/dev",
            "img/s/dev",
            "vs baseline",
            "median ms",
            "compile s",
            "MFU",
        ],
        rows,
    )
    if result["skipped"]:
        lines.append(f"\nSkipped for the budget: {', '.join(result['skipped'])}")
    return (
        f"# Tuning runs\n\nBase XLA_FLAGS: `{result['base_xla_flags'] or '(none)'}`\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget_s", type=float, default=240.0)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--per_device_batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], help="NAME=XLA_FLAGS[@PER_DEVICE_BATCH]")
    parser.add_argument("--baseline_json", help="take the baseline row from this benchmark.py or check.json")
    parser.add_argument("--smoke", action="store_true", help="ResNet-20 at 8 px: seconds on a CPU")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        parser.error(str(e))
    if args.smoke:
        args.model, args.image_size, args.per_device_batch_size, args.steps, args.warmup_steps = (
            "resnet20",
            8,
            4,
            2,
            1,
        )
    variants = variants or list(SMOKE_VARIANTS if args.smoke else GPU_VARIANTS)
    return run(args, variants)


if __name__ == "__main__":
    sys.exit(main())
