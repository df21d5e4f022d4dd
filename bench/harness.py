"""Timing helpers shared by the benchmark modules (imported by bench/conftest.py).

`timed(fn)` wraps a callable so that pytest-benchmark's clock sees finished GPU work;
`ResultLog` gathers rows and writes them as JSON with the machine's description.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

from v2l_fast.heap import heap_policy

from plots import plot_engine_throughput

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """``fn`` followed by a device synchronisation, for wall-clock timing."""

    def run():
        out = fn()
        synchronize()
        return out

    return run


def peak_memory(fn) -> int | None:
    """Peak CUDA memory (bytes) allocated while ``fn`` runs above what was live before; None on CPU."""
    if not torch.cuda.is_available():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(benchmark, record, fn, *, rounds: int, **row) -> None:
    """Peak memory once, then ``rounds`` timed rounds after a warm-up, then ``record`` the row.

    An out-of-memory run is recorded with ``error="out of memory"`` and the test skipped.
    """
    import pytest

    try:
        row["peak_memory_bytes"] = peak_memory(fn)
        benchmark.pedantic(timed(fn), rounds=rounds, warmup_rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        record(None, **row, error="out of memory")
        pytest.skip(f"out of memory: {row}")
    record(benchmark, **row)


def interleaved(benchmark, record, steps: dict, *, rounds: int, derive=None, **row) -> None:
    """Time every provider's ``step`` once per round, the providers in turn, and record a row each.

    One warm-up call per provider first; round k starts at provider k mod n, so that no provider
    always follows the same one and every provider sees the same load on a shared machine. A row
    holds ``median_s``, ``min_s`` and the raw times, plus ``derive(provider, times)`` when given
    (``times``: every provider's round times). The whole run is one pytest-benchmark round (the
    fixture only marks the test as a benchmark).
    """
    names = list(steps)
    times = {name: [] for name in names}

    def run_all():
        for name in names:
            timed(steps[name])()
        for k in range(rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                start = time.perf_counter()
                timed(steps[name])()
                times[name].append(time.perf_counter() - start)

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    for name in names:
        data = times[name]
        extra = derive(name, times) if derive else {}
        record(None, **row, provider=name, median_s=statistics.median(data), min_s=min(data),
               rounds=len(data), raw_s=data, **extra)


def copy_bandwidth_gbs(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Measured device copy bandwidth in GB/s (read + write) from a large tensor copy."""
    dev = device()
    if dev.type == "cpu":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times) / 1e9


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# Modules whose results JSON gets a PNG beside it: module → plot(payload, png_path).
PLOTS = {"bench_e2e_serve": plot_engine_throughput}


class ResultLog:
    """Rows of benchmark results per module, written as JSON files under bench/results/."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {}
        self._bandwidth: float | None = None

    @property
    def copy_bandwidth(self) -> float:
        if self._bandwidth is None:
            self._bandwidth = copy_bandwidth_gbs()
        return self._bandwidth

    def add(self, module: str, benchmark, **row) -> None:
        """Store ``row`` with the timing statistics of a finished pytest-benchmark run."""
        stats = benchmark.stats.stats if benchmark is not None and benchmark.stats else None
        if stats is not None:
            data = list(stats.data)
            row.update(median_s=statistics.median(data), min_s=min(data), rounds=len(data), raw_s=data)
            if row.get("bytes") and row["median_s"] > 0:
                row["gb_s"] = row["bytes"] / row["median_s"] / 1e9
                row["fraction_of_copy_bw"] = row["gb_s"] / self.copy_bandwidth
        self.rows.setdefault(module, []).append(row)

    def write(self) -> list[Path]:
        RESULTS_DIR.mkdir(exist_ok=True)
        dev = device_name()
        slug = "".join(c if c.isalnum() else "-" for c in dev.split(" (")[0]).strip("-").lower()
        meta = {
            "device": dev,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {p: _version(p) for p in ("torch", "triton", "transformers", "peft", "v2l_fast")},
            "python": platform.python_version(),
            "copy_bandwidth_gb_s": self.copy_bandwidth if self.rows else None,
            "cpu_heap": heap_policy(),
        }
        paths = []
        for module, rows in self.rows.items():
            path = RESULTS_DIR / f"{module}_{slug}.json"
            for row in rows:
                row.setdefault("date", meta["date"])
            payload = {**meta, "results": kept_rows(path, rows) + rows}
            path.write_text(json.dumps(payload, indent=1) + "\n")
            paths.append(path)
            if module in PLOTS:
                paths.append(PLOTS[module](payload, path.with_suffix(".png")))
        return paths


def kept_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier results file ``path`` whose ``op`` this run did not measure again,
    so that running part of a module (``pytest -k``) does not drop the other ops' results; each
    kept row carries the ``date`` of the run that measured it."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    measured = {row.get("op") for row in rows}
    return [dict(row, date=row.get("date", earlier.get("date"))) for row in earlier.get("results", [])
            if row.get("op") not in measured]
