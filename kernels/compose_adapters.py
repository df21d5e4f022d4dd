"""Rank-space composition of LoRA adapters (docs/method.md §5): one fused pass, then R × R work.

The op concatenates k segment adapters (and one bias block) along the rank axis, the A rows of
segment i scaled by its weight w_i, so that ΔW = Bᵀ·A of the result is ``Σ w_i B_iᵀ A_i
(+ B_bᵀ A_b)``; optionally it re-compresses that ΔW ``[O, I]`` to its best rank-k approximation
without ever forming it. One Triton kernel reads every segment factor exactly once and, per
column tile,

* applies the per-row weight (w_i for segment i's A rows, 1 for B rows and the bias),
* writes the tile of the concatenated factor ``X [R, K]`` (X = A with K = I, or B with K = O),
* accumulates the R × R Gram matrix ``G = X·Xᵀ`` of the rows it just wrote (when re-compressing).

The factors are read through a per-row table of addresses (the segments are separate tensors,
of any rank R_i and any strides); K is split across programs so that few (layer, adapter)
matrices still fill the GPU, and the split partial Grams are summed by torch (no atomics, so
the result is deterministic). Everything after that is R × R work in torch, in fp64.

Re-compression from the Grams. With ``G_a = A·Aᵀ = V_a Λ_a V_aᵀ`` (eigh) and the kept
eigenpairs (below), ``Q_a = Aᵀ V_a Λ_a^{-½}`` has orthonormal columns and
``Aᵀ = Q_a F_a`` with ``F_a = Λ_a^{½} V_aᵀ``; likewise ``Bᵀ = Q_b F_b``. Then::

    ΔW = Bᵀ A = Q_b (F_b F_aᵀ) Q_aᵀ,      C = F_b F_aᵀ = Λ_b^{½} V_bᵀ V_a Λ_a^{½}   (R × R)
    C = U Σ Wᵀ (SVD)                  ⇒   ΔW_k = Q_b U_k Σ_k W_kᵀ Q_aᵀ  (Eckart–Young: best rank k)
    B_k = Σ_k^{½} U_kᵀ Q_bᵀ = T_b B,   T_b = Σ_k^{½} U_kᵀ Λ_b^{-½} V_bᵀ    (k × R)
    A_k = Σ_k^{½} W_kᵀ Q_aᵀ = T_a A,   T_a = Σ_k^{½} W_kᵀ Λ_a^{-½} V_aᵀ

so the singular values of ΔW are those of the small C, and the rank-k factors are two small
``[k, R]`` matrices applied to the concatenated factors (one batched GEMM each). This is the
reference's QR route (``Aᵀ = Q_a R_a``) with the triangular R_a replaced by the symmetric
square root F_a of the same Gram: any F with FᵀF = G gives the same C up to an orthogonal
gauge, hence the same ΔW_k. The factors themselves are unique only up to that gauge (and the
signs of the singular vectors): compare Bᵀ·A and singular values, not factors.

Rank-deficient inputs. Zero rows (a ragged composition padded with zeros, a zero bias), repeated
segments or R > min(I, O) make the Grams singular, where a Cholesky (or Λ^{-½}) breaks. An
eigenpair is kept only when ``λ > tol · λ_max`` with ``tol = R · ε`` (ε of the Gram's
accumulation dtype: fp32 for fp32/fp16/bf16 input, fp64 for fp64); dropped directions get
Λ^{-½} := 0, i.e. they are treated as exactly null. Zero rows give exactly zero Gram rows, so
they are always dropped and cost nothing; an all-zero matrix gives A_k = B_k = 0. The price of
the Gram route is that it squares the condition number: directions of A (or B) with a singular
value below √tol·σ_max (≈ 3e-3·σ_max for R = 80 in fp32) are treated as null, where the
reference's QR resolves them to ε·σ_max. For generated adapters (random-like, well conditioned
rows) that is far below the ΔW tolerance; the tests pin the realistic cases. Output rank is
``min(k, R, I, O)`` like the reference, padded with zero rows where fewer directions survive.

Tile sizes. A program holds the full Gram accumulator ``[R_pad, R_pad]`` (R_pad = the next power
of two ≥ max(R, 16): ``tl.dot`` needs ≥ 16 on a GPU) and one ``[R_pad, BLOCK_K]`` tile; BLOCK_K
keeps that tile near 4K elements (R_pad 16 → 256, 32 → 128, 64 → 64, 128 → 32) so both fit in
registers (a 128 × 128 fp32 accumulator is 64 KB over 8 warps). Above 128 rows the Gram no
longer fits one program: the kernel then only writes the concatenation (row blocks of 64) and
the Gram is one batched ``X·Xᵀ`` GEMM in torch over what it wrote (one more read of X). The K
split aims at two programs per SM (`num_sms`), never below one column tile per program.

Gradients: the fused pass is an autograd Function (``dX_i = w_i · dY_i``, ``dw_i = Σ dY_i ⊙ X_i``,
with the Gram's ``(dG + dGᵀ)·Y`` added to dY); the R × R work is plain torch autograd, defined,
like the reference's QR/SVD, where the spectra are distinct (not at exactly rank-deficient inputs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from v2l_fast.kernels._common import num_sms

MAX_GRAM_ROWS = 128  # the largest R_pad whose Gram accumulator one program holds
_WRITE_ONLY_ROWS = 64  # row block of the write-only pass (R_pad > MAX_GRAM_ROWS)
_TILE_ELEMENTS = 4096  # R_pad · BLOCK_K of one loaded tile


@triton.jit
def _compose_pass_kernel(
    row_addr_ptr, row_lead_ptr, row_col_ptr, row_weight_ptr, out_ptr, gram_ptr,
    R, K, k_per_split,
    stride_op, stride_or, stride_gp, stride_gs, stride_gr,
    DTYPE: tl.constexpr, ACC: tl.constexpr, WITH_GRAM: tl.constexpr, DOT_MODE: tl.constexpr,
    K_CONTIGUOUS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    p, split, row_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # Row r of the concatenation lives at row_addr[r] + p·row_lead[r] + k·row_col[r] (elements).
    addr = tl.load(row_addr_ptr + offs_r, mask=r_mask, other=0)
    lead = tl.load(row_lead_ptr + offs_r, mask=r_mask, other=0)
    weight = tl.load(row_weight_ptr + offs_r, mask=r_mask, other=0.0)
    rows = addr.to(tl.pointer_type(DTYPE)) + p.to(tl.int64) * lead
    if not K_CONTIGUOUS:
        col = tl.load(row_col_ptr + offs_r, mask=r_mask, other=0)
    out_rows = out_ptr + p.to(tl.int64) * stride_op + offs_r.to(tl.int64) * stride_or
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=ACC)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (offs_k < k_hi)[None, :]
        if K_CONTIGUOUS:
            ptrs = rows[:, None] + offs_k[None, :]
        else:
            ptrs = rows[:, None] + offs_k[None, :].to(tl.int64) * col[:, None]
        x = tl.load(ptrs, mask=mask, other=0.0)
        # Rounded to the output dtype before the Gram: the Gram is that of what is written.
        y = (x.to(ACC) * weight[:, None]).to(DTYPE)
        tl.store(out_rows[:, None] + offs_k[None, :], y, mask=mask)
        if WITH_GRAM:
            if DOT_MODE == 1:  # 16-bit operands: exact products, fp32 accumulation
                acc += tl.dot(y, tl.trans(y))
            elif DOT_MODE == 2:  # fp64
                acc += tl.dot(y, tl.trans(y), out_dtype=tl.float64)
            else:  # fp32 in full precision, not tf32
                acc += tl.dot(y, tl.trans(y), input_precision="ieee")
    if WITH_GRAM:
        tl.store(gram_ptr + p.to(tl.int64) * stride_gp + split * stride_gs + offs_r[:, None] * stride_gr
                 + offs_r[None, :], acc, mask=r_mask[:, None] & r_mask[None, :])


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the weighting and of the Gram accumulation for factors of ``dtype``: fp64 stays fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tiles(num_rows: int) -> tuple[int, int, int, bool]:
    """``(BLOCK_R, BLOCK_K, num_warps, with_gram_in_kernel)`` for a concatenation of ``num_rows`` rows.

    See the module docstring: one program holds all rows (and the R_pad² accumulator) up to
    `MAX_GRAM_ROWS`; beyond, the kernel writes row blocks only.
    """
    r_pad = max(16, triton.next_power_of_2(max(num_rows, 1)))
    if r_pad <= MAX_GRAM_ROWS:
        return r_pad, max(16, _TILE_ELEMENTS // r_pad), 8 if r_pad == MAX_GRAM_ROWS else 4, True
    return _WRITE_ONLY_ROWS, _TILE_ELEMENTS // _WRITE_ONLY_ROWS, 4, False


def _k_split(num_matrices: int, K: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """``(splits, k_per_split)``: about two programs per SM, at least one BLOCK_K tile each."""
    tiles_k = triton.cdiv(K, block_k)
    splits = max(1, min(tiles_k, triton.cdiv(2 * num_sms(device), max(num_matrices, 1))))
    per_split = triton.cdiv(tiles_k, splits) * block_k
    return triton.cdiv(K, per_split), per_split


def compose_pass(parts: Sequence[torch.Tensor], weights: Sequence[float | torch.Tensor], *,
                 with_gram: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused pass: ``(X, G)`` with X the weighted concatenation of ``parts`` along dim -2.

    Args:
        parts: factors ``[..., R_i, K]`` of one dtype with the same leading dims and K.
        weights: one scalar per part (its rows are multiplied by it in the accumulation dtype).
        with_gram: also return ``G = X·Xᵀ [..., R, R]`` in `accumulation_dtype`.

    No autograd (see `ComposePass`); the caller validated the shapes.
    """
    first = parts[0]
    lead, K, dtype, device = first.shape[:-2], first.shape[-1], first.dtype, first.device
    P = math.prod(lead)
    R = sum(t.shape[-2] for t in parts)
    acc_dtype = accumulation_dtype(dtype)
    out = torch.empty(P, R, K, dtype=dtype, device=device)
    gram = None
    if P == 0 or R == 0 or K == 0:
        X = out.view(*lead, R, K)
        return X, (torch.zeros(*lead, R, R, dtype=acc_dtype, device=device) if with_gram else None)
    addr, lead_stride, col_stride, row_weight, keep = [], [], [], [], []
    size = first.element_size()
    for t, w in zip(parts, weights):
        r = t.shape[-2]
        if r == 0:
            continue
        t3 = t.reshape(P, r, K)  # a view unless the leading dims cannot be flattened
        keep.append(t3)
        base, (sp, sr, sk) = t3.data_ptr(), t3.stride()
        addr += [base + j * sr * size for j in range(r)]
        lead_stride += [sp] * r
        col_stride += [sk] * r
        row_weight += [float(w)] * r
    index = dict(dtype=torch.int64, device=device)
    tables = (torch.tensor(addr, **index), torch.tensor(lead_stride, **index), torch.tensor(col_stride, **index),
              torch.tensor(row_weight, dtype=acc_dtype, device=device))
    block_r, block_k, warps, gram_in_kernel = tiles(R)
    gram_in_kernel = gram_in_kernel and with_gram
    splits, per_split = _k_split(P, K, block_k, device)
    if gram_in_kernel:
        gram = torch.empty(P, splits, R, R, dtype=acc_dtype, device=device)
    dummy = out if gram is None else gram
    dot_mode = 1 if dtype in (torch.float16, torch.bfloat16) else 2 if dtype == torch.float64 else 0
    grid = (P, splits, triton.cdiv(R, block_r))
    _compose_pass_kernel[grid](
        *tables, out, dummy, R, K, per_split,
        out.stride(0), out.stride(1), dummy.stride(0) if gram is not None else 0,
        dummy.stride(1) if gram is not None else 0, dummy.stride(2) if gram is not None else 0,
        DTYPE=_TL_DTYPES[dtype], ACC=_TL_DTYPES[acc_dtype], WITH_GRAM=gram_in_kernel, DOT_MODE=dot_mode,
        K_CONTIGUOUS=all(s == 1 for s in col_stride), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps)
    del keep  # the views the address table points into stay alive until the launch is queued
    X = out.view(*lead, R, K)
    if not with_gram:
        return X, None
    if gram is None:  # too many rows for one program's accumulator: one batched GEMM over X
        wide = X.to(acc_dtype)
        return X, wide @ wide.mT
    return X, gram.sum(1).view(*lead, R, R)


