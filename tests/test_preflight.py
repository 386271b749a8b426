"""The preflight: the real steps compiled for TPU slices and GPU hosts on this CPU (the `preflight` extra)."""

import importlib.util
import json
import re

import pytest
from conftest import ROOT, module_available, run_script

from resnet_jax import preflight, preflight_worker, targets

needs_extra = pytest.mark.skipif(
    not (module_available("libtpu") and module_available("jax_plugins.xla_cuda12")),
    reason="the preflight extra is not installed: pip install -e '.[preflight]'",
)
# resnet20 at 8 px: the smallest registry model, so a compile takes seconds.
SMALL = ["--config", "configs/cifar10_resnet20.py", "--config.image_size=8", "--config.eval_batch_size=64"]


def run_preflight(tmp_path, *args):
    out = tmp_path / "preflight.json"
    result = run_script("-m", "resnet_jax.preflight", *args, "--json", str(out))
    rows = {row["target"]: row for row in json.loads(out.read_text())["targets"]} if out.exists() else {}
    return result, rows


@needs_extra
@pytest.mark.slow
def test_small_model_on_a_tpu_slice_a_multi_host_slice_and_a_gpu_host(tmp_path):
    hlo = tmp_path / "hlo"
    result, rows = run_preflight(
        tmp_path,
        *SMALL,
        "--config.batch_size=64",
        "--target=v5e-8",
        "--target=v5p-16",
        "--target=h100x8",
        f"--hlo_dir={hlo}",
    )
    assert result.returncode == 0, result.stderr
    assert list(rows) == ["v5e-8", "v5p-16", "h100x8"]
    for name, row in rows.items():
        target = targets.target(name)
        assert row["verdict"] == "fits" and row["reason"] == ""
        assert (row["devices"], row["processes"]) == (target.devices, target.processes)
        assert row["per_process_batch"] == 64 // target.processes
        assert row["batch_bytes"] == 64 // target.devices * (8 * 8 * 3 + 4)  # uint8 images + int32 labels
        assert 0 < row["state_bytes"] < row["bytes_per_device"] < row["usable_bytes"]
        assert row["headroom_bytes"] == row["usable_bytes"] - row["bytes_per_device"]
        assert row["eval_bytes_per_device"] > 0 and row["compile_seconds"] > 0
        # resnet20's forward pass is ~2.6 MFLOP at 8 px (41 MFLOP at 32 px); training is about 3x that.
        assert 4e-3 < row["gflops_per_image"] < 12e-3
        assert row["roofline_images_per_sec"] > 0
    assert rows["v5p-16"]["processes"] == 2  # two hosts of two megacore chips each
    assert rows["v5e-8"]["hbm_mb_per_image"] > 0  # TPUs count HBM traffic; the CUDA backend does not
    assert rows["h100x8"]["hbm_mb_per_image"] is None
    assert rows["h100x8"]["usable_bytes"] == int(targets.accelerator("H100 SXM").hbm_bytes * 0.75)
    assert "v5p-16" in result.stdout and "fits" in result.stdout  # the table

    # The compiled programs, for benchmarks/hbm_traffic.py (a program this small lives in on-chip
    # memory on a TPU: the tool's figures are tested on a handmade program below).
    programs = sorted(p.name for p in hlo.iterdir())
    assert programs == [
        f"{t}_{m}_batch64.hlo.txt" for t in ("h100x8", "v5e-8", "v5p-16") for m in ("eval", "train")
    ]
    traffic = run_script("benchmarks/hbm_traffic.py", str(hlo / "v5e-8_train_batch64.hlo.txt"), "--images=8")
    assert traffic.returncode == 0, traffic.stderr
    assert int(traffic.stdout.split(" instructions")[0]) > 100

    # The GPU program's kernels by category, read without a GPU.
    kernels_json = tmp_path / "kernels.json"
    census = run_script(
        "-m",
        "resnet_jax.trace_report",
        f"--hlo={hlo / 'h100x8_train_batch64.hlo.txt'}",
        f"--json={kernels_json}",
    )
    assert census.returncode == 0, census.stderr
    document = json.loads(kernels_json.read_text())
    assert (document["accelerator"], document["images"]) == ("H100 SXM", 8)  # from the file name
    by_category = {r["category"]: r for r in document["rows"]}
    convolutions = 19  # resnet20: the stem and two per block, identity shortcuts
    assert by_category["convolution forward"]["kernels"] == convolutions
    # Each convolution's weight gradient and input gradient (none for the image). At 2x2 pixels XLA
    # computes a few weight gradients as forward convolutions, which count as input gradients.
    gradients = (
        by_category["convolution weight gradient"]["kernels"]
        + by_category["convolution input gradient"]["kernels"]
    )
    assert gradients == 2 * convolutions - 1
    # The BatchNorm applied with its ReLU in one fusion counts as BatchNorm's, and it moves the
    # activations: about one read and one write of a convolution's output per BatchNorm.
    assert (
        by_category["BatchNorm apply"]["mb_per_step"]
        > 0.5 * by_category["convolution forward"]["mb_per_step"]
    )
    for needed in (
        "BatchNorm statistics",
        "BatchNorm backward",
        "optimizer update",
        "metrics and gradient norm",
    ):
        assert by_category[needed]["kernels"] > 0, needed
    assert sum(r["kernels"] for r in document["rows"]) == document["kernels"]
    assert sum(r["share"] for r in document["rows"]) == pytest.approx(1.0)
    assert census.stdout.splitlines()[0].split()[:2] == ["category", "kernels"]
    assert "kernels per step for 8 images per device" in census.stdout


