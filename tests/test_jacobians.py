"""The Jacobian study (`python -m resnet_jax.jacobians`): the variables it measures, the degradation
verdicts, what it does with nets the recipe cannot train, and the command line."""

import json
import sys

import jax
import numpy as np
import pytest

from resnet_jax import compiled_steps, data, degradation, jacobians, models, parallel
from resnet_jax.config_checks import check_config
from resnet_jax.step import rng_key
from tests.conftest import ROOT, run_script

sys.path.insert(0, str(ROOT))
from configs import digits  # noqa: E402


def test_the_study_measures_the_variables_that_training_starts_from():
    config = check_config(digits.get_config())
    info = data.load(config).info
    model = models.create(config.model, info.num_classes, zero_init_residual=config.zero_init_residual)
    ours = jacobians.initial_variables(config, info, model)
    theirs = compiled_steps.CompiledSteps(config, info, parallel.create_mesh()).init(rng_key(config.seed))
    for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(theirs.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_degradation_verdicts_follow_the_numbers():
    def run(family, depth, error, accuracy=0.9):
        record = {"train_error": error, "eval_accuracy": accuracy}
        return {
            "model": f"{family}{depth}",
            "family": family,
            "depth": depth,
            "norm": "batch",
            "activation": "relu",
            "training": record,
        }

    runs = [run("plain", 20, 0.01), run("plain", 56, 0.70), run("resnet", 20, 0.01), run("resnet", 56, 0.005)]
    rows = {r["family"]: r for r in degradation.compare(runs)}
    assert rows["plain"]["deeper_trains_worse"] and rows["plain"]["matches_figure_6"]
    assert not rows["resnet"]["deeper_trains_worse"] and rows["resnet"]["matches_figure_6"]
    assert rows["plain"]["text"].startswith(
        "plain56 trains worse than plain20: training error 70.00% vs 1.00%"
    )
    flipped = degradation.compare([run("resnet", 20, 0.01), run("resnet", 56, 0.30)])
    assert flipped[0]["deeper_trains_worse"] and not flipped[0]["matches_figure_6"]
    within_margin = degradation.compare([run("plain", 20, 0.01), run("plain", 56, 0.015)])
    assert not within_margin[0]["deeper_trains_worse"] and not within_margin[0]["matches_figure_6"]
    untrained = dict(run("plain", 110, 0.0), training=None)
    assert len(degradation.compare([*runs, untrained])) == 2


@pytest.mark.slow
def test_cli_trains_measures_and_writes_the_json_summary_and_plots(tmp_path):
    out = tmp_path / "jac"
    args = ["--depths", "20", "--train_depths", "20", "--families", "preact_resnet"]
    args += ["--probe_size", "8", "--iterations", "6", "--probes", "1", "--config.num_train_steps=4"]
    result = run_script("-m", "resnet_jax.jacobians", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "jacobians.json").read_text())
    assert [r["model"] for r in document["runs"]] == ["preact_resnet20"]
    for r in document["runs"]:
        assert r["training"]["steps"][-1] == 4 and len(r["training"]["train_loss"]) == 2
        assert 0.0 <= r["training"]["train_error"] <= 1.0
        for when in ("init", "trained"):
            assert len(r[when]["blocks"]) == 9
            assert all(b["total"]["top"] > 0 and b["total"]["iterations"] == 6 for b in r[when]["blocks"])
        assert r["init"]["blocks"][0]["total"] != r["trained"]["blocks"][0]["total"]
    assert (out / "runs" / "preact_resnet20" / "checkpoints").is_dir()
    summary = (out / "summary.md").read_text()
    assert "preact_resnet20 (norm=batch, relu, init): top singular value" in summary
    assert "Degradation with the recipe" not in summary  # one depth: nothing to compare
    assert summary in result.stdout
    for name in ("jacobian_spectra.png", "branch_spectra.png", "depth_product.png", "degradation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "test"], "--mode='test' is not valid; choose one of: train, eval"),
        (["--depths", "20", "--train_depths", "56"], "--train_depths=56 must be among --depths=20"),
        (["--depths", "20,x"], "--depths='20,x' must be integers"),
        (
            ["--depths", "21", "--train_depths", "21"],
            "--depths=21 is not valid; choose one of: 20, 32, 44, 56, 110",
        ),
        (["--families", "resnext"], "--families='resnext' is not valid"),
        (["--probe_size", "0"], "--probe_size=0 must be a positive integer"),
        (["--out", "FILE"], "is a file; pass a folder"),
        (["--config", "configs/digit.py"], "did you mean configs/digits.py?"),
    ],
)
def test_bad_arguments_are_one_line_each(tmp_path, args, message):
    (tmp_path / "file").write_text("not a folder")
    args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    result = run_script("-m", "resnet_jax.jacobians", "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_nets_without_normalisation_are_measured_at_initialisation_only(tmp_path):
    lines = []
    document = jacobians.run_study(
        [20],
        ["plain"],
        ["none"],
        ["sigmoid"],
        recipe=digits.get_config(),
        train_depths=[20],
        out_dir=str(tmp_path),
        iterations=2,
        probes=1,
        probe_size=4,
        log=lines.append,
    )
    (run,) = document["runs"]
    assert run["trained"] is None and run["training"] is None and run["not_trained"] == jacobians.UNTRAINED
    assert not (tmp_path / "runs").exists()
    assert lines[0].split()[:3] == ["plain20", "norm=none", "sigmoid"] and jacobians.UNTRAINED in lines[0]
    assert document["summary"]["degradation"] == [] and document["summary"]["figure_6_ordering"] is None


def test_help_says_what_the_study_does_and_exits_zero():
    result = run_script("-m", "resnet_jax.jacobians", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Per-block Jacobian spectra") and "--train_depths" in result.stdout
