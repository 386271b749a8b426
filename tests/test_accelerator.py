"""What must hold on any backend. CI runs these on the CPU with the rest of the suite; the
accelerator check (`benchmarks/accelerator/check.py`) runs every test marked `accelerator` on the
device of the host it runs on (`pytest -m accelerator`).

The other `accelerator` tests live beside what they test: the bit-identical resume after SIGKILL
and checkpoint -> evaluate -> predict in test_checkpoint.py, the bfloat16/float16 steps and float16
loss scaling in test_recipes.py, the sharded step against one device in test_parallel.py. The
accelerator check itself, in smoke mode, is tested here too.
"""

import contextlib
import functools
import importlib.util
import json
import re
import sys

import jax
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.step import cross_entropy, normalize
from tests.conftest import ROOT, fixed_digits_batch, module_available, run_script


@pytest.mark.slow
@pytest.mark.accelerator
def test_the_digits_quick_start_reaches_99_percent_on_the_default_device(tmp_path):
    """The README's first command, as a user runs it, on whatever device JAX picks."""
    result = run_script("train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({jax.devices()[0].device_kind})" in result.stdout  # it ran where we think it ran
    final = re.search(r"final eval at step 220: accuracy [\d.]+% \((\d+)/360\)", result.stdout)
    assert final, result.stdout[-2000:]
    assert int(final.group(1)) / 360 >= 0.99, final.group(0)


def relative_error(x, reference):
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


@pytest.mark.accelerator
def test_bfloat16_logits_and_loss_track_float32():
    """ResNet-20 in inference mode on real digits, against float32 at 'highest' precision.

    float32 at the default precision may use TF32 (NVIDIA) or bfloat16 passes (TPU) for
    convolutions, so it gets its own, looser-than-float32 bound; bfloat16 compute gets ~1e-2.
    """
    info, batch = fixed_digits_batch(size=64, image_size=12)
    images = normalize(batch["image"], info.mean, info.std)
    reference_model = models.create("resnet20", info.num_classes, zero_init_residual=False)
    variables = jax.jit(functools.partial(reference_model.init, train=False))(jax.random.key(0), images[:1])
    # Running statistics of real activations rather than init's zeros and ones.
    _, updates = jax.jit(functools.partial(reference_model.apply, train=True, mutable=["batch_stats"]))(
        variables, images
    )
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}

    def logits_and_loss(dtype, precision=None):
        model = models.create("resnet20", info.num_classes, dtype=dtype, zero_init_residual=False)
        context = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
        with context:
            logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
        assert logits.dtype == np.float32  # the head's output is float32 whatever the compute dtype
        return logits, cross_entropy(logits, batch["label"]).mean()

    exact_logits, exact_loss = logits_and_loss("float32", "highest")
    assert np.isfinite(exact_logits).all() and float(np.abs(exact_logits).max()) > 0.1
    for dtype, bound in (("float32", 5e-3), ("bfloat16", 5e-2)):
        logits, loss = logits_and_loss(dtype)
        assert relative_error(logits, exact_logits) < bound, dtype
        assert abs(float(loss) - float(exact_loss)) / float(exact_loss) < bound, dtype
        agreement = float((np.argmax(logits, -1) == np.argmax(exact_logits, -1)).mean())
        assert agreement >= 0.9, (dtype, agreement)


