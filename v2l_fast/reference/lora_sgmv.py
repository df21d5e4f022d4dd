"""Segmented multi-adapter LoRA (SGMV), the reference.

Tokens ``x [T, I]`` come in contiguous segments ``seg_indptr [S+1]``; segment ``s`` uses adapter
``seg_adapter[s]`` (``-1``: none). Adapter ``a`` has factors ``A[a] [R, I]`` and ``B[a] [R, O]``
(rank-major, FRAMES2LORA_SPEC §4) of which only the first ``ranks[a]`` rows count, so adapters of
different ranks share one stacked pool. A 4-D pool ``[n, L, R, ·]`` holds every decoder layer and
``layer`` picks one. For token t in a segment with adapter a::

    y[t] = base[t] + scaling · (x[t] @ A[a, :r_a]ᵀ) @ B[a, :r_a]
"""

from __future__ import annotations

import torch

from v2l_fast.errors import check_dim, check_tensor, describe, fail


def check_lora_sgmv_args(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    ranks: torch.Tensor | None,
    layer: int | None,
    base: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Validate `lora_sgmv` arguments; raise ValueError naming the offending one.

    Shape, dtype and device checks are free (metadata only) and always run. ``check_values``
    adds the data-dependent checks (indptr monotone and ending at T, adapter ids and ranks in
    range), which read tensors and so synchronise with a GPU: skip them in a hot loop.
    """
    check_tensor("x", x, ndim=2, floating=True, shape_hint="[T, I]")
    dev = x.device
    T, I = x.shape
    check_tensor("A", A, ndim=(3, 4), floating=True, device=dev, shape_hint="[n, R, I] or [n, L, R, I]")
    check_tensor("B", B, ndim=A.dim(), floating=True, device=dev,
                 shape_hint="[n, R, O]" if A.dim() == 3 else "[n, L, R, O] (same rank as A)")
    check_dim("A", A, -1, I, "I, the width of x")
    if A.shape[:-1] != B.shape[:-1]:
        fail("B", f"leading dims {list(A.shape[:-1])} matching A ([n, R] or [n, L, R])", describe(B))
    n, R = A.shape[0], A.shape[-2]
    if A.dim() == 4:
        L = A.shape[1]
        if layer is None:
            fail("layer", f"a layer index in [0, {L}) for the 4-D adapter pool A", None)
        if not isinstance(layer, int) or not 0 <= layer < L:
            fail("layer", f"an int in [0, {L})", layer)
    elif layer is not None:
        fail("layer", "None for a 3-D adapter pool A [n, R, I]", layer)
    check_tensor("seg_indptr", seg_indptr, ndim=1, index=True, device=dev, shape_hint="[S+1]")
    if seg_indptr.numel() < 1:
        fail("seg_indptr", "at least one element ([S+1] with seg_indptr[0] == 0)", describe(seg_indptr))
    S = seg_indptr.numel() - 1
    check_tensor("seg_adapter", seg_adapter, ndim=1, index=True, device=dev, shape_hint=f"[S] = [{S}]")
    check_dim("seg_adapter", seg_adapter, 0, S, "S, one adapter id per segment")
    if ranks is not None:
        check_tensor("ranks", ranks, ndim=1, index=True, device=dev, shape_hint=f"[n] = [{n}]")
        check_dim("ranks", ranks, 0, n, "n, one rank per adapter")
    if base is not None:
        check_tensor("base", base, ndim=2, floating=True, device=dev, shape_hint=f"[T, O] = [{T}, {B.shape[-1]}]")
        if tuple(base.shape) != (T, B.shape[-1]):
            fail("base", f"shape [{T}, {B.shape[-1]}] ([T, O])", describe(base))
    if not check_values:
        return
    ptr = seg_indptr.tolist()
    if ptr[0] != 0 or ptr[-1] != T:
        shown = ptr if len(ptr) <= 16 else f"[{ptr[0]}, ..., {ptr[-1]}]"
        fail("seg_indptr", f"to start at 0 and end at T = {T}", shown)
    if any(b < a for a, b in zip(ptr, ptr[1:])):
        fail("seg_indptr", "a non-decreasing sequence", ptr if len(ptr) <= 16 else "a sequence with a decreasing step")
    if S and not bool(((seg_adapter >= -1) & (seg_adapter < n)).all()):
        fail("seg_adapter", f"ids in [-1, {n}) (n = {n} adapters; -1 means none)", seg_adapter.tolist())
    if ranks is not None and n and not bool(((ranks >= 0) & (ranks <= R)).all()):
        fail("ranks", f"values in [0, {R}] (R = {R}, the pool's rank)", ranks.tolist())


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
    check: bool = True,
    metadata: object | None = None,
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
        check: run the data-dependent argument checks (a host sync on GPU).
        metadata: the once-per-batch token grouping of the kernel backends
            (`v2l_fast.ops.lora_sgmv.lora_sgmv_metadata`); accepted so the signatures match, and
            ignored here: the reference derives everything from seg_indptr and seg_adapter.

    Returns:
        ``[T, O]`` in ``base.dtype`` (or ``x.dtype`` without base), accumulated in fp32
        (fp64 when any input is fp64). A new tensor: ``base`` is not modified.
    """
    check_lora_sgmv_args(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, base=base,
                         check_values=check)
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
        delta = delta.index_add(0, rows, shrunk @ B[a, :r].to(acc))
    delta = delta * scaling
    if base is None:
        return delta.to(x.dtype)
    return (base.to(acc) + delta).to(base.dtype)
