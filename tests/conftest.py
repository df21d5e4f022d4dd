"""Shared pytest set-up: the `gpu` marker skips without CUDA; kernel tests use the interpreter."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

import v2l_fast  # noqa: F401  (first: a checkout root on sys.path, from `python -m pytest`, leaves it)

# Triton kernels run on the CPU through the interpreter in tests (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item):
    """A test marked ``triton``, or parametrized with ``backend="triton"``, skips with the reason where
    the triton backend cannot run (no triton; on the CPU, no interpreter or one that cannot run the
    kernels: `v2l_fast.ops.registry.runtime_missing`)."""
    callspec = getattr(item, "callspec", None)
    if item.get_closest_marker("triton") or (callspec is not None and callspec.params.get("backend") == "triton"):
        from v2l_fast.ops.registry import runtime_missing

        missing = runtime_missing("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if missing:
            pytest.skip(f"triton: {missing}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def bench_module():
    """``bench_module(name)``: a module of bench/ (``harness``, ``bench_e2e_ttft``, …), imported with
    bench/ on ``sys.path`` for the test module's duration (its files import each other by name)."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(bench)


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def quick_replication(tmp_path_factory):
    """``(out_dir, report, log lines)`` of one `replicate` run with the few-second `QUICK` settings."""
    from v2l_fast.train.replicate import QUICK, replicate

    out = tmp_path_factory.mktemp("replicate")
    lines: list[str] = []
    report = replicate(out, QUICK, progress=False, log=lines.append)
    return out, report, lines
