"""Will this host keep up? `loader_benchmark --feed`: each input pipeline's images/s per core against
the train step's images/s on a target, and the cores it takes to feed that step.

The step's rate is measured on this host's devices (`here`, or a named target of this host's
accelerator), else it is the preflight's roofline bound for the target, an upper limit, compiled
on the CPU or read from `preflight --json`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

from resnet_jax import targets

HERE = "here"  # --feed: this host's own devices, measured
FEED_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "imagenet_resnet50.py")


def per_core_rates(rows: Sequence[dict[str, Any]], cores: int) -> dict[str, float]:
    """Each pipeline's best images/s over the worker counts tried, divided by the cores it ran on."""
    best: dict[str, float] = {}
    for r in rows:
        label = f"{r['kind']} {r['image_size']}px"
        if r["kind"] != "cifar":
            label += f", {r['source']}, {r['loader']}, {r['decode']} decode"
        best[label] = max(best.get(label, 0.0), r["images_per_sec"] / cores)
    return best


def check_feed_targets(names: Sequence[str]) -> None:
    """One line for an unknown target, before anything is measured."""
    for name in names:
        if name != HERE:
            targets.target(name)


def measured_step_rate(config: Any, devices: int) -> float:
    """The train step's images/s per device on this host's devices (batches made on the devices)."""
    from resnet_jax import benchmark

    options = benchmark.Options(
        models=(config.model,),
        per_device_batch_sizes=(max(1, config.batch_size // devices),),
        image_sizes=(config.image_size,),
        dtypes=(config.dtype,),
        steps=10,
        warmup_steps=2,
    )
    (row,) = benchmark.run(options, config)
    return row["images_per_sec_per_device"]


def step_rates(
    names: Sequence[str], config: Any, preflight_json: str | None = None
) -> dict[str, dict[str, Any]]:
    """Per target: the train step's images/s and where the figure comes from. Measured on this
    host's devices for `here` and for targets of this host's accelerator; else the preflight's
    roofline bound (from `preflight_json`, or compiled now for the target on the CPU)."""
    import jax

    local_devices = jax.local_devices()
    local = (
        None
        if local_devices[0].platform == "cpu"
        else targets.accelerator_for_kind(local_devices[0].device_kind)
    )
    known = {}
    if preflight_json:
        with open(preflight_json) as f:
            known = {row["target"]: row for row in json.load(f)["targets"]}
    rates, to_compile = {}, []
    per_device = None
    for name in names:
        target = None if name == HERE else targets.target(name)
        if target is None or target.accelerator == local:
            if per_device is None:
                per_device = measured_step_rate(config, len(local_devices))
            count = len(local_devices) if target is None else target.devices
            rates[name] = {
                "images_per_sec": per_device * count,
                "from": f"the step measured here ({local_devices[0].device_kind}) x {count} device(s)",
                "label": "measured",
            }
        elif target.name in known:
            rates[name] = roofline_rate(known[target.name], f"--preflight_json {preflight_json}")
        else:
            to_compile.append(name)
    if to_compile:
        from resnet_jax import preflight

        with warnings.catch_warnings():  # JAX warns of any fork; the preflight's is a fork + exec
            warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
            compiled = preflight.preflight(config, to_compile, compile_eval=False)
        for name, row in zip(to_compile, compiled, strict=True):
            rates[name] = roofline_rate(row, "the preflight")
    return rates


def roofline_rate(row: dict[str, Any], where: str) -> dict[str, Any]:
    bound = row.get("roofline_bound") or "roofline"
    return {
        "images_per_sec": row["roofline_images_per_sec"],
        "from": f"roofline bound ({bound}) from {where}, an upper limit, not measured",
        "label": f"bound ({bound})",
    }


def feed_table(
    per_core: dict[str, float], rates: dict[str, dict[str, Any]], host_cores: int
) -> tuple[str, list[dict[str, Any]]]:
    """The cores each pipeline needs to feed each target's step, against this host's cores."""
    lines = [
        "| pipeline | images/s per core | target | step images/s | cores to feed it | keeps up "
        f"({host_cores} cores here) |",
        "|---|---:|---|---:|---:|---|",
    ]
    rows = []
    for pipeline, rate in per_core.items():
        for name, step in rates.items():
            images = step["images_per_sec"]
            needed = math.ceil(images / rate) if images else None
            if needed is None:
                keeps_up = "-"
            else:
                keeps_up = "yes" if needed <= host_cores else f"no, {needed - host_cores:,} short"
            rows.append(
                {
                    "pipeline": pipeline,
                    "images_per_sec_per_core": rate,
                    "target": name,
                    "images_per_sec": images,
                    "from": step["from"],
                    "cores_needed": needed,
                    "host_cores": host_cores,
                }
            )
            lines.append(
                f"| {pipeline} | {rate:,.0f} | {name} | "
                f"{'-' if not images else f'{images:,.0f}'} {step['label']} | "
                f"{'-' if needed is None else f'{needed:,}'} | {keeps_up} |"
            )
    notes = [f"{name}: {step['from']}" for name, step in rates.items()]
    return "\n".join([*lines, "", *notes]), rows
