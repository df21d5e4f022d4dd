#!/usr/bin/env python3
"""Prep for the GPU runbook (`make gpu-wheels`): download the wheels the GPU machine lacks.

Run where pip reaches a package registry. The GPU machine (python 3.12, x86-64, no registry)
already holds torch, triton, transformers, peft, safetensors, numpy, pillow, tqdm, pytest,
pytest-benchmark and the build tools; it lacks the packages in WHEELS, which land in wheels/
(ignored by git; carry it to the device), and `make gpu` installs them with
`pip install --no-index --no-deps`. Binary wheels are fetched for the GPU machine's platform;
a package published only as a source archive (docopt) is built into a pure-Python wheel here.

It also copies the authors' code, the benches' peer, from the folders in ``$V2L_AUTHORS_CODE``
(bench/peers.py: their repository's ``src`` and a folder holding einops and jaxtyping) into
wheels/authors/: the GPU machine cannot fetch it, and without it the GPU rows of bench_train and
bench_e2e have no "authors" provider to be measured against. `make gpu` points
``$V2L_AUTHORS_CODE`` at those copies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the GPU machine's image lacks, with why v2l_fast needs it.
WHEELS = {
    "av>=12": "PyAV: video decoding (v2l_fast.vlm.video, the end-to-end tests and bench)",
    "num2words>=0.5": "SmolVLM2's frame prompt, compared in tests/test_vlm_frames.py",
    "docopt>=0.6.2": "a dependency of num2words",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def download_command(req: str, dest: Path, python_version: str) -> list[str]:
    """pip download of the binary wheel of ``req`` for the GPU machine (no dependencies)."""
    platforms = [arg for plat in PLATFORMS for arg in ("--platform", plat)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", *platforms, "-d", str(dest), req]


def build_command(req: str, dest: Path) -> list[str]:
    """pip wheel of ``req`` from its source archive (pure-Python packages only)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary=:all:", "-w", str(dest), req]


def dist_name(req: str) -> str:
    """The distribution part of a requirement ("av>=12" -> "av")."""
    return req.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_").lower()


def fetch(req: str, dest: Path, python_version: str) -> Path:
    """One wheel of ``req`` in ``dest``, replacing any earlier version of it (one version each)."""
    name = dist_name(req)
    for old in dest.glob(f"{name}-*.whl"):
        old.unlink()
    if subprocess.run(download_command(req, dest, python_version), check=False).returncode != 0:
        print(f"{req}: no binary wheel; building one from the source archive", flush=True)
        subprocess.run(build_command(req, dest), check=True)
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"{req}: expected one wheel in {dest}, got {[w.name for w in wheels]}")
    if not wheels[0].name.endswith("-none-any.whl") and f"cp{python_version.replace('.', '')}" not in wheels[0].name:
        raise SystemExit(f"{req}: expected a wheel for cp{python_version} or a pure-Python one, got {wheels[0].name}")
    return wheels[0]


def copy_authors_code(paths: str, dest: Path) -> list[Path]:
    """Copy each folder of ``paths`` (os.pathsep-separated, as ``$V2L_AUTHORS_CODE``) to
    ``dest/authors/<i>-<name>``, replacing an earlier copy; caches and compiled files left out."""
    folders = [Path(p) for p in paths.split(os.pathsep) if p]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"V2L_AUTHORS_CODE: expected folders, got {missing} (not found)")
    target = dest / "authors"
    shutil.rmtree(target, ignore_errors=True)
    copies = [target / f"{i}-{folder.name}" for i, folder in enumerate(folders)]
    for folder, copy in zip(folders, copies):
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copies


def main(argv: list[str] | None = None) -> int:
    """Fetch every wheel of WHEELS into --dest, and copy the authors' code there when it is given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / "wheels", help="wheel folder (default: wheels/)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's python (default: 3.12)")
    p.add_argument("--authors-code", default=os.environ.get("V2L_AUTHORS_CODE", ""),
                   help="folders of the authors' code, os.pathsep-separated (default: $V2L_AUTHORS_CODE)")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for req, why in WHEELS.items():
        print(f"{req}: {why}", flush=True)
        print(f"  -> {fetch(req, args.dest, args.python_version).name}", flush=True)
    if args.authors_code:
        for copy in copy_authors_code(args.authors_code, args.dest):
            print(f"authors' code -> {copy}", flush=True)
    else:
        print("authors' code: $V2L_AUTHORS_CODE unset; the GPU benches will have no authors rows", flush=True)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {size / 2**20:.1f} MiB (the device carries at most 64 MiB with the tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
