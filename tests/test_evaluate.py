"""`python -m resnet_jax.evaluate` scores a checkpoint as the run itself did: with the normalisation
the run trained with (a fine-tuned run uses its pretrained weights' statistics), and with
`--config.` overrides applied before the model is built."""

import json

import pytest

from resnet_jax import evaluate, train
from resnet_jax.errors import ConfigError
from tests.conftest import digits_config, run_script
from tests.test_weights import write_pretrained


def final_eval(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_accuracy" in r][-1]


@pytest.mark.slow
def test_evaluate_reproduces_a_fine_tuned_runs_final_eval_and_applies_overrides(tmp_path):
    # Weights "pretrained" on data with mean 0 and std 1: the fine-tuned run normalises digits
    # (mean 78, std 82) with those statistics, and so must evaluate.
    write_pretrained(tmp_path / "pretrained", num_classes=10)
    workdir = tmp_path / "finetuned"
    config = digits_config(num_train_steps=12, batch_size=32, init_from=str(tmp_path / "pretrained"))
    train.train_and_evaluate(config, str(workdir))
    expected = final_eval(workdir)

    result = run_script("-m", "resnet_jax.evaluate", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((workdir / "eval_step12.json").read_text())
    assert scores["num_examples"] == 360
    assert round(scores["eval_accuracy"] * 360) == round(expected["eval_accuracy"] * 360)  # the same n/N
    assert scores["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)

    # Overrides reach the model: bfloat16 changes the logits (so the loss), a little.
    bf16 = evaluate.evaluate_checkpoint(str(workdir), "latest", ["--config.dtype=bfloat16"])
    assert bf16["eval_loss"] != scores["eval_loss"]
    assert bf16["eval_loss"] == pytest.approx(scores["eval_loss"], rel=0.05)
    # The same parser as train.py's, with its did-you-mean and typed values.
    with pytest.raises(ConfigError, match="no config key 'dtyp' \\(did you mean 'dtype'\\?\\)"):
        evaluate.evaluate_checkpoint(str(workdir), "latest", ["--config.dtyp=bfloat16"])
    with pytest.raises(ConfigError, match="config.eval_batch_size takes an integer, like 0"):
        evaluate.evaluate_checkpoint(str(workdir), "latest", ["--config.eval_batch_size=many"])
    with pytest.raises(ConfigError, match="config.dtype='float64' is not valid"):
        evaluate.evaluate_checkpoint(str(workdir), "latest", ["--config.dtype=float64"])
