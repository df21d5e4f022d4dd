"""Segmented multi-adapter LoRA (SGMV), the reference.

Tokens ``x [T, I]`` come in contiguous segments ``seg_indptr [S+1]``; segment ``s`` uses adapter
``seg_adapter[s]`` (``-1``: none). Adapter ``a`` has factors ``A[a] [R, I]`` and ``B[a] [R, O]``
(rank-major, docs/method.md §4) of which only the first ``ranks[a]`` rows count, so adapters of
different ranks share one stacked pool. A 4-D pool ``[n, L, R, ·]`` holds every decoder layer and
``layer`` picks one. For token t in a segment with adapter a::

    y[t] = base[t] + scaling · (x[t] @ A[a, :r_a]ᵀ) @ B[a, :r_a]
"""

from __future__ import annotations

import torch


def token_adapters(seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-token adapter id ``[T]`` from segment metadata (no host sync)."""
    lengths = seg_indptr[1:] - seg_indptr[:-1]
    return torch.repeat_interleave(seg_adapter, lengths, output_size=num_tokens)


def lora_sgmv(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    layer: int | None = None,
    scaling: float = 1.0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply each segment's LoRA adapter to its tokens: ``base + scaling · Δ``.

    Args:
        x: ``[T, I]`` input tokens, grouped in contiguous segments.
        A: ``[n, R, I]`` adapter down factors, or ``[n, L, R, I]`` with ``layer``.
        B: ``[n, R, O]`` adapter up factors (rank-major), or ``[n, L, R, O]``.
        seg_indptr: ``[S+1]`` int segment boundaries, 0 = first ≤ … ≤ last = T.
        seg_adapter: ``[S]`` int adapter id per segment, ``-1`` for none.
        ranks: optional ``[n]`` int, adapter a uses only rows ``[:ranks[a]]`` (default: R).
        layer: index into the layer axis of a 4-D pool; must be None for 3-D.
        scaling: LoRA scale (the spec's α, applied as is).
        base: optional ``[T, O]`` base output to add to; ``None`` returns Δ alone.

    Returns:
        ``[T, O]`` in ``base.dtype`` (or ``x.dtype`` without base), accumulated in fp32
        (fp64 when any input is fp64), under autocast too (it is switched off inside). A new
        tensor: ``base`` is not modified.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks, layer, scaling, base)


def _lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks, layer, scaling, base):
    if layer is not None:
        A, B = A[:, layer], B[:, layer]
    T = x.shape[0]
    acc = torch.float64 if torch.float64 in (x.dtype, A.dtype, B.dtype) else torch.float32
    delta = x.new_zeros(T, B.shape[-1], dtype=acc)
    tok_adapter = token_adapters(seg_indptr, seg_adapter, T)
    rank_of = ranks.tolist() if ranks is not None else [A.shape[1]] * A.shape[0]
    for a in tok_adapter.unique().tolist():
        if a < 0 or rank_of[a] == 0:
            continue
        rows = (tok_adapter == a).nonzero().squeeze(1)
        r = rank_of[a]
        shrunk = x[rows].to(acc) @ A[a, :r].to(acc).T
        delta.index_add_(0, rows, shrunk @ B[a, :r].to(acc))  # in place: one [T, O] buffer, not one per adapter
    delta = delta * scaling
    if base is None:
        return delta.to(x.dtype)
    return (base.to(acc) + delta).to(base.dtype)
