"""Our train step against a plain `jax.jit` step of the same maths, side by side in one run (CPU).

The reference is written here from the papers (He et al. 2015, "Deep Residual
Learning"; v1.5 puts the stride on the bottleneck's 3x3): a Flax Linen ResNet
in the style of the Flax ImageNet example, 'SAME' padding, and a step that does
only what the maths needs: normalise, forward, cross-entropy, gradients, SGD
with Nesterov momentum and weight decay on kernels, BatchNorm statistics.
Ours is `compiled_steps.CompiledSteps`' step on the `configs/default.py` recipe (the same
optimizer) as `benchmark.py` times it, with its extras (metrics, finite checks).

The two are timed in alternating rounds so that a change in the machine's load
hits both alike; `vs ref` is the median over rounds of the reference's median
step time over ours in the same round (above 1: ours is faster). `CPU s/step`
and `compile CPU s` are this process's CPU time (all threads), which other load
on the machine moves much less than wall time. If PyTorch is
importable, the same network in eager PyTorch is timed too, for context (torch
is not a dependency of the project); its `vs ref` compares whole-run medians.

    python benchmarks/compare_cpu.py [--configs resnet18_32,resnet56_32,resnet50_224] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # noqa: E402
from resnet_jax import benchmark, costs, data, models, parallel, step_timing  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
    model: str
    image_size: int
    batch_size: int
    num_classes: int
    rounds: int  # alternating timed rounds of `steps` steps each
    steps: int
    # The reference network: stage depths, bottleneck or basic blocks, stem and first width.
    stages: tuple[int, ...]
    bottleneck: bool
    cifar: bool


SETUPS = {
    "resnet18_32": Setup("resnet18", 32, 128, 1000, 5, 2, (2, 2, 2, 2), False, False),
    "resnet56_32": Setup("resnet56", 32, 128, 10, 4, 2, (9, 9, 9), False, True),
    # About 23 s a step on two cores: few steps.
    "resnet50_224": Setup("resnet50", 224, 16, 1000, 3, 1, (3, 4, 6, 3), True, False),
}
(MEAN, *_), (STD, *_) = data.SYNTHETIC_STATS  # what the synthetic dataset reports, uint8 units

# ---------------------------------------------------------------- the reference, in Flax


class ReferenceBlock(nn.Module):
    """A residual unit: F(x) + shortcut(x), then ReLU; the last BN of F starts at zero scale."""

    width: int
    stride: int
    bottleneck: bool
    pad_shortcut: bool  # CIFAR option A: subsample and zero-pad channels instead of a 1x1 conv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False)
        s = (self.stride, self.stride)
        if self.bottleneck:
            out_width = 4 * self.width
            f = nn.relu(norm()(conv(self.width, (1, 1))(x)))
            f = nn.relu(norm()(conv(self.width, (3, 3), s)(f)))
            f = norm(scale_init=nn.initializers.zeros)(conv(out_width, (1, 1))(f))
        else:
            out_width = self.width
            f = nn.relu(norm()(conv(self.width, (3, 3), s)(x)))
            f = norm(scale_init=nn.initializers.zeros)(conv(self.width, (3, 3))(f))
        if self.stride != 1 or x.shape[-1] != out_width:
            if self.pad_shortcut:
                x = x[:, :: self.stride, :: self.stride, :]
                missing = out_width - x.shape[-1]
                x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)])
            else:
                x = norm()(conv(out_width, (1, 1), s)(x))
        return nn.relu(f + x)


class ReferenceResNet(nn.Module):
    stages: Sequence[int]
    bottleneck: bool
    cifar: bool
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        if self.cifar:
            width = 16
            x = nn.relu(norm()(nn.Conv(width, (3, 3), use_bias=False)(x)))
        else:
            width = 64
            x = nn.Conv(width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
            x = nn.relu(norm()(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, depth in enumerate(self.stages):
            for unit in range(depth):
                stride = 2 if stage > 0 and unit == 0 else 1
                x = ReferenceBlock(width * 2**stage, stride, self.bottleneck, self.cifar)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def reference_step(state: dict, batch: dict, model: nn.Module, tx: optax.GradientTransformation):
    images = (batch["image"].astype(jnp.float32) - MEAN) / STD

    def loss(params):
        logits, changed = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]}, images, mutable=["batch_stats"]
        )
        log_p = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_p, batch["label"][:, None], axis=1).mean()
        return nll, changed["batch_stats"]

    (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, value


def compile_reference(setup: Setup, batch: dict) -> step_timing.TimedStep:
    """Initialise and compile the reference step, timed like `step_timing.compile_step`."""
    model = ReferenceResNet(setup.stages, setup.bottleneck, setup.cifar, setup.num_classes)
    decay_kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(
        optax.add_decayed_weights(1e-4, mask=decay_kernels), optax.sgd(0.1, momentum=0.9, nesterov=True)
    )
    shape = (1, setup.image_size, setup.image_size, 3)

    def init(key):
        variables = model.init(key, jnp.zeros(shape), train=False)
        params = variables["params"]
        return {"params": params, "batch_stats": variables["batch_stats"], "opt_state": tx.init(params)}

    t0 = time.perf_counter()
    state = jax.block_until_ready(jax.jit(init)(jax.random.key(0)))
    t1, cpu1 = time.perf_counter(), time.process_time()
    lowered = jax.jit(functools.partial(reference_step, model=model, tx=tx), donate_argnums=0).lower(
        state, batch
    )
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3, cpu3 = time.perf_counter(), time.process_time()
    return step_timing.TimedStep(
        step=compiled,
        state=state,
        batches=itertools.repeat(batch),
        compiled=compiled,
        flops_per_device=costs.step_flops_per_device(lowered, 1),
        num_params=models.param_count(state["params"]),
        init_seconds=t1 - t0,
        lowering_seconds=t2 - t1,
        xla_compile_seconds=t3 - t2,
        compile_cpu_seconds=cpu3 - cpu1,
    )


def compile_ours(setup: Setup, options: benchmark.Options, mesh: jax.sharding.Mesh):
    case = benchmark.Case(setup.model, setup.image_size, "float32", setup.batch_size)
    config = benchmark.case_config(default.get_config(), case, options)
    dataset = data.load_synthetic(setup.image_size)
    dataset = dataclasses.replace(
        dataset, info=dataclasses.replace(dataset.info, num_classes=setup.num_classes)
    )
    return step_timing.compile_step(config, dataset, mesh, seed=options.seed), config


# ---------------------------------------------------------------- PyTorch, for context


def time_torch(setup: Setup, steps: int) -> dict[str, Any] | None:
    """The same network trained in eager PyTorch (NCHW); None when torch is not importable."""
    try:
        import torch
        from torch import nn as tnn
    except ImportError:
        return None

    class Unit(tnn.Module):
        def __init__(self, cin, width, stride, bottleneck, pad_shortcut):
            super().__init__()
            out = 4 * width if bottleneck else width
            if bottleneck:
                layers = [(cin, width, 1, 1), (width, width, 3, stride), (width, out, 1, 1)]
            else:
                layers = [(cin, width, 3, stride), (width, width, 3, 1)]
            self.convs = tnn.ModuleList(tnn.Conv2d(i, o, k, s, k // 2, bias=False) for i, o, k, s in layers)
            self.norms = tnn.ModuleList(tnn.BatchNorm2d(o) for _, o, _, _ in layers)
            tnn.init.zeros_(self.norms[-1].weight)
            self.stride, self.pad_shortcut, self.out = stride, pad_shortcut, out
            self.project = None
            if (stride != 1 or cin != out) and not pad_shortcut:
                self.project = tnn.Sequential(
                    tnn.Conv2d(cin, out, 1, stride, bias=False), tnn.BatchNorm2d(out)
                )

        def forward(self, x):
            f = x
            for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
                f = norm(conv(f))
                if i < len(self.convs) - 1:
                    f = torch.relu(f)
            if self.project is not None:
                x = self.project(x)
            elif self.stride != 1 or x.shape[1] != self.out:
                x = x[:, :, :: self.stride, :: self.stride]
                missing = self.out - x.shape[1]
                x = tnn.functional.pad(x, (0, 0, 0, 0, missing // 2, missing - missing // 2))
            return torch.relu(f + x)

    width = 16 if setup.cifar else 64
    if setup.cifar:
        stem = [tnn.Conv2d(3, width, 3, 1, 1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU()]
    else:
        stem = [tnn.Conv2d(3, width, 7, 2, 3, bias=False), tnn.BatchNorm2d(width), tnn.ReLU()]
        stem.append(tnn.MaxPool2d(3, 2, 1))
    units, cin = [], width
    for stage, depth in enumerate(setup.stages):
        for unit in range(depth):
            stride = 2 if stage > 0 and unit == 0 else 1
            units.append(Unit(cin, width * 2**stage, stride, setup.bottleneck, setup.cifar))
            cin = units[-1].out
    net = tnn.Sequential(
        *stem, *units, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, setup.num_classes)
    )
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    gen = torch.Generator().manual_seed(0)
    size = setup.image_size
    images = torch.randint(0, 256, (setup.batch_size, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, setup.num_classes, (setup.batch_size,), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tnn.functional.cross_entropy(net((images.float() - MEAN) / STD), labels)
        loss.backward()
        opt.step()

    step()  # warmup
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    cpu_seconds_per_step = (time.process_time() - cpu0) / steps
    seconds = np.asarray(times)
    return {
        "implementation": f"PyTorch {torch.__version__} eager",
        "images_per_sec": setup.batch_size / seconds.mean(),
        "step_time_median_ms": float(np.median(seconds)) * 1e3,
        "step_time_p90_ms": float(np.percentile(seconds, 90)) * 1e3,
        "compile_seconds": None,
        "flops_per_image": None,
        "cpu_seconds_per_step": cpu_seconds_per_step,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the comparison


def compare(setup: Setup, mesh: jax.sharding.Mesh, with_torch: bool) -> list[dict[str, Any]]:
    options = benchmark.Options(
        models=(setup.model,),
        batch_sizes=(setup.batch_size,),
        image_sizes=(setup.image_size,),
        steps=setup.rounds * setup.steps,
        warmup_steps=1,
    )
    benchmark.progress(f"{setup.model} {setup.image_size}px batch {setup.batch_size}: compiling ours")
    ours, config = compile_ours(setup, options, mesh)
    batch = next(ours.batches)
    ours.batches = itertools.chain([batch], ours.batches)
    benchmark.progress("    compiling the reference")
    reference = compile_reference(setup, batch)
    for compiled in (ours, reference):
        compiled.run(1)  # warmup
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    cpu_seconds = {"ours": 0.0, "reference": 0.0}
    round_ratios = []
    for r in range(setup.rounds):
        benchmark.progress(f"    round {r + 1}/{setup.rounds}: {setup.steps} step(s) each")
        round_times = {}
        for key, compiled in (("ours", ours), ("reference", reference)):
            cpu0 = time.process_time()
            round_times[key] = compiled.run(setup.steps)
            cpu_seconds[key] += time.process_time() - cpu0
            times[key] += round_times[key]
        round_ratios.append(np.median(round_times["reference"]) / np.median(round_times["ours"]))
    case = benchmark.Case(setup.model, setup.image_size, "float32", setup.batch_size)
    rows = [
        {
            "implementation": name,
            **benchmark.figures(case, compiled, times[key], options, config, mesh),
            "speed_vs_reference": ratio,
            "cpu_seconds_per_step": cpu_seconds[key] / len(times[key]),
        }
        for name, key, compiled, ratio in (
            ("resnet_jax train step", "ours", ours, float(np.median(round_ratios))),
            ("reference jax.jit step", "reference", reference, 1.0),
        )
    ]
    if with_torch:
        benchmark.progress("    PyTorch")
        torch_row = time_torch(setup, setup.rounds * setup.steps)
        if torch_row is not None:
            torch_row["speed_vs_reference"] = (
                rows[1]["step_time_median_ms"] / torch_row["step_time_median_ms"]
            )
            rows.append(
                {**{k: rows[0][k] for k in ("model", "image_size", "batch_size", "dtype")}, **torch_row}
            )
    return rows


def optional(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


COLUMNS = [
    ("config", lambda r: f"{r['model']} {r['image_size']}px b{r['batch_size']}"),
    ("implementation", lambda r: r["implementation"]),
    ("img/s", lambda r: f"{r['images_per_sec']:.1f}"),
    ("median ms", lambda r: f"{r['step_time_median_ms']:.0f}"),
    ("p90 ms", lambda r: f"{r['step_time_p90_ms']:.0f}"),
    ("vs ref", lambda r: f"{r['speed_vs_reference']:.2f}x"),
    ("CPU s/step", lambda r: optional(r.get("cpu_seconds_per_step"), "{:.1f}")),
    ("compile s", lambda r: optional(r["compile_seconds"], "{:.1f}")),
    ("compile CPU s", lambda r: optional(r.get("compile_cpu_seconds"), "{:.1f}")),
    ("GFLOP/img", lambda r: "-" if not r["flops_per_image"] else f"{r['flops_per_image'] / 1e9:.3f}"),
]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[title for title, _ in COLUMNS]] + [[cell(r) for _, cell in COLUMNS] for r in rows]
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    lines.insert(1, "|" + "---|" * len(COLUMNS))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch figure")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    jax.config.update("jax_enable_compilation_cache", False)  # compile times from scratch
    mesh = parallel.create_mesh()
    rows = []
    for name in names:
        load_before = os.getloadavg()[0]
        for row in compare(SETUPS[name], mesh, not args.no_torch):
            rows.append({**row, "load_average": (load_before, os.getloadavg()[0])})
    env = benchmark.environment(list(mesh.devices.flat))
    print(markdown_table(rows))
    loads = [x for row in rows for x in row["load_average"]]
    print(
        f"\n{env['device_count']} x {env['device_kind']}, {os.cpu_count()} cores, jax {env['jax_version']}; "
        f"1-minute load average {min(loads):.1f} to {max(loads):.1f} during the run"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
