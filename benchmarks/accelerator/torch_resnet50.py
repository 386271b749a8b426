"""torchvision's ResNet train step, timed the way `benchmark.py` times ours: the PyTorch side of the
accelerator check.

    python benchmarks/accelerator/torch_resnet50.py --batch_size 256 --modes eager,compile --json t.json

The work matches our step (`resnet_jax.step.train_step` with `configs/default.py`'s recipe): a
synthetic uint8 NHWC batch already on the device, normalised on the device, the forward pass in
bfloat16 autocast with channels_last memory, softmax cross-entropy, backward, and SGD with Nesterov
momentum 0.9 and weight decay 1e-4 on convolution and linear weights only. Ours also computes the
gradient norm and top-1/top-5 accuracy, which this step does not. PyTorch gets its fast paths:
`cudnn.benchmark`, the fused SGD kernel where PyTorch has it, and `torch.compile` of the model.

Each step's time is the interval between CUDA events recorded after consecutive steps (the host
queues ahead, as JAX's asynchronous dispatch does). One JSON row per mode; the file is rewritten
after each mode, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
MODES = ("eager", "compile")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_optimizer(torch: Any, model: Any, lr: float, weight_decay: float) -> tuple[Any, str]:
    """SGD with Nesterov momentum; decay on conv and linear weights only (our `weight_decay_mask`)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for implementation in ("fused", "foreach"):
        try:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, **{implementation: True})
            return optimizer, implementation
        except (TypeError, RuntimeError, ValueError):  # no fused SGD in this PyTorch or on this device
            continue
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True), "for-loop"


def time_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import torch
    import torchvision

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, args.model)(num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer, implementation = make_optimizer(torch, model, lr=0.1, weight_decay=1e-4)
    forward = torch.compile(model) if mode == "compile" else model
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)

    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def step() -> Any:
        # NHWC uint8 viewed as NCHW is already channels_last; the float copy keeps that layout.
        x = (images.permute(0, 3, 1, 2).float() - mean) / std
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)):
            loss = torch.nn.functional.cross_entropy(forward(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first_loss = float(step())  # compiles under torch.compile; picks cuDNN algorithms either way
    synchronize()
    first_step_seconds = time.perf_counter() - start
    log(f"  {mode}: first step {first_step_seconds:.1f}s (loss {first_loss:.3f})")
    for _ in range(args.warmup_steps):
        step()
    synchronize()

    seconds: list[float] = []
    if cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        events[0].record()
        for i in range(args.steps):
            step()
            events[i + 1].record()
        synchronize()
        seconds = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(args.steps)]
    else:
        last = time.perf_counter()
        for _ in range(args.steps):
            step()
            now = time.perf_counter()
            seconds.append(now - last)
            last = now
    times = np.asarray(seconds)
    mean_seconds = float(times.mean())
    return {
        "framework": "pytorch",
        "mode": mode,
        "model": f"torchvision.{args.model}",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "optimizer": f"SGD nesterov ({implementation})",
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "images_per_sec": args.batch_size / mean_seconds,
        "step_time_median_ms": float(np.median(times)) * 1e3,
        "step_time_p90_ms": float(np.percentile(times, 90)) * 1e3,
        "step_time_mean_ms": mean_seconds * 1e3,
        "first_step_seconds": first_step_seconds,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision.models constructor")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--modes", default="eager,compile", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--modes={args.modes!r}: choose from {', '.join(MODES)}")
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as e:
        print(f"error: PyTorch and torchvision are needed: {e}", file=sys.stderr)
        return 2
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for mode in modes:
        log(f"torchvision {args.model} {mode}, batch {args.batch_size}, {args.image_size}px, {args.dtype}")
        rows.append(time_mode(args, mode))
        row = rows[-1]
        log(f"  {mode}: {row['images_per_sec']:.1f} img/s, median {row['step_time_median_ms']:.1f} ms")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
