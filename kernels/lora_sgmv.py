"""Triton kernels of the segmented multi-adapter LoRA (SGMV / BGMV), forward and backward.

``y = base + scaling · (x Aᵀ) B`` per adapter runs as two small kernels over the work tiles of
`LoraSgmvMetadata` (tokens grouped by adapter, ≤ block_m per tile):

- shrink: ``s = x Aᵀ`` into a ``[split, T, R]`` fp32 buffer, split-K over I so that a decode
  batch with few adapters still fills the GPU;
- expand: ``y = base + scaling · s B``, summing the split partials as it loads them, and
  writing every output row (tokens without an adapter get ``base``).

Decode (one token per segment) is the same pair with 16-row tiles: tokens sharing an adapter
share one read of its factors. Rank tiles past ``ranks[a]`` are never loaded or multiplied.
The backward reuses shrink/expand for ``dx = scaling · (dy Bᵀ) A`` and one segmented-GEMM
kernel for ``dA[a] = scaling · Σ_t u_tᵀ x_t`` (u = dy Bᵀ) and ``dB[a] = scaling · Σ_t s_tᵀ dy_t``,
so no per-token copy of A or B is ever made. All products accumulate in fp32; fp32 operands
multiply in full fp32 (``input_precision="ieee"``, not tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v2l_fast.errors import fail
from v2l_fast.kernels._common import interpreting, num_sms
from v2l_fast.kernels.lora_sgmv_metadata import LoraSgmvMetadata


@triton.jit
def _group_rank(ranks_ptr, group, n_adapters, R, HAS_RANKS: tl.constexpr):
    """Effective rank of a work group: ranks[g] (or R) for an adapter, 0 for "no adapter"."""
    if HAS_RANKS:
        return tl.load(ranks_ptr + group, mask=group < n_adapters, other=0).to(tl.int32)
    return tl.where(group < n_adapters, R, 0)


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr):
    """fp32-accumulating product; NATIVE multiplies equal 16-bit operands on tensor cores."""
    if NATIVE:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, w_ptr, s_ptr, ranks_ptr, sorted_tokens_ptr, work_group_ptr, work_start_ptr, work_end_ptr,
    n_adapters, R, K, k_per_split,
    stride_xt, stride_xk, stride_wa, stride_wr, stride_wk, stride_ss, stride_st,
    HAS_RANKS: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    work, split, rank_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    group = tl.load(work_group_ptr + work)
    if group < 0:
        return
    rank = _group_rank(ranks_ptr, group, n_adapters, R, HAS_RANKS)
    if rank_tile * BLOCK_R >= rank:
        return
    start, end = tl.load(work_start_ptr + work), tl.load(work_end_ptr + work)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tokens = tl.load(sorted_tokens_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    w_base = w_ptr + group.to(tl.int64) * stride_wa + offs_r[None, :] * stride_wr
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xt = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_base + offs_k[:, None] * stride_wk, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += _dot(xt, wt, NATIVE_DOT)
    tl.store(s_ptr + split * stride_ss + tokens[:, None] * stride_st + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    s_ptr, w_ptr, base_ptr, out_ptr, ranks_ptr, sorted_tokens_ptr, work_group_ptr, work_start_ptr, work_end_ptr,
    n_adapters, R, N, num_splits, scaling,
    stride_ss, stride_st, stride_wa, stride_wr, stride_wn, stride_bt, stride_bn, stride_ot, stride_on,
    HAS_BASE: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    work, n_tile = tl.program_id(0), tl.program_id(1)
    group = tl.load(work_group_ptr + work)
    if group < 0:
        return
    rank = _group_rank(ranks_ptr, group, n_adapters, R, HAS_RANKS)
    start, end = tl.load(work_start_ptr + work), tl.load(work_end_ptr + work)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tokens = tl.load(sorted_tokens_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + group.to(tl.int64) * stride_wa + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):  # stops at this adapter's rank: no padding work
        offs_r = r + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        s_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(num_splits):
            s_tile += tl.load(s_ptr + split * stride_ss + tokens[:, None] * stride_st + offs_r[None, :],
                              mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        wt = tl.load(w_base + offs_r[:, None] * stride_wr, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(s_tile, wt.to(tl.float32), input_precision="ieee")
    y = acc * scaling
    if HAS_BASE:
        y += tl.load(base_ptr + tokens[:, None] * stride_bt + offs_n[None, :] * stride_bn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sgmv_weight_grad_kernel(
    left_ptr, right_ptr, out_ptr, ranks_ptr, sorted_tokens_ptr, group_start_ptr, group_count_ptr,
    n_adapters, R, K, scaling,
    stride_lt, stride_lr, stride_rt, stride_rk, stride_oa, stride_or, stride_ok,
    HAS_RANKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[a] = scaling · Σ_{t of adapter a} left[t]ᵀ right[t]  ([R, K]; rows ≥ ranks[a] are 0)."""
    adapter, k_tile, rank_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rank = _group_rank(ranks_ptr, adapter, n_adapters, R, HAS_RANKS)
    offs_r = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    r_mask, k_mask = offs_r < rank, offs_k < K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if rank_tile * BLOCK_R < rank:
        start = tl.load(group_start_ptr + adapter)
        count = tl.load(group_count_ptr + adapter)
        for m in range(0, count, BLOCK_M):
            offs_m = m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < count
            tokens = tl.load(sorted_tokens_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
            lt = tl.load(left_ptr + tokens[None, :] * stride_lt + offs_r[:, None] * stride_lr,
                         mask=r_mask[:, None] & m_mask[None, :], other=0.0)
            rt = tl.load(right_ptr + tokens[:, None] * stride_rt + offs_k[None, :] * stride_rk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.dot(lt, rt.to(tl.float32), input_precision="ieee")
    tl.store(out_ptr + adapter.to(tl.int64) * stride_oa + offs_r[:, None] * stride_or + offs_k[None, :] * stride_ok,
             (acc * scaling).to(out_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & k_mask[None, :])


def _rank_block(R: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(R, 1))))


def _k_block() -> int:
    # Wide tiles cut the interpreter's Python overhead; 64 keeps GPU registers in check.
    return 256 if interpreting() else 64


def _split_k(num_programs: int, K: int, block_k: int, device: torch.device) -> int:
    """Enough K-splits that the shrink launches ~4 programs per SM, each with ≥ 4 K-tiles."""
    k_tiles = triton.cdiv(K, block_k)
    return max(1, min(4 * num_sms(device) // max(num_programs, 1), k_tiles // 4))


def sgmv_shrink(x: torch.Tensor, w: torch.Tensor, meta: LoraSgmvMetadata, ranks: torch.Tensor | None,
                *, split_k: int | None = None) -> torch.Tensor:
    """``s[split, t, :r] = x[t] @ w[a_t, :r]ᵀ`` partials, fp32 ``[split, T, R]``; Σ over split = s.

    ``w`` is ``[n, R, K]`` with any strides (e.g. one layer of a ``[n, L, R, K]`` pool).
    Rows of tokens without an adapter, and ranks ≥ ranks[a], are left unwritten.
    """
    T, K = x.shape
    R = w.shape[1]
    block_r, block_k = _rank_block(R), _k_block()
    rank_tiles = triton.cdiv(R, block_r)
    if split_k is None:
        split_k = _split_k(meta.num_work * rank_tiles, K, block_k, x.device)
    s = torch.empty(split_k, T, R, dtype=torch.float32, device=x.device)
    if meta.num_work == 0 or R == 0:
        return s
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    native = x.dtype == w.dtype and x.dtype in (torch.float16, torch.bfloat16)
    _sgmv_shrink_kernel[(meta.num_work, split_k, rank_tiles)](
        x, w, s, ranks if ranks is not None else s, meta.sorted_tokens, meta.work_group, meta.work_start,
        meta.work_end, w.shape[0], R, K, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), s.stride(0), s.stride(1),
        HAS_RANKS=ranks is not None, NATIVE_DOT=native,
        BLOCK_M=meta.block_m, BLOCK_R=block_r, BLOCK_K=block_k)
    return s


def sgmv_expand(s: torch.Tensor, w: torch.Tensor, meta: LoraSgmvMetadata, ranks: torch.Tensor | None,
                scaling: float, base: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = base[t] + scaling · (Σ_split s[:, t, :r]) @ w[a_t, :r]``, ``[T, N]`` in ``out_dtype``.

    Every row is written: tokens without an adapter (or of rank 0) get ``base`` (or 0).
    """
    T, R, N = s.shape[1], w.shape[1], w.shape[2]
    out = torch.empty(T, N, dtype=out_dtype, device=s.device)
    if meta.num_work == 0 or N == 0:
        return out
    block_n = 256 if interpreting() else 64
    b = base if base is not None else out
    _sgmv_expand_kernel[(meta.num_work, triton.cdiv(N, block_n))](
        s, w, b, out, ranks if ranks is not None else s, meta.sorted_tokens, meta.work_group,
        meta.work_start, meta.work_end, w.shape[0], R, N, s.shape[0], float(scaling),
        s.stride(0), s.stride(1), w.stride(0), w.stride(1), w.stride(2), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1),
        HAS_BASE=base is not None, HAS_RANKS=ranks is not None,
        BLOCK_M=meta.block_m, BLOCK_R=_rank_block(R), BLOCK_N=block_n)
    return out


def sgmv_weight_grad(left: torch.Tensor, right: torch.Tensor, meta: LoraSgmvMetadata, ranks: torch.Tensor | None,
                     R: int, scaling: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``out[a] = scaling · Σ_{t of a} left[t, :r]ᵀ right[t]``: ``[n, R, K]``, zero past ranks[a]."""
    n, K = meta.num_adapters, right.shape[1]
    out = torch.empty(n, R, K, dtype=out_dtype, device=right.device)
    if out.numel() == 0:
        return out
    block_r, block_k = _rank_block(R), (256 if interpreting() else 64)
    _sgmv_weight_grad_kernel[(n, triton.cdiv(K, block_k), triton.cdiv(R, block_r))](
        left, right, out, ranks if ranks is not None else out, meta.sorted_tokens, meta.group_start,
        meta.group_count, n, R, K, float(scaling),
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_RANKS=ranks is not None, BLOCK_M=32, BLOCK_R=block_r, BLOCK_K=block_k)
    return out


def _forward(x, A, B, base, meta, ranks, scaling):
    shrunk = sgmv_shrink(x, A, meta, ranks)
    out_dtype = base.dtype if base is not None else x.dtype
    return sgmv_expand(shrunk, B, meta, ranks, scaling, base, out_dtype), shrunk


class LoraSgmvFunction(torch.autograd.Function):
    """Autograd of the SGMV forward: dx, dA, dB (of one layer's ``[n, R, ·]`` views) and dbase."""

    @staticmethod
    def forward(ctx, x, A, B, base, meta, ranks, scaling):
        out, shrunk = _forward(x, A, B, base, meta, ranks, scaling)
        ctx.save_for_backward(x, A, B, shrunk)
        ctx.meta, ctx.ranks, ctx.scaling = meta, ranks, scaling
        ctx.base_dtype = base.dtype if base is not None else None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, A, B, shrunk = ctx.saved_tensors
        meta, ranks, scaling = ctx.meta, ctx.ranks, ctx.scaling
        need_x, need_A, need_B, need_base = ctx.needs_input_grad[:4]
        dx = dA = dB = dbase = None
        if need_x or need_A:
            u = sgmv_shrink(dy, B, meta, ranks)  # dy Bᵀ, [split, T, R]
            if need_x:
                dx = sgmv_expand(u, A, meta, ranks, scaling, None, x.dtype)
            if need_A:
                dA = sgmv_weight_grad(u.sum(0), x, meta, ranks, A.shape[1], scaling, A.dtype)
        if need_B:
            dB = sgmv_weight_grad(shrunk.sum(0), dy, meta, ranks, B.shape[1], scaling, B.dtype)
        if need_base:
            dbase = dy.to(ctx.base_dtype)
        return dx, dA, dB, dbase, None, None, None


def lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m):
    """Triton backend of `v2l_fast.ops.lora_sgmv`, called with the op's kernel arguments.

    Arguments are validated by the op: ``A``/``B`` are one layer's ``[n, R, ·]`` factors (any
    strides) and ``work``/``block_m`` the batch's `LoraSgmvMetadata` tensors. The segments
    themselves are read through the work lists only. Differentiable in x, A, B and base.
    """
    for name, t in (("x", x), ("A", A), ("B", B), ("base", base)):
        if t is not None and t.dtype == torch.float64:
            fail(name, "fp32/fp16/bf16 for the triton backend (fp64: use backend='torch')", t.dtype)
    meta = LoraSgmvMetadata.from_tensors(work, block_m)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, base)):
        return LoraSgmvFunction.apply(x, A, B, base, meta, ranks, float(scaling))
    return _forward(x, A, B, base, meta, ranks, float(scaling))[0]
