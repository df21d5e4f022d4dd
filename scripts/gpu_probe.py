#!/usr/bin/env python3
"""First stage of the GPU runbook: what the machine is, and its two measured ceilings.

Records python (and whether its headers, which the extension build needs, are there), the
versions of the packages v2l_fast uses (None when missing), nvcc, the GPU (name, capability,
multiprocessors, memory) and, on CUDA, the device copy bandwidth (bytes read + written) and the
bf16 matmul rate on random data, each the median of timed repeats after a warm-up. Prints the
JSON and writes it to ``--json``. Without CUDA it records the versions only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "peft", "safetensors", "av", "numpy", "pytest", "pytest-benchmark",
            "num2words", "setuptools", "cmake", "ninja", "pybind11")


def versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES, None when missing."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def nvcc_version() -> str | None:
    """Last line of `nvcc --version` ("Build cuda_13.0...") or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else None


def median_ms(fn, repeats: int) -> float:
    """Median time of ``fn`` in ms over ``repeats`` CUDA-event-timed runs, after one warm-up."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbs(nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import torch

    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src), repeats) / 1e6


def matmul_tflops(n: int, repeats: int) -> float:
    """bf16 n x n x n matmul rate in TFLOP/s on random operands."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / median_ms(lambda: a @ b, repeats) / 1e9


def ceilings(copy_bytes: int = 1 << 32, n: int = 8192, repeats: int = 10) -> dict[str, float]:
    """Measured device copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    return {"copy_gbs": round(copy_gbs(copy_bytes, repeats), 1), "copy_bytes": copy_bytes,
            "bf16_matmul_tflops": round(matmul_tflops(n, repeats), 1), "matmul_n": n}


def probe(measure: bool) -> dict:
    """The machine's description; the ceilings too when ``measure`` and CUDA is present."""
    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
            "packages": versions(), "nvcc": nvcc_version()}
    try:
        import torch
    except ImportError as err:
        return {**info, "torch_error": str(err)}
    info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                   "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
    if measure:
        info["ceilings"] = ceilings()
    return info


def main(argv: list[str] | None = None) -> int:
    """Print the probe's JSON and write it to --json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the result here too")
    p.add_argument("--no-measure", action="store_true", help="versions and GPU only, no timed ceilings")
    args = p.parse_args(argv)
    info = probe(measure=not args.no_measure)
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
