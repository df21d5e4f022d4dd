"""Freed CPU memory kept in the heap: a large tensor made again costs no page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v2l_fast import heap

# In a fresh process (the policy is process-wide): make and drop a 64 MiB tensor 8 times, then count
# the minor page faults of 16 more. glibc's defaults serve each with a new mmap (16,384 fresh 4 KiB
# pages every time); with the policy the heap grows for the first few (glibc's aligned allocation
# does not refit a freed block of the same size at once) and then reuses the memory it holds.
PROBE = """
import json, resource, sys, torch
from v2l_fast import heap
applied = heap.retain_freed_memory() if sys.argv[1] == "retain" else False
def cycle():
    torch.ones(1 << 24).sum()  # 64 MiB, made, touched and freed
for _ in range(8):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    cycle()
print(json.dumps(dict(applied=applied, faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                      policy=heap.heap_policy())))
"""


def probe(mode: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(heap._mallopt() is None, reason="the C library is not glibc: the policy is a no-op here")
def test_a_large_tensor_made_again_reuses_the_heap_without_page_faults():
    defaults, retained = probe("defaults"), probe("retain")
    assert defaults["faults"] > 16 * 10_000, defaults  # the probe sees the faults it is there to remove
    # (glibc's heap settles at a random cycle; 2 of 16 cycles still growing it is the most allowed)
    assert retained["applied"] and retained["faults"] <= 2 * 16_384, retained
    assert retained["policy"].startswith("freed memory retained")
    assert defaults["policy"].startswith("the C library's defaults")


def test_the_environment_keeps_the_c_librarys_defaults():
    off = probe("retain", V2L_FAST_HEAP="system")
    assert not off["applied"]
    assert off["policy"] == "the C library's defaults ($V2L_FAST_HEAP=system)"


def test_without_glibc_nothing_changes_and_the_policy_says_why(monkeypatch):
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    monkeypatch.setattr(heap, "_policy", heap._policy)
    monkeypatch.delenv(heap.ENV, raising=False)
    assert heap.retain_freed_memory() is False
    assert heap.heap_policy() == f"the C library's defaults (not glibc: {sys.platform})"


def test_the_command_line_applies_it_and_info_reports_it():
    """``python -m v2l_fast`` from the checkout's root (where ``kernels/`` must not shadow transformers')."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "v2l_fast", "info"], capture_output=True, text=True, timeout=120,
                          cwd=root)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "CPU heap" in line)
    expected = "freed memory retained" if heap._mallopt() else "the C library's defaults"
    assert expected in line
