"""``v2l-fast info``: versions (the optional packages too, with what needs them), how
``v2l_fast._C`` was built, the backends that run here (and why the others cannot), and the backend
``auto`` picks for each op of the stack on each device."""

from __future__ import annotations

import sys

import torch

import v2l_fast
from v2l_fast.cli.common import format_backends
from v2l_fast.heap import heap_policy
from v2l_fast.ops.registry import BACKENDS, runtime_missing, use_backend
from v2l_fast.precision import bf16_matmul_hardware, bf16_unavailable_reason

# Packages outside the core install and what needs them (pip extras of pyproject.toml).
OPTIONAL_PACKAGES = {"fastapi": "v2l-fast serve", "uvicorn": "v2l-fast serve",
                     "peft": "loading an export-peft directory in peft; the bench peers"}


def add_parser(commands) -> None:
    """Add the ``info`` subcommand to ``commands`` (an argparse subparsers action)."""
    info = commands.add_parser("info", help="versions, the compiled extension, the backends that run here")
    info.set_defaults(run=run_info)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_info(args, device: torch.device) -> int:
    """``v2l-fast info``: versions, how ``v2l_fast._C`` was built, the backends that run here."""
    from v2l_fast.ops import available_backends

    print(f"v2l_fast {v2l_fast.__version__} (python {sys.version.split()[0]})")
    for package in ("torch", "triton", "transformers", "safetensors", "av"):
        print(f"  {package:<13} {_version(package)}")
    for package, needed_by in OPTIONAL_PACKAGES.items():
        print(f"  {package:<13} {_version(package)} (optional: {needed_by})")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"  {'CUDA device':<13} {cuda}")
    print(f"  {'CPU heap':<13} {heap_policy()}")
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        hardware = bf16_matmul_hardware(device)
        training = (f"{hardware}: training autocasts to bf16, --dtype auto loads bf16" if hardware
                    else f"training and --dtype auto stay fp32: {bf16_unavailable_reason(device)}")
        print(f"  {'bf16 on ' + device:<13} {training}")
    print("build_info")
    for key, value in v2l_fast.build_info().items():
        print(f"  {key:<13} {value}")
    available = available_backends()
    print(f"available backends: {', '.join(available)}")
    for name in BACKENDS:
        if name not in available:
            print(f"  {name}: {runtime_missing(name)}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    with use_backend("auto"):  # what auto picks, whatever $V2L_BACKEND says
        for device in devices:
            print(f"auto on {device.type}: {format_backends(device)}")
    return 0
