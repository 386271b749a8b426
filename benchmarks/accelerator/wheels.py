"""The wheels an offline GPU host lacks: fetch them where there is a package index, install them
where there is none.

    python benchmarks/accelerator/wheels.py download [--dest DIR] [--python_version 3.12] [--dali]
    python benchmarks/accelerator/wheels.py split [--dest DIR] [--part_mib 60]
    python benchmarks/accelerator/wheels.py install [--dest DIR] [--target SITE_DIR] [--dali]
    python benchmarks/accelerator/wheels.py verify [--dali]

`wheels.txt` beside this file pins them. `download` takes the CPython/manylinux x86-64 wheels
of each pin with `pip download --no-deps --only-binary=:all:` (and builds the one that exists only
as source), then checks that every pin has exactly one wheel in DIR. `install` runs `pip install
--no-index --no-deps` on exactly those files, so that nothing the host already has (jax, flax,
torch, ...) is touched; `--target` puts them in a directory of their own for hosts whose
site-packages are read-only (then add it to PYTHONPATH). `verify` imports what resnet_jax needs.

`--dali` adds `wheels_dali.txt`: the dali extra (`config.loader="dali"`), about 300 MiB. `split` cuts
every wheel over `--part_mib` into `WHEEL.partNNN` files and a `WHEEL.sha256`, for hosts that receive
files in limited chunks; `install` joins them again and refuses a wheel whose checksum differs. With
`--dali`, a pin whose distribution the host already has (at any version: DALI's common Python
dependencies) is left alone.
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
DALI_PINS_FILE = HERE / "wheels_dali.txt"
PART_MIB = 60
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
DALI_MODULES = ("nvidia.dali.fn", "resnet_jax.dali")


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


def split(dest: Path, part_mib: float = PART_MIB) -> list[Path]:
    """Every wheel in `dest` over `part_mib` as numbered parts plus its SHA-256 (the wheel removed)."""
    import hashlib

    size = int(part_mib * 2**20)
    written = []
    for wheel in sorted(dest.glob("*.whl")):
        if wheel.stat().st_size <= size:
            continue
        data = wheel.read_bytes()
        (dest / f"{wheel.name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
        for number, start in enumerate(range(0, len(data), size)):
            part = dest / f"{wheel.name}.part{number:03d}"
            part.write_bytes(data[start : start + size])
            written.append(part)
        wheel.unlink()
        print(f"{wheel.name}: {len(data) / 2**20:.0f} MiB in {-(-len(data) // size)} parts", flush=True)
    return written


def join(dest: Path) -> list[Path]:
    """The wheels `split` cut up, put together again and checked against their SHA-256."""
    import hashlib

    joined = []
    for checksum in sorted(dest.glob("*.whl.sha256")):
        wheel = dest / checksum.name.removesuffix(".sha256")
        parts = sorted(dest.glob(f"{wheel.name}.part[0-9][0-9][0-9]"))
        if wheel.exists() or not parts:
            continue
        data = b"".join(part.read_bytes() for part in parts)
        if hashlib.sha256(data).hexdigest() != checksum.read_text().strip():
            raise WheelsError(
                f"{wheel.name}: its {len(parts)} parts do not add up to the wheel that was split "
                "(a part is missing or damaged); copy them again"
            )
        wheel.write_bytes(data)
        for part in parts:
            part.unlink()
        joined.append(wheel)
        print(f"joined {wheel.name} from {len(parts)} parts (SHA-256 checked)", flush=True)
    return joined


def installed(pin: Pin) -> str | None:
    """The version of the pin's distribution this environment already has, or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version(pin.name)
    except importlib.metadata.PackageNotFoundError:
        return None


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


def install(
    pins: list[Pin], dest: Path, target: str | None, dry_run: bool = False, keep_installed: bool = False
) -> None:
    """`pip install --no-index --no-deps` of the pins' wheels (joined first, if split); with
    `keep_installed`, a distribution the environment already has is left as it is."""
    if dest.is_dir():
        join(dest)
    if keep_installed and not target:
        present = {pin.name: installed(pin) for pin in pins}
        for name, version in present.items():
            if version is not None:
                print(f"already installed: {name} {version}", flush=True)
        pins = [pin for pin in pins if present[pin.name] is None]
        if not pins:
            return
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


def verify(modules: tuple[str, ...] = MODULES) -> None:
    """Import every module resnet_jax needs from the carried wheels, and the project itself."""
    import importlib

    sys.path.insert(0, str(HERE.parents[1]))
    failed = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - report every failure, not just the first
            failed.append(f"{module}: {type(e).__name__}: {e}")
    if failed:
        raise WheelsError("cannot import " + "; ".join(failed))
    print(f"imported {', '.join(modules)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("download", "split", "install", "verify"))
    parser.add_argument("--dest", default=str(DEFAULT_DEST), help="directory of the wheels")
    parser.add_argument("--python_version", default="3.12", help="download: the host's Python (X.Y)")
    parser.add_argument("--target", help="install: into this directory instead of the environment")
    parser.add_argument("--dry_run", action="store_true", help="print the pip commands only")
    parser.add_argument("--dali", action="store_true", help="also the dali extra (wheels_dali.txt)")
    parser.add_argument("--part_mib", type=float, default=PART_MIB, help="split: the largest part")
    args = parser.parse_args(argv)
    try:
        pins = read_pins() + (read_pins(DALI_PINS_FILE) if args.dali else [])
        if args.action == "download":
            download(pins, Path(args.dest), args.python_version, args.dry_run)
        elif args.action == "split":
            split(Path(args.dest), args.part_mib)
        elif args.action == "install":
            install(pins, Path(args.dest), args.target, args.dry_run, keep_installed=args.dali)
        else:
            verify(MODULES + (DALI_MODULES if args.dali else ()))
    except WheelsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