class ComposePass(torch.autograd.Function):
    """`compose_pass` with gradients for every part and for tensor weights.

    ``forward(with_gram, weights, *parts)`` → ``(X, G)`` (G empty without ``with_gram``).
    Backward: ``dY = dX + (dG + dGᵀ)·X``, then ``dpart_i = w_i·dY_i`` and ``dw_i = Σ dY_i ⊙ part_i``.
    """

    @staticmethod
    def forward(ctx, with_gram, weights, *parts):
        w = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
        X, G = compose_pass(parts, w, with_gram=with_gram)
        ctx.save_for_backward(X, *parts)
        ctx.weights = w
        ctx.weights_need_grad = isinstance(weights, torch.Tensor) and weights.requires_grad
        if G is None:
            G = X.new_empty(0)
        ctx.mark_non_differentiable(*([] if with_gram else [G]))
        return X, G

    @staticmethod
    def backward(ctx, dX, dG):
        X, *parts = ctx.saved_tensors
        acc = accumulation_dtype(X.dtype)
        dY = (torch.zeros_like(X, dtype=acc) if dX is None else dX.to(acc))
        if dG is not None and dG.numel():
            dY = dY + (dG + dG.mT).to(acc) @ X.to(acc)
        grads, dw, start = [], [], 0
        for part, w in zip(parts, ctx.weights):
            rows = dY[..., start:start + part.shape[-2], :]
            start += part.shape[-2]
            grads.append((w * rows).to(part.dtype) if ctx.needs_input_grad[2 + len(grads)] else None)
            dw.append((rows * part.to(acc)).sum() if ctx.weights_need_grad else None)
        dweights = torch.stack(dw[:len(ctx.weights)]) if ctx.weights_need_grad else None
        return None, dweights, *grads