HANDMADE_HLO = (ROOT / "tests" / "data" / "handmade_step.hlo.txt").read_text()


def test_hbm_traffic_counts_what_each_instruction_reads_and_writes():
    """Operands read at their producers' sizes, results written, on-chip (S(1)) copies free."""
    result = run_script("benchmarks/hbm_traffic.py", "tests/data/handmade_step.hlo.txt", "--top=5")
    assert result.returncode == 0, result.stderr
    # copy-start reads p1 (64 B); conv reads p0 (256 B) and the on-chip copy (0), writes 256 + 64 B;
    # the ReLU reads the convolution's output and p0 (512 B) and writes 256 B: 1,408 bytes in all.
    assert result.stdout.startswith("3 instructions,     0.00 GB read + written")
    rows = {r["name"]: r for r in load_hbm_traffic().analyse(HANDMADE_HLO)}
    assert (rows["copy-start"]["read"], rows["copy-start"]["written"]) == (64, 0)
    assert (rows["conv"]["read"], rows["conv"]["written"]) == (256, 320)
    assert (rows["relu"]["read"], rows["relu"]["written"]) == (512, 256)
    assert (rows["conv"]["phase"], rows["conv"]["group"]) == ("forward", "conv1/conv_general_dilated")
    assert (rows["relu"]["phase"], rows["relu"]["group"]) == ("backward", "relu/max")


def load_hbm_traffic():
    spec = importlib.util.spec_from_file_location("hbm_traffic", ROOT / "benchmarks" / "hbm_traffic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_extra
@pytest.mark.slow
def test_max_batch_memory_grows_with_the_batch(tmp_path):
    result, rows = run_preflight(
        tmp_path,
        *SMALL,
        "--config.image_size=32",
        "--config.batch_size=64",
        "--target=h100x1",
        "--max_batch",
        "--noeval",
    )
    assert result.returncode == 0, result.stderr
    row = rows["h100x1"]
    assert row["eval_bytes_per_device"] is None and "eval step" not in result.stderr  # --noeval
    probes = sorted(row["max_batch_probes"], key=lambda p: p["batch_size"])
    assert len(probes) >= 2
    sizes = [p["bytes_per_device"] for p in probes if p["bytes_per_device"]]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    largest, miss = row["max_batch"], row["first_batch_that_does_not_fit"]
    assert miss > largest > 64
    assert miss - largest <= preflight_worker.resolution(largest, 1)
    fitting = {p["batch_size"]: p["fits"] for p in probes}
    assert fitting[largest] and not fitting[miss]


@needs_extra
@pytest.mark.slow
def test_a_config_too_big_for_v5e_does_not_fit(tmp_path):
    result, rows = run_preflight(
        tmp_path, *SMALL, "--config.image_size=32", "--config.batch_size=262144", "--target=v5e-8"
    )
    assert result.returncode == 1, result.stderr
    row = rows["v5e-8"]
    assert row["verdict"] == "does not fit"
    # XLA's own sizes, e.g. "XLA: needs 19.49G of temporaries, 15.75G of HBM available"
    assert re.fullmatch(r"XLA: needs [\d.]+G of temporaries, 15.75G of HBM available", row["reason"])
    assert "does not fit: XLA: needs" in result.stdout


def test_unknown_target_is_one_clear_line(tmp_path):
    result, rows = run_preflight(tmp_path, *SMALL, "--target=v5e-9")
    assert result.returncode == 2 and not rows
    assert "Traceback" not in result.stderr
    assert "unknown target 'v5e-9'; did you mean 'v5e-8'?" in result.stderr
    assert "h100x8" in result.stderr  # the valid names


def test_aliases_and_case():
    assert targets.target("v5litepod-8") is targets.target("V5E-8") is targets.TARGETS["v5e-8"]


def test_a_missing_extra_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        preflight.PreflightError, match=r"v5e-8, v4-8 need libtpu.*pip install -e '\.\[preflight\]'"
    ):
        preflight.check_extras([targets.target("v5e-8"), targets.target("v4-8")])
    with pytest.raises(preflight.PreflightError, match="h100x8 needs the JAX CUDA plugin, which is not"):
        preflight.check_extras([targets.target("h100x8")])
    with pytest.raises(
        preflight.PreflightError,
        match="h100x1 needs the JAX CUDA plugin and v5e-8 needs libtpu, which are not installed",
    ):
        preflight.check_extras([targets.target("v5e-8"), targets.target("h100x1")])


