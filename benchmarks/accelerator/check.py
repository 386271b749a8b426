"""The accelerator check: one offline, time-boxed command that proves and measures resnet_jax on
this host's accelerator, side by side with PyTorch on the same device.

    python benchmarks/accelerator/check.py --out DIR [--budget_s 420] [--smoke]

It runs, in this order, each part in its own process (so that a hung or crashed part cannot take
the rest down, and JAX and PyTorch never share a device's memory):

1. the environment: devices and their memory, library versions, XLA flags, `nvidia-smi`;
2. the `accelerator` tests (`pytest -m accelerator`): training, mixed precision, resume,
   sharding, checkpoint -> evaluate -> predict, float16 loss scaling, on the device;
3. `benchmark.py`: ResNet-50 at 224 px, bfloat16, per-device batch 256 first, then 64 and 128
   and float32 at 128, the eval step, and ResNet-18 / CIFAR ResNet-56 at 32 px;
4. torchvision's ResNet-50 train step at the same batch (eager and `torch.compile`) when torch
   and torchvision import, and the ratio of our images/s to each;
5. XLA's compile-time memory figure of each row against the measured peak, and the deviceless
   preflight (`python -m resnet_jax.preflight`) of the headline row for this GPU's target,
   compiled on this host's CPU as a user without the GPU would: its prediction against both.

The budget is for the whole check. The parts come in order of importance; each gets what is left
minus the minimum the later parts need (but never less than its own minimum), a part whose minimum
no longer fits is skipped and listed as such, and `benchmark.py` skips
configurations that would end past its share. `DIR/check.json` and `DIR/check.md` are rewritten
after every part, so a run cut short keeps what it measured; `DIR/check.log` holds every part's
output. `--smoke` shrinks every size (tiny models, a few steps, the fast tests) so that the whole
check runs in about a minute on a CPU; CI runs it that way.

Exit status: 0 when every part that ran succeeded (skips allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TORCH_SCRIPT = Path(__file__).resolve().parent / "torch_resnet50.py"
ENV_PREFIXES = ("XLA_", "JAX_", "CUDA_", "NCCL_", "NVIDIA_", "TF_CPP_", "TPU_", "LIBTPU")
E2E_IMAGES = 4096  # the end-to-end part's generated JPEG folder (loader_benchmark's generator)
PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "libtpu",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "clu",
    "ml-collections",
    "tensorflow-datasets",
    "tensorboardX",
    "numpy",
    "torch",
    "torchvision",
)


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the check: what it runs, the least time that makes it worth starting, its cap."""

    name: str
    title: str
    minimum_s: float
    cap_s: float
    kind: str  # environment | tests | benchmark | profile | end_to_end | torch | preflight
    args: tuple[str, ...] = ()
    images: int = 0  # end_to_end: JPEG files to generate