@pytest.mark.slow
def test_the_accelerator_check_runs_in_smoke_mode(tmp_path):
    """`check.py --smoke` end to end (CI runs it so that the check never rots): every part runs or
    says why not, and check.json and check.md hold the figures."""
    out = tmp_path / "check"
    result = run_script("benchmarks/accelerator/check.py", "--out", str(out), "--smoke", "--budget_s", "400")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == [
        "environment",
        "tests",
        "resnet50_bf16",
        "torch",
        "preflight",
        "end_to_end",
        "profile",
        "resnet50_eval",
    ]
    if jax.devices()[0].platform == "cpu":
        assert parts["preflight"] == {
            **parts["preflight"],
            "status": "skipped",
            "detail": "no preflight target for cpu",
        }
    assert report["environment"]["platform"] == jax.devices()[0].platform
    assert "jax" in report["environment"]["versions"] and "flax" in report["environment"]["versions"]
    assert parts["tests"]["status"] == "ok" and report["tests"]["failed"] == 0
    assert report["tests"]["passed"] >= 4  # the fast accelerator tests, collected from several modules
    assert {r["mode"] for r in report["benchmark"]} == {"train", "eval"}
    # The end-to-end part: the generated JPEG folder through each installed loader, and device batches.
    feeds = {(r["data"] == "device", r["loader"]) for r in report["benchmark"] if r["part"] == "end_to_end"}
    have_dali = module_available("nvidia.dali")
    assert feeds == {(True, "-"), (False, "grain")} | ({(False, "dali")} if have_dali else set())
    assert parts["end_to_end"]["status"] == "ok"
    # The profile part: the step's device time by category, in check.json and check.md.
    (profiled,) = [r for r in report["benchmark"] if r["part"] == "profile"]
    assert {r["category"] for r in profiled["profile"]["rows"]} >= {"convolution forward", "optimizer update"}
    for row in report["benchmark"]:
        assert row["images_per_sec"] > 0 and row["compile_seconds"] > 0 and row["compiled_memory_bytes"] > 0
    torch_part = parts["torch"]
    if torch_part["status"] == "skipped":
        assert "not installed" in torch_part["detail"] and report["torch"] == []
    else:
        assert torch_part["status"] == "ok" and report["torch"][0]["images_per_sec"] > 0
    markdown = (out / "check.md").read_text()
    assert "## Speed (benchmark.py)" in markdown and "## Correctness" in markdown
    assert "## Where the step's time goes: resnet20 train" in markdown
    assert (out / "check.log").stat().st_size > 0


