"""The wheels an offline GPU host lacks: fetch them where there is a package index, install them
where there is none.

    python benchmarks/accelerator/wheels.py download [--dest DIR] [--python_version 3.12]
    python benchmarks/accelerator/wheels.py install [--dest DIR] [--target SITE_DIR]
    python benchmarks/accelerator/wheels.py verify

`wheels.txt` beside this file pins them. `download` takes the CPython/manylinux x86-64 wheels
of each pin with `pip download --no-deps --only-binary=:all:` (and builds the one that exists only
as source), then checks that every pin has exactly one wheel in DIR. `install` runs `pip install
--no-index --no-deps` on exactly those files, so that nothing the host already has (jax, flax,
torch, ...) is touched; `--target` puts them in a directory of their own for hosts whose
site-packages are read-only (then add it to PYTHONPATH). `verify` imports what resnet_jax needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINS_FILE = HERE / "wheels.txt"
DEFAULT_DEST = HERE / "wheels"
# pip matches manylinux tags exactly: list the glibc levels the pinned wheels are built for.
MANYLINUX_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MODULES = (
    "grain",
    "clu.metrics",
    "ml_collections",
    "tensorflow_datasets",
    "tensorboardX",
    "resnet_jax.train",
)


class WheelsError(RuntimeError):
    """A pin, a download or an install that cannot go on; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Pin:
    name: str
    version: str
    build: bool = False  # no wheel on the index: build one from the source distribution

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def wheel_prefix(self) -> str:
        """How a wheel file of this pin starts: the normalised name (PEP 427) and the version."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


def read_pins(path: Path = PINS_FILE) -> list[Pin]:
    pins = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text, _, comment = line.partition("#")
        text = text.strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", text)
        if not match:
            raise WheelsError(f"{path}:{number}: {text!r} is not NAME==VERSION")
        pins.append(Pin(match.group(1), match.group(2), build=comment.strip().startswith("build")))
    return pins


def find_wheels(pins: list[Pin], dest: Path) -> tuple[list[Path], list[Pin]]:
    """The one wheel of each pin in `dest` (case-insensitive names), and the pins without one."""
    files = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    found, missing = [], []
    for pin in pins:
        matches = [f for f in files if f.name.lower().startswith(pin.wheel_prefix())]
        if len(matches) > 1:
            raise WheelsError(f"{dest} holds {len(matches)} wheels of {pin.requirement}: keep one")
        (found.append(matches[0]) if matches else missing.append(pin))
    return found, missing


def run(command: list[str], dry_run: bool) -> None:
    print("$ " + " ".join(command), flush=True)
    if not dry_run and subprocess.run(command).returncode != 0:
        raise WheelsError(f"failed: {' '.join(command)}")


def download(pins: list[Pin], dest: Path, python_version: str, dry_run: bool = False) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cpython = "cp" + python_version.replace(".", "")
    platform_args = [arg for p in MANYLINUX_PLATFORMS for arg in ("--platform", p)]
    binary = [p.requirement for p in pins if not p.build]
    run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version"]
        + [python_version, "--implementation", "cp", "--abi", cpython, "--abi", "abi3", "--abi", "none"]
        + [*platform_args, "-d", str(dest), *binary],
        dry_run,
    )
    for pin in (p for p in pins if p.build):  # pure-Python sources: the wheel suits any platform
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), pin.requirement], dry_run)
    if dry_run:
        return []
    found, missing = find_wheels(pins, dest)
    if missing:
        raise WheelsError(f"no wheel in {dest} for: {', '.join(p.requirement for p in missing)}")
    total = sum(f.stat().st_size for f in found)
    print(f"{len(found)} wheels, {total / 2**20:.1f} MiB in {dest}", flush=True)
    return found


def install(pins: list[Pin], dest: Path, target: str | None, dry_run: bool = False) -> None:
    found, missing = find_wheels(pins, dest)
    if missing:
        raise WheelsError(
            f"{dest} lacks the wheels of {', '.join(p.requirement for p in missing)}: run "
            f"`python {Path(__file__).name} download` on a machine with a package index and copy {dest} here"
        )
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet"]
    if target:
        command += ["--upgrade", "--target", target]
    run([*command, *map(str, found)], dry_run)
    if target and not dry_run:
        print(f"installed into {target}: add it to PYTHONPATH", flush=True)


def verify() -> None:
    """Import every module resnet_jax needs from the carried wheels, and the project itself."""
    import importlib

    sys.path.insert(0, str(HERE.parents[1]))
    failed = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - report every failure, not just the first
            failed.append(f"{module}: {type(e).__name__}: {e}")
    if failed:
        raise WheelsError("cannot import " + "; ".join(failed))
    print(f"imported {', '.join(MODULES)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("download", "install", "verify"))
    parser.add_argument("--dest", default=str(DEFAULT_DEST), help="directory of the wheels")
    parser.add_argument("--python_version", default="3.12", help="download: the host's Python (X.Y)")
    parser.add_argument("--target", help="install: into this directory instead of the environment")
    parser.add_argument("--dry_run", action="store_true", help="print the pip commands only")
    args = parser.parse_args(argv)
    try:
        pins = read_pins()
        if args.action == "download":
            download(pins, Path(args.dest), args.python_version, args.dry_run)
        elif args.action == "install":
            install(pins, Path(args.dest), args.target, args.dry_run)
        else:
            verify()
    except WheelsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
