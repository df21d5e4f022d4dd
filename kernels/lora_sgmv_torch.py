"""Segmented multi-adapter LoRA in plain PyTorch: batched GEMMs over runs of one adapter.

The ``backend="torch"`` of `v2l_fast.ops.lora_sgmv` (and what the forward-only ``cpp`` backend
hands over to when a gradient is needed); imports no triton.

Consecutive segments with the same adapter form a *run*. A training batch puts the questions
of one video next to each other, so a batch of K videos × Q questions × T tokens is K runs of
Q·T tokens. When every run has the same length ``L`` and the runs tile the tokens (no tokens
without an adapter), ``x`` is a view ``[runs, L, I]`` and the whole op is two batched GEMMs::

    A_r = A[run_adapter] ⊙ (rank mask)      [runs, R, I]   A itself when run r uses adapter r
    s   = x_r A_rᵀ                          [runs, L, R]
    y   = base + scaling · s B_r            [runs, L, O]

and autograd of ``bmm`` gives the backward as GEMMs too: ``dx = scaling · (dy B_rᵀ) A_r``,
``dA_r = scaling · (dy B_rᵀ)ᵀ x_r``, ``dB_r = scaling · s_rᵀ dy``, with runs of the same adapter
summed by the gather's backward (an index_add over runs, never over tokens). Compared with the
per-row copies of the authors' code (each batch row's adapter ``repeat_interleave``-d, then
einsum), a video's Q questions share one copy and one GEMM. Rows beyond an adapter's rank are
masked on A only: s is then zero there, so dB is too.

Other layouts (ragged runs, tokens without an adapter, decode with a different adapter per
token) run the reference's per-adapter loop. Detecting the layout reads ``seg_indptr`` and
``seg_adapter`` on the host: free for CPU tensors, one synchronisation for CUDA ones (where
``auto`` picks triton, not this backend).
"""

from __future__ import annotations

import torch


def uniform_runs(seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int) -> list[int] | None:
    """The adapter of each run when the runs have equal lengths and tile all tokens, else None.

    A run is a maximal stretch of consecutive non-empty segments with one adapter id ≥ 0.
    """
    ptr, ids = seg_indptr.tolist(), seg_adapter.tolist()
    starts, adapters = [], []
    for s, adapter in enumerate(ids):
        if ptr[s + 1] == ptr[s]:
            continue  # empty segment
        if adapter < 0:
            return None  # tokens without an adapter: not a tiling by runs
        if not adapters or adapters[-1] != adapter:
            starts.append(ptr[s])
            adapters.append(adapter)
    if not adapters:
        return None
    length = num_tokens // len(adapters)
    if length * len(adapters) != num_tokens or any(start != i * length for i, start in enumerate(starts)):
        return None
    return adapters


def lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m, *, fallback):
    """The torch backend of `v2l_fast.ops.lora_sgmv` (kernel arguments, validated by the op).

    Runs the batched-GEMM form when `uniform_runs` finds one, else ``fallback`` (the reference,
    called with the same kernel arguments). Accumulates in fp32 (fp64 when an input is fp64)
    and returns ``base.dtype`` (``x.dtype`` without base), as the reference does.
    """
    T = x.shape[0]
    adapters = uniform_runs(seg_indptr, seg_adapter, T) if T else None
    if adapters is None:
        return fallback(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m)
    acc = torch.float64 if torch.float64 in (x.dtype, A.dtype, B.dtype) else torch.float32
    run_adapter = torch.tensor(adapters, device=x.device)
    A_r, B_r = A.to(acc), B.to(acc)
    if adapters != list(range(A.shape[0])):  # else each adapter is one run, in order: no gather
        A_r, B_r = A_r.index_select(0, run_adapter), B_r.index_select(0, run_adapter)
    if ranks is not None:
        R = A.shape[1]
        keep = torch.arange(R, device=x.device) < ranks[run_adapter].unsqueeze(1)
        A_r = A_r * keep.unsqueeze(2).to(acc)
    runs, O = len(adapters), B.shape[-1]
    shrunk = torch.bmm(x.to(acc).reshape(runs, T // runs, x.shape[1]), A_r.transpose(1, 2))
    if base is None:
        return (torch.bmm(shrunk, B_r) * scaling).view(T, O).to(x.dtype)
    # base + scaling · s B as one GEMM epilogue (no separate scale and add passes over [T, O]).
    out = torch.baddbmm(base.to(acc).reshape(runs, T // runs, O), shrunk, B_r, alpha=scaling)
    return out.view(T, O).to(base.dtype)