def full_plan(headline_batch: int = 256) -> list[Part]:
    """The parts on an accelerator, most important first (the headline row and its PyTorch twin)."""
    r50 = ("--model=resnet50", "--image_size=224", "--steps=30", "--warmup_steps=5")
    return [
        Part("environment", "Environment", 15, 90, "environment"),
        Part("tests", "Correctness on the device (pytest -m accelerator)", 60, 200, "tests"),
        Part(
            "resnet50_bf16",
            f"ResNet-50 train, bfloat16, per-device batch {headline_batch}",
            60,
            150,
            "benchmark",
            (*r50, "--dtype=bfloat16", f"--per_device_batch_size={headline_batch}"),
        ),
        Part(
            "torch",
            f"torchvision ResNet-50 train, bfloat16 autocast, batch {headline_batch}",
            45,
            200,
            "torch",
            (f"--batch_size={headline_batch}", "--image_size=224", "--modes=eager,compile", "--steps=30"),
        ),
        Part(
            "preflight",
            f"Preflight of the headline row for this GPU, compiled on the CPU (batch {headline_batch})",
            30,
            150,
            "preflight",
            preflight_args("resnet50", 224, headline_batch),
        ),
        Part(
            "end_to_end",
            f"ResNet-50 train from {E2E_IMAGES:,} ImageNet-sized JPEGs, bfloat16, per-device batch "
            f"{headline_batch}: DALI, grain on every core, and batches made on the device",
            120,
            330,
            "end_to_end",
            (*r50, "--dtype=bfloat16", f"--per_device_batch_size={headline_batch}"),
            E2E_IMAGES,
        ),
        Part(
            "profile",
            "Where ResNet-50's step time goes: bfloat16, per-device batch 256 and 1,024, traced",
            60,
            200,
            "profile",
            (*r50, "--dtype=bfloat16", "--per_device_batch_size=256,1024", "--profile_steps=5"),
        ),
        Part(
            "resnet50_sweep",
            "ResNet-50 train, bfloat16, per-device batch 64 and 128",
            50,
            200,
            "benchmark",
            (*r50, "--dtype=bfloat16", "--per_device_batch_size=64,128"),
        ),
        Part(
            "resnet50_fp32",
            "ResNet-50 train, float32, per-device batch 128",
            40,
            120,
            "benchmark",
            (*r50, "--dtype=float32", "--per_device_batch_size=128"),
        ),
        Part(
            "resnet50_eval",
            "ResNet-50 eval, bfloat16, per-device batch 256",
            30,
            90,
            "benchmark",
            (*r50, "--mode=eval", "--dtype=bfloat16", "--per_device_batch_size=256"),
        ),
        Part(
            "cifar_nets",
            "ResNet-18 and CIFAR ResNet-56 train at 32 px, bfloat16, per-device batch 256",
            30,
            120,
            "benchmark",
            (
                "--model=resnet18,resnet56",
                "--image_size=32",
                "--dtype=bfloat16",
                "--per_device_batch_size=256",
                "--steps=30",
                "--warmup_steps=5",
            ),
        ),
    ]


def smoke_plan() -> list[Part]:
    """The same parts with every size shrunk: about a minute on a 2-core CPU."""
    tiny = (
        "--model=resnet20",
        "--image_size=8",
        "--per_device_batch_size=4",
        "--steps=2",
        "--warmup_steps=1",
    )
    return [
        Part("environment", "Environment", 5, 60, "environment"),
        Part("tests", "Correctness (pytest -m 'accelerator and not slow')", 10, 240, "tests"),
        Part(
            "resnet50_bf16",
            "ResNet-20 train at 8 px, bfloat16 (smoke)",
            5,
            120,
            "benchmark",
            (*tiny, "--dtype=bfloat16"),
        ),
        Part(
            "torch",
            "torchvision ResNet-18 train at 32 px, eager (smoke)",
            5,
            120,
            "torch",
            (
                "--model=resnet18",
                "--batch_size=4",
                "--image_size=32",
                "--modes=eager",
                "--steps=2",
                "--warmup_steps=1",
            ),
        ),
        Part(
            "preflight",
            "Preflight of the ResNet-20 row for this GPU (smoke)",
            5,
            120,
            "preflight",
            preflight_args("resnet20", 8, 4),
        ),
        Part(
            "end_to_end",
            "ResNet-20 train at 8 px from 64 generated JPEGs: DALI, grain and device batches (smoke)",
            5,
            180,
            "end_to_end",
            (*tiny, "--dtype=float32"),
            64,
        ),
        Part(
            "profile",
            "Where ResNet-20's step time goes at 8 px, traced (smoke)",
            5,
            120,
            "profile",
            (*tiny, "--dtype=float32", "--profile_steps=2"),
        ),
        Part(
            "resnet50_eval",
            "ResNet-20 eval at 8 px (smoke)",
            5,
            120,
            "benchmark",
            (*tiny, "--mode=eval", "--dtype=float32"),
        ),
    ]


def preflight_args(model: str, image_size: int, batch_size: int) -> tuple[str, ...]:
    """The preflight of a benchmark row: benchmark.py's config (configs/default.py, synthetic data)."""
    return (
        f"--config={ROOT / 'configs' / 'default.py'}",
        f"--config.model={model}",
        f"--config.image_size={image_size}",
        f"--config.batch_size={batch_size}",
        "--config.dtype=bfloat16",
        "--config.dataset=synthetic",
    )


