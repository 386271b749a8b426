"""Resuming a run: the newest good checkpoint of the workdir, checked against the config, or a
fresh state (from pretrained weights when fine-tuning); the config keys behind a changed state
layout, and a changed learning-rate schedule, said in one line each.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import ml_collections
import numpy as np

from resnet_jax import checkpoint, data, finetune, optim, parallel
from resnet_jax.compiled_steps import CompiledSteps, abstract_state
from resnet_jax.config_checks import complete_config
from resnet_jax.progress import log
from resnet_jax.step import TrainState, rng_key


def with_saved_values(
    config: ml_collections.ConfigDict, saved: dict[str, Any], keys: list[str]
) -> ml_collections.ConfigDict:
    """`config` with `keys` set back to their values in the saved config (JSON), completed and typed."""
    return complete_config(ml_collections.ConfigDict({**config.to_dict(), **{k: saved[k] for k in keys}}))


def keys_behind_layout(
    saved: dict[str, Any],
    saved_layout: checkpoint.Layout,
    config: ml_collections.ConfigDict,
    steps: CompiledSteps,
) -> list[str]:
    """The changed config keys that, set back to their saved values, give the saved state's layout:
    each alone if one does, else all of them together if that does, else none."""

    def layout_with(keys: list[str]) -> checkpoint.Layout | None:
        try:
            candidate = with_saved_values(config, saved, keys)
            return checkpoint.leaf_layout(abstract_state(candidate, steps.info, steps.platform))
        except Exception:  # a saved value this code no longer accepts
            return None

    changed = checkpoint.changed_keys(saved, config)
    alone = [key for key in changed if layout_with([key]) == saved_layout]
    if alone or not changed:
        return alone
    return changed if layout_with(changed) == saved_layout else []


def restore_or_init(
    steps: CompiledSteps,
    checkpoints: checkpoint.Checkpoints,
    batches: Any,
    pretrained: finetune.Pretrained | None = None,
) -> tuple[TrainState, int]:
    """The latest good checkpoint of the workdir (checked against the config), or a fresh state."""
    config = steps.config
    key = rng_key(config.seed)
    abstract = checkpoint.with_sharding(jax.eval_shape(steps.init, key), parallel.replicated(steps.mesh))
    restored = checkpoints.restore_latest(
        abstract,
        batches,
        config,
        explain_layout=lambda saved, layout: keys_behind_layout(saved, layout, config, steps),
    )
    if restored is None:
        state = steps.init(key)
        if pretrained is not None:  # fine-tuning; a checkpoint of this workdir takes precedence
            state = finetune.start_from_pretrained(state, pretrained, steps.tx, log)
        return state, 0
    step, items = restored
    log(f"resumed from the checkpoint of step {step} in {checkpoints.directory}")
    for change in items["config_changes"]:
        log(f"  config changed since that checkpoint: {change}")
    if line := schedule_change(items["config"], config, steps.info, step):
        log(f"  {line}")
    return items["state"], step


def schedule_change(
    saved: dict[str, Any], config: ml_collections.ConfigDict, info: data.DatasetInfo, step: int
) -> str | None:
    """One line when the resumed run's learning-rate schedule differs from the saved run's at `step`:
    the keys that changed it, the rate before and after, and the new length (a finished run that is
    extended does not go on from its last rate; its schedule is stretched over the new length)."""

    def rate(cfg: ml_collections.ConfigDict) -> tuple[float, int]:
        sizes = parallel.run_sizes(cfg, info.num_train)
        schedule = optim.create_schedule(cfg, sizes.steps_per_epoch, sizes.total_steps)
        return float(schedule(step)), sizes.total_steps

    try:
        before = complete_config(ml_collections.ConfigDict(saved))
        (old, old_total), (new, new_total) = rate(before), rate(config)
    except Exception:  # a saved config this code no longer reads
        return None
    if np.isclose(old, new, rtol=1e-6, atol=0.0) and old_total == new_total:
        return None
    causes = []
    for key in checkpoint.changed_keys(saved, config):
        with contextlib.suppress(Exception):  # a saved value this code no longer accepts
            if rate(with_saved_values(config, saved, [key])) != (new, new_total):
                causes.append(f"{key} {saved[key]!r} -> {config[key]!r}")
    return (
        f"the learning-rate schedule changed ({', '.join(causes) or 'config'}): it now spans {new_total} "
        f"steps instead of {old_total}, and the rate at step {step} is {new:.4g} instead of {old:.4g}"
    )
