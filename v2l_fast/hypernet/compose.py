"""Grouped multi-chunk composition, the official ``combine_lora`` (FRAMES2LORA_SPEC §5).

Consecutive chunks (e.g. segments of one long video) form a group; each group's adapter is its
chunks' rows chunk-major, then the bias block once, zero-padded to the largest group's rank so
that all groups stack into one tensor. Built on `v2l_fast.ops.compose_adapters`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from v2l_fast import ops
from v2l_fast.errors import check_tensor, describe, fail


def _group_sizes(n_chunks, num_chunks: int) -> list[int]:
    sizes = n_chunks.tolist() if isinstance(n_chunks, torch.Tensor) else list(n_chunks)
    if not sizes or any(type(n) is not int or n < 1 for n in sizes) or sum(sizes) != num_chunks:
        fail("n_chunks", f"positive ints summing to {num_chunks} (the number of chunks)", sizes)
    return sizes


def combine_lora(
    A: torch.Tensor,
    B: torch.Tensor,
    n_chunks: Sequence[int] | torch.Tensor,
    *,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    scalers: Sequence[float] | torch.Tensor | None = None,
    bias_scaler: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-chunk adapters into one adapter per group.

    Args:
        A: ``[N, L, r, I]`` generated down factors of N chunks, in order.
        B: ``[N, L, r, H]`` generated up factors (rank-major).
        n_chunks: ``[G]`` group sizes; group g owns the next ``n_chunks[g]`` chunks.
        bias: optional ``(bias_A [L, r, I], bias_B [L, r, H])``, appended once per group.
        scalers: optional ``[N]`` weights multiplying each chunk's A (not B, not the bias).
        bias_scaler: multiplies both bias factors (so the bias term scales by its square).

    Returns:
        ``(Â [G, L, R_max, I], B̂ [G, L, R_max, H])`` with ``R_max = (max n_chunks + 1)·r``:
        group g holds its chunks' rows chunk-major, then the bias rows, then zeros.
    """
    check_tensor("A", A, ndim=4, floating=True, shape_hint="[N, L, r, I]")
    check_tensor("B", B, ndim=4, floating=True, device=A.device, shape_hint="[N, L, r, H]")
    if B.shape[:3] != A.shape[:3]:
        fail("B", f"shape [{', '.join(map(str, A.shape[:3]))}, H] matching A", describe(B))
    N, L, r, _ = A.shape
    sizes = _group_sizes(n_chunks, N)
    if scalers is not None and len(scalers) != N:
        fail("scalers", f"{N} weights, one per chunk", len(scalers))
    if bias is not None:
        if not isinstance(bias, Sequence) or len(bias) != 2:
            fail("bias", "a pair (bias_A [L, r, I], bias_B [L, r, H])", type(bias).__name__)
        for name, t, like in (("bias[0]", bias[0], A), ("bias[1]", bias[1], B)):
            check_tensor(name, t, ndim=3, floating=True, device=A.device)
            if t.shape != like.shape[1:]:
                fail(name, f"shape {list(like.shape[1:])}", describe(t))
    r_max = (max(sizes) + 1) * r
    out_A = A.new_zeros(len(sizes), L, r_max, A.shape[-1])
    out_B = B.new_zeros(len(sizes), L, r_max, B.shape[-1])
    start = 0
    for g, n in enumerate(sizes):
        chunks = range(start, start + n)
        group_bias = None if bias is None else tuple(t * bias_scaler for t in bias)
        # compose_adapters concatenates along the rank axis, so each chunk is [L, r, *].
        a, b = ops.compose_adapters(
            [A[c] for c in chunks], [B[c] for c in chunks], bias=group_bias,
            weights=None if scalers is None else [scalers[c] for c in chunks])
        out_A[g, :, :a.shape[-2]] = a
        out_B[g, :, :b.shape[-2]] = b
        start += n
    return out_A, out_B
