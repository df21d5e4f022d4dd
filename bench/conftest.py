"""Benchmark suite set-up: `pytest bench/ --benchmark` (or `--benchmark-only`) runs it.

Without either flag the benchmarks are collected but skipped, so a stray `pytest bench/` is
cheap. Each benchmark records a row through the `bench_record` fixture; at the end of the run
every module's rows are written to ``bench/results/<module>_<device>.json`` together with the
device, library versions, the CPU heap's policy (`v2l_fast.heap`: freed memory kept in the
process, as the ``v2l-fast`` command runs; ``V2L_FAST_HEAP=system`` for the C library's defaults)
and the measured copy bandwidth — after every row, so that a run stopped
part-way (the GPU runbook's per-stage timeout) keeps what it measured.
"""

from __future__ import annotations

import pytest

from v2l_fast import heap

from harness import ResultLog


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the v2l_fast benchmark suite (same as --benchmark-only)")


def _enabled(config) -> bool:
    return bool(config.getoption("--benchmark") or config.getoption("--benchmark-only", default=False))


def pytest_configure(config):
    if config.getoption("--benchmark"):
        # pytest-benchmark's own switch: run only tests that use the benchmark fixture.
        config.option.benchmark_only = True
    if _enabled(config):
        heap.retain_freed_memory()  # as `v2l-fast` runs; every provider of a row shares the process


def pytest_collection_modifyitems(config, items):
    if _enabled(config):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest bench/ --benchmark`")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_log(request) -> ResultLog:
    """Session-wide result log, written to bench/results/ when the run ends."""
    log = ResultLog()
    yield log
    for path in log.write():
        print(f"\nbench results: {path}")


@pytest.fixture
def bench_record(bench_log, request):
    """``bench_record(benchmark, **row)``: store one measured row for this test's module."""
    module = request.module.__name__.rsplit(".", 1)[-1]

    def record(benchmark, **row):
        bench_log.add(module, benchmark, **row)
        bench_log.write()  # after every row: a run stopped part-way (a stage timeout) keeps its rows

    return record