# ---------------------------------------------------------------- running parts


def log(message: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def with_xla_flags(env: dict[str, str], *flags: str) -> dict[str, str]:
    """`env` with `flags` appended to its XLA_FLAGS (empty ones left out)."""
    return {**env, "XLA_FLAGS": " ".join(filter(None, [env.get("XLA_FLAGS", ""), *flags]))}


def child_environment(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        # The smoke check compiles small programs for a few steps: compile fast, like the test suite.
        env = with_xla_flags(env, "--xla_backend_optimization_level=0")
    return env


def benchmark_command(args: list[str] | tuple[str, ...], json_path: Path) -> list[str]:
    """`benchmark.py` with `args`, its rows to `json_path`, compiling rather than loading the steps."""
    return [
        sys.executable,
        str(ROOT / "benchmark.py"),
        *args,
        f"--json={json_path}",
        "--compilation_cache_dir=",  # measure compilation, never load it
    ]


def run_process(command: list[str], timeout: float, log_file: Any, env: dict[str, str]) -> tuple[str, float]:
    """Run `command` in its own process group, its output appended to `log_file`.

    Returns ("ok" | "failed (exit N)" | "timed out", seconds). On timeout the whole group is killed,
    grandchildren too (pytest's train.py runs), so nothing keeps holding the device.
    """
    log_file.write(f"\n$ {' '.join(command)}\n")
    log_file.flush()
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        code = process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timed out", time.perf_counter() - start
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers (a stuck worker) go too
            os.killpg(process.pid, signal.SIGKILL)
    return ("ok" if code == 0 else f"failed (exit {code})"), time.perf_counter() - start


def environment_report() -> dict[str, Any]:
    """Run in a child process: what the check ran on. Initialises JAX (and holds its memory)."""
    from importlib import metadata

    import jax

    devices = jax.devices()
    device_rows = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - not implemented on some backends
            stats = {}
        device_rows.append(
            {
                "id": device.id,
                "kind": device.device_kind,
                "platform": device.platform,
                "memory_bytes_limit": stats.get("bytes_limit"),
            }
        )
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    report = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "devices": device_rows,
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
    }
    smi = nvidia_smi()
    if smi:
        report["nvidia_smi"] = smi
    return report


def nvidia_smi() -> list[dict[str, str]] | None:
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    keys = fields.split(",")
    return [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in out.stdout.splitlines()
    ]


def accelerator_test_files() -> list[str]:
    """The test modules that hold `accelerator` tests (collecting only those keeps optional test
    dependencies, e.g. the notebooks', off the accelerator host)."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.accelerator" in path.read_text()
    )


def test_command(junit: Path, smoke: bool) -> list[str]:
    marker = "accelerator and not slow" if smoke else "accelerator"
    command = [sys.executable, "-m", "pytest", *accelerator_test_files(), "-m", marker]
    command += ["-o", "addopts=", "-ra", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", "4" if not smoke else "2"]
    return command


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases = []
    for case in (c for suite in suites for c in suite.iter("testcase")):
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or "").splitlines()[0][:300] if found.get("message") else ""
        cases.append(
            {
                "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
            }
        )
    count = lambda o: sum(c["outcome"] == o for c in cases)
    return {
        "passed": count("passed"),
        "failed": count("failed") + count("error"),
        "skipped": count("skipped"),
        "cases": cases,
    }


# ---------------------------------------------------------------- the check


class Check:
    """Runs the parts within the budget and keeps the results, written after every part."""

    def __init__(self, out: Path, budget_s: float, smoke: bool, plan: list[Part]):
        self.out, self.budget_s, self.smoke, self.plan = out, budget_s, smoke, plan
        self.parts_dir = out / "parts"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.env = child_environment(smoke)
        self.result: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "budget_s": budget_s,
            "smoke": smoke,
            "command": sys.argv,
            "parts": [],
            "environment": None,
            "tests": None,
            "benchmark": [],
            "torch": [],
            "preflight": None,
        }
        self.log_file = open(out / "check.log", "a")  # noqa: SIM115 - open for the whole check

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self) -> int:
        log(
            f"accelerator check, budget {self.budget_s:.0f}s{' (smoke)' if self.smoke else ''}; "
            f"output in {self.out}"
        )
        for i, part in enumerate(self.plan):
            remaining = self.remaining()
            if remaining < part.minimum_s:
                reason = (
                    f"needs at least {part.minimum_s:.0f}s, {max(0.0, remaining):.0f}s of the budget left"
                )
                self.record(part, "skipped", 0.0, reason)
                continue
            # Parts come in order of importance; each keeps the later ones' minimum where it can.
            later = sum(p.minimum_s for p in self.plan[i + 1 :])
            allowed = min(part.cap_s, max(part.minimum_s, remaining - later))
            log(f"{part.title}: up to {allowed:.0f}s")
            status, seconds, detail = getattr(self, f"run_{part.kind}")(part, allowed)
            self.record(part, status, seconds, detail)
        self.result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.result["seconds"] = round(time.perf_counter() - self.start, 1)
        self.write()
        self.log_file.close()
        failed = [p["name"] for p in self.result["parts"] if p["status"] not in ("ok", "skipped")]
        tests = self.result["tests"] or {}
        log(
            f"done in {self.result['seconds']:.0f}s: "
            + (
                f"{len(failed)} part(s) did not succeed: {', '.join(failed)}"
                if failed
                else "every part that ran succeeded"
            )
            + (f"; tests {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed" if tests else "")
        )
        print(markdown(self.result), flush=True)
        return 1 if failed else 0

    def record(self, part: Part, status: str, seconds: float, detail: str = "") -> None:
        entry = {"name": part.name, "title": part.title, "status": status, "seconds": round(seconds, 1)}
        if detail:
            entry["detail"] = detail
        self.result["parts"].append(entry)
        log(f"{part.title}: {status} in {seconds:.0f}s{f' ({detail})' if detail else ''}")
        self.write()

    def write(self) -> None:
        self.result["comparison"] = comparisons(self.result)
        (self.out / "check.json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        (self.out / "check.md").write_text(markdown(self.result))

    # ---- the kinds of part

    def run_environment(self, part: Part, allowed: float) -> tuple[str, float, str]:
        path = self.parts_dir / "environment.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--environment_json", str(path)]
        status, seconds = run_process(command, allowed, self.log_file, self.env)
        if status == "ok":
            self.result["environment"] = json.loads(path.read_text())
            env = self.result["environment"]
            return status, seconds, f"{env['device_count']} x {env['device_kind']} ({env['platform']})"
        return status, seconds, "see check.log"

    def run_tests(self, part: Part, allowed: float) -> tuple[str, float, str]:
        junit = self.parts_dir / "tests.xml"
        env = {**self.env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # several test processes share a GPU
        status, seconds = run_process(test_command(junit, self.smoke), allowed, self.log_file, env)
        if junit.exists():
            self.result["tests"] = read_junit(junit)
            tests = self.result["tests"]
            detail = f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
            if status.startswith("failed") and tests["failed"]:
                detail += ": " + ", ".join(
                    c["test"] for c in tests["cases"] if c["outcome"] in ("failed", "error")
                )
            return status, seconds, detail
        return status, seconds, "no test report; see check.log"

    def run_benchmark(
        self, part: Part, allowed: float, extra: tuple[str, ...] = ()
    ) -> tuple[str, float, str]:
        path = self.parts_dir / f"{part.name}.json"
        path.unlink(missing_ok=True)
        budget = f"--time_budget_s={max(1.0, allowed - 15):.0f}"
        command = [*benchmark_command((*part.args, *extra), path), budget]
        status, seconds = run_process(command, allowed, self.log_file, self.env)
        rows = json.loads(path.read_text()) if path.exists() else []
        for row in rows:
            row.pop("flags", None)
            row["part"] = part.name
        self.result["benchmark"].extend(rows)
        return status, seconds, f"{len(rows)} row(s)"

    def run_profile(self, part: Part, allowed: float) -> tuple[str, float, str]:
        """benchmark.py --profile: its rows carry the device time by category (`trace_report`)."""
        return self.run_benchmark(part, allowed, (f"--profile={self.parts_dir / 'profile'}",))

    def run_end_to_end(self, part: Part, allowed: float) -> tuple[str, float, str]:
        """The real loaders feeding the real step in one benchmark.py call, beside device batches:
        a generated JPEG folder (`loader_benchmark.write_jpeg_folder`), decoded by DALI (nvJPEG,
        when the dali extra is installed) and by grain on every core."""
        start = time.perf_counter()
        folder = self.parts_dir / "jpegs"
        if not folder.exists():  # written aside and renamed: a killed run leaves no half folder
            partial = self.parts_dir / "jpegs.partial"
            shutil.rmtree(partial, ignore_errors=True)
            code = "import sys; from resnet_jax.loader_benchmark import write_jpeg_folder as write; "
            code += "write(sys.argv[1], int(sys.argv[2]))"
            command = [sys.executable, "-c", code, str(partial), str(part.images)]
            status, _ = run_process(command, allowed, self.log_file, self.env)
            if status != "ok":
                return status, time.perf_counter() - start, "writing the JPEG folder failed; see check.log"
            partial.rename(folder)
        try:  # find_spec("nvidia.dali") raises where there is no nvidia package at all
            have_dali = importlib.util.find_spec("nvidia.dali") is not None
        except ModuleNotFoundError:
            have_dali = False
        loaders = "grain,dali" if have_dali else "grain"
        left = allowed - (time.perf_counter() - start)
        extra = (f"--data=device,folder:{folder}", f"--loader={loaders}")  # the baseline first
        status, seconds, detail = self.run_benchmark(part, left, extra)
        if not have_dali:
            detail += "; DALI not installed (the dali extra), so no DALI row"
        return status, time.perf_counter() - start, detail

    def run_torch(self, part: Part, allowed: float) -> tuple[str, float, str]:
        missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
        if missing:
            return "skipped", 0.0, f"{' and '.join(missing)} not installed"
        path = self.parts_dir / "torch.json"
        path.unlink(missing_ok=True)
        command = [sys.executable, str(TORCH_SCRIPT), *part.args, f"--json={path}"]
        status, seconds = run_process(command, allowed, self.log_file, self.env)
        rows = json.loads(path.read_text()) if path.exists() else []
        self.result["torch"].extend(rows)
        if status == "timed out" and rows:
            return (
                "ok",
                seconds,
                f"{len(rows)} mode(s) measured; the rest did not fit its share of the budget",
            )
        return status, seconds, f"{len(rows)} mode(s)"

    def run_preflight(self, part: Part, allowed: float) -> tuple[str, float, str]:
        """Compile the row for this GPU's one-device target on the CPU, then compare with the device."""
        sys.path.insert(0, str(ROOT))
        from resnet_jax import targets

        kind = (self.result["environment"] or {}).get("device_kind", "")
        accelerator = targets.accelerator_for_kind(kind)
        name = next(
            (t.name for t in targets.TARGETS.values() if t.accelerator == accelerator and t.devices == 1),
            None,
        )
        if name is None:
            return "skipped", 0.0, f"no preflight target for {kind or 'an unknown device'}"
        path = self.parts_dir / "preflight.json"
        path.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "resnet_jax.preflight",
            *part.args,
            f"--target={name}",
            f"--json={path}",
        ]
        status, seconds = run_process(command, allowed, self.log_file, self.env)
        if not path.exists():
            return status, seconds, "no preflight report; see check.log"
        row = json.loads(path.read_text())["targets"][0]
        batch = int(next(a for a in part.args if a.startswith("--config.batch_size=")).split("=")[1])
        measured = next(
            (
                r
                for r in self.result["benchmark"]
                if r.get("batch_size") == batch and r.get("mode") == "train"
            ),
            {},
        )
        row["device_compiled_memory_bytes"] = measured.get("compiled_memory_bytes")
        row["device_peak_memory_bytes"] = measured.get("peak_memory_bytes")
        self.result["preflight"] = row
        status = "ok" if status == "failed (exit 1)" and row["verdict"] != "does not compile" else status
        return status, seconds, preflight_summary(row)


