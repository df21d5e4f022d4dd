"""Keep freed CPU memory in the process heap, so that large tensors stop costing page faults.

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves every block over its mmap
threshold (128 KiB at start, raised dynamically up to 32 MiB) with a fresh ``mmap`` and hands it
back to the kernel on ``free``, and trims the top of the heap past 128 KiB of free space: the next
tensor of that size starts on pages the kernel has to fault in and zero, one 4 KiB page at a time.
A training step makes and drops the same large tensors every step (a chunk of the LM head's logits
is 200 MB, the hypernetwork's and decoder's activations tens of MB each), so it pays that
zeroing again each time. Measured on the 2-core CI machine (bench/NOTES.md, "Page faults"): a
fresh 200 MB logits chunk's GEMM took 0.60 s against 0.18 s into memory the process already held,
the hypernetwork training step of `bench/bench_train.py` fell from 5.18 to 4.62 s (the authors'
step, in the same process, from 9.34 to 6.65 s) with one page fault left in a step, and the
serving engine's 512-request batch from 3.29 to 2.68 s.

`retain_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block from the heap) and
``M_TRIM_THRESHOLD`` to its maximum (freed memory stays with the process), as jemalloc and
tcmalloc do by design and as PyTorch's CPU tuning guide recommends them for. The cost: the
process keeps the memory of its peak (a training step reaches that peak every step anyway). The
``v2l-fast`` command applies it at start; set ``V2L_FAST_HEAP=system`` to keep the C library's
defaults. Where the C library is not glibc (macOS, musl) nothing changes and `heap_policy` says so.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 becomes SIZE_MAX: never trim.
NEVER = -1
ENV = "V2L_FAST_HEAP"

_policy = "the C library's defaults (retain_freed_memory not called)"


def _mallopt():
    """glibc's ``mallopt`` or None where the process's C library has none that means the same."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
        return None
    return libc.mallopt


def retain_freed_memory() -> bool:
    """Serve every CPU allocation from the heap and never trim it (module docstring); True if applied.

    Process-wide and idempotent. Not applied (False, reason in `heap_policy`) when
    ``$V2L_FAST_HEAP`` is ``system`` or the C library is not glibc.
    """
    global _policy
    if os.environ.get(ENV, "").lower() == "system":
        _policy = f"the C library's defaults (${ENV}=system)"
        return False
    mallopt = _mallopt()
    if mallopt is None:
        _policy = f"the C library's defaults (not glibc: {sys.platform})"
        return False
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER)):
        _policy = "the C library's defaults (glibc refused mallopt)"
        return False
    _policy = f"freed memory retained (glibc mallopt: no mmap, no trim; ${ENV}=system to disable)"
    return True


def heap_policy() -> str:
    """How this process's CPU heap treats freed memory, in words (for ``v2l-fast info`` and bench JSON)."""
    return _policy
