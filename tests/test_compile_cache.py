"""train.py's persistent compilation cache: a second start loads the compiled steps from disk."""

import pytest

from tests.conftest import run_script

# The programs worth caching; small helper programs may or may not pass the compile-time threshold.
STEPS = ("jit_init_state", "jit_train_step", "jit_eval_step")


def train(workdir, cache_dir):
    return run_script(
        "train.py",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        "--config.num_train_steps=2",
        f"--config.compilation_cache_dir={cache_dir}",
    )


def entries(cache_dir):
    return {p.name for p in cache_dir.iterdir()}


@pytest.mark.slow
def test_second_start_reads_the_steps_from_the_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    first = train(tmp_path / "run1", cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = entries(cache_dir)
    for name in STEPS:
        assert any(e.startswith(name + "-") for e in after_first), (name, sorted(after_first))

    second = train(tmp_path / "run2", cache_dir)  # a fresh workdir: nothing to resume from
    assert second.returncode == 0, second.stderr[-3000:]
    added = entries(cache_dir) - after_first
    assert not [e for e in added if e.startswith(STEPS)], sorted(added)  # hits, not new compiles
    final = [[line for line in r.stdout.splitlines() if "final eval" in line] for r in (first, second)]
    assert final[0] and final[0][0].split("[")[0] == final[1][0].split("[")[0]  # same numbers


def test_unusable_cache_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = train(tmp_path / "run", blocker / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be used" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