def test_a_budget_too_small_skips_parts_and_says_why(tmp_path):
    out = tmp_path / "check"
    result = run_script(
        "benchmarks/accelerator/check.py",
        "--out",
        str(out),
        "--smoke",
        "--budget_s",
        "10",
        "--only",
        "environment,tests",
    )
    report = json.loads((out / "check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert parts["tests"]["status"] == "skipped", result.stdout[-2000:]
    assert "needs at least" in parts["tests"]["detail"] and "of the budget left" in parts["tests"]["detail"]
    assert result.returncode == (0 if parts["environment"]["status"] == "ok" else 1)


@pytest.mark.skipif(
    not module_available("jax_plugins.xla_cuda12"), reason="needs the preflight extra (CUDA plugin)"
)
def test_the_check_compares_the_preflight_with_the_device(tmp_path):
    """On an H200 the check compiles the headline row for `h200x1` on the CPU and puts the prediction
    next to what the device planned and peaked at (here: the device's figures are made up)."""
    from pathlib import Path

    check = load_kit_module("check")
    plan = [p for p in check.smoke_plan() if p.name == "preflight"]
    runner = check.Check(Path(tmp_path), 300, True, plan)
    runner.result["environment"] = {"device_kind": "NVIDIA H200"}
    runner.result["benchmark"] = [
        {"batch_size": 4, "mode": "train", "compiled_memory_bytes": 2**27, "peak_memory_bytes": 2**28}
    ]
    status, _, detail = runner.run_preflight(plan[0], 300)
    assert status == "ok", detail
    row = runner.result["preflight"]
    assert row["target"] == "h200x1" and row["verdict"] == "fits" and row["bytes_per_device"] > 0
    assert detail.startswith("h200x1: fits, ") and "XLA planned 0.12 GiB, peak 0.25 GiB" in detail
    assert "## Preflight against the device" in check.markdown({**runner.result, "environment": None})


def load_kit_module(name):
    """A script of benchmarks/accelerator/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "accelerator" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_check_lists_only_modules_with_accelerator_tests():
    files = load_kit_module("check").accelerator_test_files()
    assert {"tests/test_accelerator.py", "tests/test_checkpoint.py", "tests/test_recipes.py"} <= set(files)
    assert "tests/test_notebooks.py" not in files  # needs Jupyter, which an accelerator host may lack


def test_the_wheel_pins_satisfy_the_projects_requirements_and_cover_the_missing_packages():
    """wheels.txt must not rot: each of the project's dependencies that a GPU host lacks is pinned,
    at a version that pyproject.toml accepts."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wheels = load_kit_module("wheels")
    pins = {canonicalize_name(p.name): p for p in wheels.read_pins()}
    assert len(pins) == len(wheels.read_pins()) == 16
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    carried = {"grain", "clu", "ml-collections", "tensorflow-datasets", "tensorboardx"}
    for requirement in map(Requirement, requirements):
        name = canonicalize_name(requirement.name)
        if name in carried:
            assert requirement.specifier.contains(pins[name].version), (requirement, pins[name])
    assert carried <= set(pins)
    assert [p.name for p in pins.values() if p.build] == ["promise"]


def test_wheel_download_and_install_commands_and_a_missing_wheel(tmp_path, capsys):
    wheels = load_kit_module("wheels")
    pins = wheels.read_pins()
    wheels.download(pins, tmp_path / "w", "3.12", dry_run=True)
    download, build = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert "--no-deps --only-binary=:all: --python-version 3.12" in download and "--abi cp312" in download
    assert "grain==0.2.18" in download and "promise" not in download
    assert build.endswith("wheel --no-deps -w " + str(tmp_path / "w") + " promise==2.3")

    for pin in pins[1:]:  # every wheel but grain's
        (tmp_path / f"{pin.wheel_prefix()}py3-none-any.whl").write_bytes(b"")
    with pytest.raises(wheels.WheelsError, match=r"lacks the wheels of grain==0\.2\.18: run"):
        wheels.install(pins, tmp_path, target=None, dry_run=True)
    (tmp_path / "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    wheels.install(pins, tmp_path, target=str(tmp_path / "site"), dry_run=True)
    command = capsys.readouterr().out.splitlines()[0]
    assert "--no-index --no-deps" in command and f"--target {tmp_path / 'site'}" in command
    assert command.count(".whl") == 16


def test_tune_variants_parse_with_their_flags_and_batch():
    tune = load_kit_module("tune")
    assert tune.parse_variant("big=@512") == tune.Variant("big", "", 512)
    flags = "--xla_gpu_enable_command_buffer="
    assert tune.parse_variant(f"off={flags}") == tune.Variant("off", flags, None)
    s2d = tune.parse_variant("s2d=--config.space_to_depth_stem=True --xla_gpu_foo=1@256")
    assert (s2d.xla_flags(), s2d.config_overrides()) == (
        "--xla_gpu_foo=1",
        ["--config.space_to_depth_stem=True"],
    )
    for bad in ("nothing", "=@5", "x=@0", "x=@many"):
        with pytest.raises(ValueError, match="expected NAME=XLA_FLAGS"):
            tune.parse_variant(bad)


def test_large_wheels_split_into_parts_join_back_checked_and_dali_pins_are_listed(tmp_path, capsys):
    wheels = load_kit_module("wheels")
    dali = {p.name: p.version for p in wheels.read_pins(wheels.DALI_PINS_FILE)}
    assert {"nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg"} <= set(dali)
    big, small = tmp_path / "big-1.0-py3-none-any.whl", tmp_path / "small-1.0-py3-none-any.whl"
    payload = np.random.default_rng(0).bytes(int(2.5 * 2**20))
    big.write_bytes(payload)
    small.write_bytes(b"tiny")
    parts = wheels.split(tmp_path, part_mib=1)
    assert [p.name for p in parts] == [f"{big.name}.part00{i}" for i in range(3)] and not big.exists()
    assert small.exists()  # under the part size: left whole
    assert (
        wheels.join(tmp_path) == [big] and big.read_bytes() == payload and not list(tmp_path.glob("*.part*"))
    )
    wheels.split(tmp_path, part_mib=1)
    damaged = tmp_path / f"{big.name}.part001"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    with pytest.raises(wheels.WheelsError, match="do not add up to the wheel that was split"):
        wheels.join(tmp_path)