def preflight_summary(row: dict[str, Any]) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n else "-"  # noqa: E731
    return (
        f"{row['target']}: {row['verdict']}, {gib(row['bytes_per_device'])} predicted on the CPU; on this "
        f"device XLA planned {gib(row['device_compiled_memory_bytes'])}, peak "
        f"{gib(row['device_peak_memory_bytes'])}"
    )


# ---------------------------------------------------------------- the report


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Our train images/s per device against PyTorch's on one device, at the same per-device batch,
    dtype and image size."""
    rows = []
    for theirs in result["torch"]:
        ours = next(
            (
                r
                for r in result["benchmark"]
                if r["mode"] == "train"
                and r["per_device_batch_size"] == theirs["batch_size"]
                and r["image_size"] == theirs["image_size"]
                and r["dtype"] == theirs["dtype"]
                and theirs["model"] == f"torchvision.{r['model']}"
            ),
            None,
        )
        if ours is not None:
            rows.append(
                {
                    "batch_size": theirs["batch_size"],
                    "pytorch_mode": theirs["mode"],
                    "ours_images_per_sec": ours["images_per_sec_per_device"],
                    "pytorch_images_per_sec": theirs["images_per_sec"],
                    "ratio": ours["images_per_sec_per_device"] / theirs["images_per_sec"],
                }
            )
    return rows


def load_tables() -> Any:
    """`resnet_jax/tables.py` loaded by its path: the report formats figures as benchmark.py does,
    and this orchestrator still imports nothing of the package (so no JAX and no TensorFlow start
    here, and a broken install cannot take the report down)."""
    spec = importlib.util.spec_from_file_location("resnet_jax_tables", ROOT / "resnet_jax" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_tables()

# (title, key, format) of the report's tables.
# benchmark.py's columns without its per-device and cache figures, with XLA's compile-time estimate.
BENCHMARK_COLUMNS = [
    column
    for column in tables.BENCHMARK_COLUMNS
    if column[1] not in ("images_per_sec_per_device", "compile_cache_hit", "tflops_per_sec_per_device")
] + [("XLA estimate GiB", "compiled_memory_bytes", "gib")]
TORCH_COLUMNS = [
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("batch", "batch_size", "{}"),
    ("px", "image_size", "{}"),
    ("dtype", "dtype", "{}"),
    ("img/s", "images_per_sec", "{:.1f}"),
    ("median ms", "step_time_median_ms", "{:.1f}"),
    ("p90 ms", "step_time_p90_ms", "{:.1f}"),
    ("first step s", "first_step_seconds", "{:.1f}"),
    ("peak GiB", "peak_memory_bytes", "gib"),
    ("torch", "torch_version", "{}"),
]


def columns_table(columns: list[tuple[str, str, str]], rows: list[dict[str, Any]]) -> list[str]:
    return tables.markdown(*tables.cells(columns, rows))


def markdown(result: dict[str, Any]) -> str:
    """check.md: the figures for people, from check.json."""
    lines = [f"# Accelerator check{' (smoke)' if result['smoke'] else ''}", ""]
    env = result.get("environment")
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        lines += [
            f"- **Devices:** {env['device_count']} x {env['device_kind']} ({env['platform']}), "
            f"{env['process_count']} process(es); host {env['cpu_count']} CPUs, {env['memory_gib']} GiB, "
            f"Python {env['python']} ({env['machine']})",
            f"- **Versions:** {versions}",
            "- **Environment:** "
            + (json.dumps(env["env"]) if env["env"] else "no XLA_/JAX_/CUDA_ variables set"),
        ]
        for device in env["devices"][:8]:
            if device.get("memory_bytes_limit"):
                lines.append(
                    f"- device {device['id']}: {device['memory_bytes_limit'] / 2**30:.1f} GiB usable by JAX"
                )
        for gpu in env.get("nvidia_smi") or []:
            lines.append("- nvidia-smi: " + ", ".join(f"{k} {v}" for k, v in gpu.items()))
    lines += [f"- **Started:** {result['started']}, budget {result['budget_s']:.0f}s"]
    if "seconds" in result:
        lines[-1] += f", took {result['seconds']:.0f}s"
    lines += ["", "## Parts", ""]
    lines += tables.markdown(
        ["part", "status", "s", "detail"],
        [[p["title"], p["status"], f"{p['seconds']:.0f}", p.get("detail", "")] for p in result["parts"]],
    )
    tests = result.get("tests")
    if tests:
        lines += [
            "",
            f"## Correctness: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped",
            "",
        ]
        lines += tables.markdown(
            ["test", "outcome", "s"],
            [
                [
                    c["test"],
                    c["outcome"] + (f" ({c['message']})" if c["message"] else ""),
                    f"{c['seconds']:.1f}",
                ]
                for c in tests["cases"]
            ],
        )
    if result["benchmark"]:
        lines += ["", "## Speed (benchmark.py)", ""]
        lines += columns_table(BENCHMARK_COLUMNS, result["benchmark"])
        lines += [
            "",
            "Peak GiB is the allocator's high-water mark of the part's process (rows of one part share "
            "it, so a row shows the largest so far); XLA estimate GiB is the compiled step's own memory "
            "analysis (arguments + outputs + temporaries - donated), the figure a deviceless preflight "
            "reports.",
        ]
        for row in (r for r in result["benchmark"] if r.get("profile", {}).get("rows")):
            lines += [
                "",
                f"## Where the step's time goes: {row['model']} {row['mode']}, per-device batch "
                f"{row['per_device_batch_size']}, {row['dtype']} (benchmark.py --profile)",
                "",
            ]
            lines += columns_table(tables.PROFILE_COLUMNS, row["profile"]["rows"])
    if result.get("preflight"):
        lines += ["", "## Preflight against the device", "", "- " + preflight_summary(result["preflight"])]
    if result["torch"]:
        lines += ["", "## PyTorch on the same device", ""]
        lines += columns_table(TORCH_COLUMNS, result["torch"])
        ratios = comparisons(result)
        if ratios:
            lines += ["", "Ours against PyTorch, same batch, same device, same run:", ""]
            lines += tables.markdown(
                ["batch per device", "PyTorch", "ours img/s per device", "PyTorch img/s", "ours / PyTorch"],
                [
                    [
                        str(r["batch_size"]),
                        r["pytorch_mode"],
                        f"{r['ours_images_per_sec']:.1f}",
                        f"{r['pytorch_images_per_sec']:.1f}",
                        f"{r['ratio']:.2f}x",
                    ]
                    for r in ratios
                ],
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory for check.json, check.md, check.log and parts/")
    parser.add_argument("--budget_s", type=float, default=420.0, help="seconds for the whole check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: about a minute on a CPU")
    parser.add_argument(
        "--headline_batch", type=int, default=256, help="per-device batch of the PyTorch comparison"
    )
    parser.add_argument("--only", default="", help="comma list of part names to run (default: all)")
    parser.add_argument("--environment_json", help=argparse.SUPPRESS)  # internal: the environment part
    args = parser.parse_args(argv)
    if args.environment_json:
        Path(args.environment_json).write_text(json.dumps(environment_report(), indent=1))
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    if not args.budget_s > 0:
        parser.error(f"--budget_s={args.budget_s} must be a positive number of seconds")
    plan = smoke_plan() if args.smoke else full_plan(args.headline_batch)
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = sorted(set(names) - {p.name for p in plan})
        if unknown:
            parser.error(
                f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(p.name for p in plan)}"
            )
        plan = [p for p in plan if p.name in names]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out={args.out!r} cannot be created: {e}")
    return Check(out, args.budget_s, args.smoke, plan).run()


if __name__ == "__main__":
    sys.exit(main())