def test_a_batch_that_does_not_divide_is_refused_before_compiling():
    from configs import cifar10_resnet20

    config = cifar10_resnet20.get_config()
    config.grad_accum_steps = 2
    # No mesh and no dataset: a refused batch never gets as far as building the steps.
    refused = preflight_worker.compile_step(config, None, targets.target("v5e-16"), None, 48, "train")
    assert (refused.compiled, refused.fits) == (False, False)
    assert refused.reason == (
        "config.batch_size=48 does not divide over 16 devices x grad_accum_steps=2 micro-batches; "
        "use a multiple of 32 (e.g. 32 or 64)"
    )


@needs_extra
def test_every_target_describes_its_devices():
    """The table's topologies give the device and process counts it claims, of the right kind."""
    script = (
        "import json\n"
        "from resnet_jax import preflight_worker, targets\n"
        "out = {}\n"
        "for t in targets.TARGETS.values():\n"
        "    devices = preflight_worker.topology_devices(t)\n"
        "    out[t.name] = [len(devices), len({d.process_index for d in devices}), devices[0].device_kind]\n"
        "print(json.dumps(out))\n"
    )
    result = run_script("-c", script, env=preflight.worker_environment())
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (count, processes, kind) in found.items():
        target = targets.TARGETS[name]
        assert (count, processes) == (target.devices, target.processes), name
        assert targets.accelerator_for_kind(kind) is target.accelerator, (name, kind)


class FakeCompiler:
    """Memory = 1 GiB + 10 MiB per image against 16 GiB: the largest fit is 1536 images."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch_size):
        self.calls.append(batch_size)
        total = 2**30 + batch_size * 10 * 2**20
        fits = total <= 16 * 2**30
        return preflight_worker.Compiled(batch_size, compiled=True, fits=fits, total_bytes=total)


@pytest.mark.parametrize("start", [64, 1024, 4096])
def test_max_batch_search_finds_the_limit_in_a_few_compiles(start):
    compile_at = FakeCompiler()
    largest, miss, probes = preflight_worker.search_max_batch(compile_at, compile_at(start), 64, 16 * 2**30)
    assert largest == 1536 and miss == 1600  # exact: the memory is linear
    assert len(probes) <= 4 and len(set(compile_at.calls)) == len(compile_at.calls)


def test_max_batch_search_without_a_line_bisects_to_the_resolution():
    """TPU-like: only a refusal, no sizes, above the limit."""

    def compile_at(batch_size):
        fits = batch_size <= 5000
        return preflight_worker.Compiled(batch_size, compiled=True, fits=fits, total_bytes=None)

    largest, miss, probes = preflight_worker.search_max_batch(compile_at, compile_at(256), 8, 2**34, limit=20)
    assert largest <= 5000 < miss and miss - largest <= preflight_worker.resolution(largest, 8)