def _roots(gram: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(V, √λ, 1/√λ)`` of a batch of symmetric PSD ``gram``s, dropped eigenpairs zeroed (module docstring)."""
    lam, V = torch.linalg.eigh(gram)
    top = lam.amax(-1, keepdim=True).clamp_min(0)
    keep = lam > tol * top
    root = torch.where(keep, lam.clamp_min(0), torch.ones_like(lam)).sqrt()
    zero = torch.zeros_like(lam)
    return V, torch.where(keep, root, zero), torch.where(keep, 1 / root, zero)


def recompress(A: torch.Tensor, B: torch.Tensor, gram_a: torch.Tensor, gram_b: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-≤k factors of ``Bᵀ·A`` from the factors and their Grams (module docstring).

    A ``[..., R, I]``, B ``[..., R, O]``, Grams ``[..., R, R]`` → ``([..., k', I], [..., k', O])``,
    ``k' = min(k, R, I, O)``, in the factors' dtype. The R × R work runs in fp64; the two
    ``[k', R]`` projections run in the Gram's accumulation dtype.
    """
    R, I, O = A.shape[-2], A.shape[-1], B.shape[-1]
    k = min(k, R, I, O)
    if k == 0 or A.shape[:-2].numel() == 0:
        return A.new_zeros(*A.shape[:-2], k, I), B.new_zeros(*B.shape[:-2], k, O)
    eps = torch.finfo(gram_a.dtype).eps
    tol = max(R, 1) * eps
    V_a, root_a, inv_a = _roots(gram_a.double(), tol)
    V_b, root_b, inv_b = _roots(gram_b.double(), tol)
    core = (root_b[..., :, None] * V_b.mT) @ (V_a * root_a[..., None, :])  # Λ_b^½ V_bᵀ V_a Λ_a^½
    U, S, Wh = torch.linalg.svd(core)
    half = S[..., :k].sqrt()[..., :, None]
    T_a = (half * Wh[..., :k, :] * inv_a[..., None, :]) @ V_a.mT
    T_b = (half * U[..., :, :k].mT * inv_b[..., None, :]) @ V_b.mT
    work = gram_a.dtype
    A_k = T_a.to(work) @ A.to(work)
    B_k = T_b.to(work) @ B.to(work)
    return A_k.to(A.dtype), B_k.to(B.dtype)


def compose_adapters(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                     weights: Sequence[float] | torch.Tensor | None = None,
                     bias: tuple[torch.Tensor, torch.Tensor] | None = None,
                     max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend of `v2l_fast.ops.compose_adapters` (arguments validated by the op).

    Same result as `v2l_fast.reference.compose_adapters`: the concatenation exactly, the
    re-compressed ΔW = Bᵀ·A to the tolerances of the tests (its factors up to gauge). The
    factors are brought to one dtype (their promotion) first, as the reference's ``torch.cat``.
    """
    a_parts, b_parts = list(As), list(Bs)
    n = len(a_parts)
    if bias is not None:
        a_parts.append(bias[0])
        b_parts.append(bias[1])
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in (*a_parts, *b_parts)))
    a_parts = [t.to(dtype) for t in a_parts]
    b_parts = [t.to(dtype) for t in b_parts]
    if weights is None:
        w = [1.0] * len(a_parts)
    elif isinstance(weights, torch.Tensor):
        w = torch.cat([weights.reshape(-1).to(accumulation_dtype(dtype)),
                       weights.new_ones(len(a_parts) - n, dtype=accumulation_dtype(dtype))])
    else:
        w = [float(x) for x in weights] + [1.0] * (len(a_parts) - n)
    with_gram = max_rank is not None
    A, G_a = ComposePass.apply(with_gram, w, *a_parts)
    B, G_b = ComposePass.apply(with_gram, [1.0] * len(b_parts), *b_parts)
    if not with_gram:
        return A, B
    return recompress(A, B, G_a, G_b, max_rank)
