"""Grouped multi-chunk composition, the official ``combine_lora`` (FRAMES2LORA_SPEC §5).

Consecutive chunks (e.g. segments of one long video) form a group; each group's adapter is its
chunks' rows chunk-major, then the bias block once, zero-padded to the largest group's rank so
that all groups stack into one tensor. All groups go through one `v2l_fast.ops.compose_adapters`
call (one concatenation along the rank axis of ``max n_chunks + 1`` slots, each ``[G, L, r, ·]``),
not a loop over groups.
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


def _slots(chunks: torch.Tensor, tail: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The ``max(sizes) + 1`` rank blocks ``[G, L, r, ·]`` whose concatenation is every group's factor.

    Slot c of group g holds chunk ``start_g + c`` for c < n_g, ``tail`` for c = n_g and zeros
    after. With equal group sizes the slots are views (no copy before the one concatenation).
    """
    G, n_max = len(sizes), max(sizes)
    if all(n == n_max for n in sizes):
        grouped = chunks.unflatten(0, (G, n_max))
        return [grouped[:, c] for c in range(n_max)] + [tail.expand(G, *tail.shape)]
    # Ragged: gather slot c's chunks (a valid one where the group has fewer), then overwrite the
    # groups whose tail (c = n_g) or zero block (c > n_g) it is; one copy per slot, as the cat.
    sizes_t = torch.tensor(sizes, device=chunks.device)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    slots = []
    for c in range(n_max + 1):
        slot = chunks.index_select(0, starts + torch.clamp(sizes_t - 1, max=c))
        slot[sizes_t == c] = tail
        slot[sizes_t < c] = 0
        slots.append(slot)
    return slots


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
    if scalers is not None:
        A = A * torch.as_tensor(scalers, dtype=A.dtype, device=A.device).view(N, 1, 1, 1)
    # The block after each group's chunks: the scaled bias, or zeros without one.
    if bias is None:
        tails = (A.new_zeros(L, r, A.shape[-1]), B.new_zeros(L, r, B.shape[-1]))
    else:
        tails = (bias[0] * bias_scaler, bias[1] * bias_scaler)
    slots_A, slots_B = (_slots(t, tail, sizes) for t, tail in zip((A, B), tails))
    return ops.compose_adapters(slots_A, slots_B)
