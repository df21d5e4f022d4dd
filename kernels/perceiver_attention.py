"""Fused Perceiver cross-attention (FRAMES2LORA_SPEC §3.4): few latent queries, many context keys.

The ``backend="triton"`` of `v2l_fast.ops.perceiver_attention`: same result and gradients as
`v2l_fast.reference.perceiver_attention`. Row n of the batch is (layer, video), the layer folded
into the batch. The algebra that absorbs K and V into the queries (so that the context part is
softmax attention in D-space over the normalised context rows ``y_t``, all nh·Q query rows in
one tile) is in kernels/perceiver_attention_torch.py, whose `absorbed_attention` is also this
backend's outer half; the kernels here replace its context part.

The kernel reads each context tile once, normalises it in registers (unless the caller passes
the normalised rows, ``NORMALIZED``) and never writes K or V.
The Q latent keys are scored in PyTorch and merged with the kernel's result by log-sum-exp
exactly like one more key split. Keeping them (and the weights) out of the kernel keeps the
kernel weight-free: gradients of the latents and of every weight flow through PyTorch autograd
on [N, nh·Q, ·] tensors, and the kernel's backward only returns d(absorbed queries) and, when
asked, d(context).

Flash-decoding: the keys of one row are split across programs (grid = query-row blocks ×
key splits × rows, query-row blocks fastest so the blocks that share a context tile run
together and hit L2); each split writes its running max, sum and unnormalised value
accumulator and a small merge combines them. One video with 80k tokens thus fills the GPU.
Variable lengths come in through the ``[M, S]`` keep-mask (row n reads mask row n mod M).

The backward recomputes scores from the context (nothing per token is stored): with
``u_r = Σ_t p_rt y_t`` and ``lse_r`` as outputs, ``dS_rt = p_rt (du_r·y_t − du_r·u_r + dlse_r)``,
``da_r = Σ_t dS_rt y_t``, ``dy_t = Σ_r p_rt du_r + dS_rt a_r`` and the RMSNorm backward
``dx = s dy − s³ x (dy·x)/D`` (the cast is treated as the identity, as autograd does).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from v2l_fast.kernels._common import EMPTY_LSE, dot_config, num_sms
from v2l_fast.kernels.perceiver_attention_torch import absorbed_attention


@triton.jit
def _normed_context_tile(ctx_ptr, row, offs_t, offs_d, S, D, stride_cn, stride_cs, stride_cd, eps,
                         NORMALIZED: tl.constexpr):
    """Context rows ``offs_t`` of batch row ``row``: x (fp32), y = cast(x·rstd) (fp32), rstd
    (with ``NORMALIZED`` the rows are y already: y = x, rstd = 1)."""
    inside = (offs_t[:, None] < S) & (offs_d[None, :] < D)
    ptrs = ctx_ptr + row * stride_cn + offs_t[:, None] * stride_cs + offs_d[None, :] * stride_cd
    x_raw = tl.load(ptrs, mask=inside, other=0.0)
    x = x_raw.to(tl.float32)
    if NORMALIZED:
        rstd = tl.full([offs_t.shape[0]], 1.0, tl.float32)
        y = x
    else:
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
        # Round the normalised value to the input dtype like the official RMSNorm.
        y = (x * rstd[:, None]).to(x_raw.dtype).to(tl.float32)
    return x, y, rstd


@triton.jit
def _kept_tokens(keep_ptr, row, offs_t, S, M, stride_km, HAS_MASK: tl.constexpr):
    kept = offs_t < S
    if HAS_MASK:
        flags = tl.load(keep_ptr + (row % M) * stride_km + offs_t, mask=kept, other=0)
        kept = kept & (flags != 0)
    return kept


@triton.jit
def _context_attention_fwd_kernel(
    queries_ptr, ctx_ptr, keep_ptr, acc_ptr, max_ptr, sum_ptr,
    S, R, D, M, tiles_per_split, eps,
    stride_cn, stride_cs, stride_cd, stride_km,
    HAS_MASK: tl.constexpr, NORMALIZED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    r_block = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(1)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rd_inside = (offs_r[:, None] < R) & (offs_d[None, :] < D)
    queries = tl.load(queries_ptr + (row * R + offs_r[:, None]) * D + offs_d[None, :],
                      mask=rd_inside, other=0.0).to(DOT_DTYPE)

    run_max = tl.full([BLOCK_R], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    start = split * tiles_per_split * BLOCK_S
    for i in range(tiles_per_split):
        offs_t = start + i * BLOCK_S + tl.arange(0, BLOCK_S)
        _, y, _ = _normed_context_tile(ctx_ptr, row, offs_t, offs_d, S, D,
                                       stride_cn, stride_cs, stride_cd, eps, NORMALIZED)
        kept = _kept_tokens(keep_ptr, row, offs_t, S, M, stride_km, HAS_MASK)
        y = y.to(DOT_DTYPE)
        scores = tl.dot(queries, tl.trans(y), input_precision=PRECISION)
        scores = tl.where(kept[None, :], scores, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, 1))
        rescale = tl.exp(run_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(DOT_DTYPE), y, input_precision=PRECISION)
        run_max = new_max

    part = (row * num_splits + split) * R + offs_r
    tl.store(max_ptr + part, run_max, mask=offs_r < R)
    tl.store(sum_ptr + part, run_sum, mask=offs_r < R)
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=rd_inside)


@triton.jit
def _context_attention_bwd_kernel(
    queries_ptr, dout_ptr, lse_ptr, delta_ptr, ctx_ptr, keep_ptr, dqueries_ptr, dctx_ptr,
    S, R, D, M, tiles_per_split, eps,
    stride_cn, stride_cs, stride_cd, stride_km,
    HAS_MASK: tl.constexpr, NORMALIZED: tl.constexpr, CONTEXT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    r_block = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(1)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_inside = offs_r < R
    rd_inside = r_inside[:, None] & (offs_d[None, :] < D)
    rd_offs = (row * R + offs_r[:, None]) * D + offs_d[None, :]
    queries = tl.load(queries_ptr + rd_offs, mask=rd_inside, other=0.0).to(DOT_DTYPE)
    dout = tl.load(dout_ptr + rd_offs, mask=rd_inside, other=0.0).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + row * R + offs_r, mask=r_inside, other=0.0)
    delta = tl.load(delta_ptr + row * R + offs_r, mask=r_inside, other=0.0)

    dqueries = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    start = split * tiles_per_split * BLOCK_S
    for i in range(tiles_per_split):
        offs_t = start + i * BLOCK_S + tl.arange(0, BLOCK_S)
        x, y, rstd = _normed_context_tile(ctx_ptr, row, offs_t, offs_d, S, D,
                                          stride_cn, stride_cs, stride_cd, eps, NORMALIZED)
        kept = _kept_tokens(keep_ptr, row, offs_t, S, M, stride_km, HAS_MASK)
        y = y.to(DOT_DTYPE)
        scores = tl.dot(queries, tl.trans(y), input_precision=PRECISION)
        probs = tl.where(r_inside[:, None] & kept[None, :], tl.exp(scores - lse[:, None]), 0.0)
        dprobs = tl.dot(dout, tl.trans(y), input_precision=PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dqueries += tl.dot(dscores.to(DOT_DTYPE), y, input_precision=PRECISION)
        if CONTEXT_GRAD:
            dy = tl.dot(tl.trans(probs.to(DOT_DTYPE)), dout, input_precision=PRECISION)
            dy += tl.dot(tl.trans(dscores.to(DOT_DTYPE)), queries, input_precision=PRECISION)
            dx = dy if NORMALIZED else (
                rstd[:, None] * dy - x * (rstd * rstd * rstd * tl.sum(dy * x, 1) / D)[:, None])
            inside = (offs_t[:, None] < S) & (offs_d[None, :] < D)
            # Several query-row blocks add into the same tokens: accumulate in fp32.
            tl.atomic_add(dctx_ptr + (row * S + offs_t[:, None]) * D + offs_d[None, :], dx,
                          mask=inside)

    part = (row * num_splits + split) * R + offs_r
    tl.store(dqueries_ptr + part[:, None] * D + offs_d[None, :], dqueries, mask=rd_inside)


# CUDA tiles, chosen from ptxas's register/spill report for sm_80 and sm_90 (compile-time numbers
# in bench/NOTES.md "compile check"; no GPU timing behind them). Whole-D rows of the query, dout
# and context tiles sit in registers, so the tiles shrink as D grows; from D = 256 on nothing
# tried is spill-free and 16 × 16 with 8 warps spills least, for fp32 and half inputs alike.
# num_stages 1, 2 or 3 gave the same report, so the default is kept.
def _cuda_tiles(block_d: int, backward: bool) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_S, num_warps)`` of the forward or backward kernel on a GPU."""
    if block_d <= 64:
        return 32, 32, 8 if backward else 4
    if block_d <= 128 and not backward:
        return 32, 32, 8
    return 16, 16, 8


def _tiles(N: int, R: int, S: int, D: int, device: torch.device, num_splits: int | None,
           backward: bool):
    """Block sizes, key tiles per split, number of splits and launch options for one launch."""
    block_d = max(16, triton.next_power_of_2(D))
    if device.type == "cuda":
        r_cap, block_s, num_warps = _cuda_tiles(block_d, backward)
        # Without a cap ptxas sometimes settles on 32 registers and spills tens of KB instead.
        options = {"num_warps": num_warps, "maxnreg": 255}
    else:  # Under the interpreter bigger tiles only cost numpy time.
        r_cap, block_s, options = 128, (64 if D <= 256 else 32), {}
    block_r = max(16, min(r_cap, triton.next_power_of_2(R)))
    num_tiles = triton.cdiv(S, block_s)
    if num_splits is None:
        # Split keys only as far as needed to give every SM two programs (on the CPU: a few, so
        # the interpreter also runs the merge); the partials then stay O(programs · BLOCK_R · D).
        programs = 2 * num_sms(device)
        num_splits = triton.cdiv(programs, N * triton.cdiv(R, block_r))
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(num_splits, num_tiles)))
    return (block_r, block_s, block_d, tiles_per_split, triton.cdiv(num_tiles, tiles_per_split),
            options)


def _mask_args(context, keep):
    """Pointer, row count and row stride of the keep-mask (the context stands in when absent)."""
    return (keep, keep.shape[0], keep.stride(0)) if keep is not None else (context, 1, 0)


def context_attention_forward(queries, context, keep, eps, normalized, num_splits=None):
    """Softmax attention of ``queries [N, R, D]`` (fp32) over ``y_t = cast(rms(context_t))``
    (``normalized``: over the context rows as they are).

    Returns ``(u [N, R, D], lse [N, R])`` in fp32: ``u_r = Σ_t p_rt y_t`` with ``p`` the softmax
    of ``queries_r · y_t`` over kept tokens, and ``lse_r`` its log-sum-exp (``-1e30`` for a row
    with no kept token, whose ``u`` is 0). ``keep``: None or ``[M, S]`` uint8, row n uses n mod M.
    """
    N, R, D = queries.shape
    S = context.shape[1]
    block_r, block_s, block_d, tiles_per_split, splits, options = _tiles(
        N, R, S, D, context.device, num_splits, backward=False)
    acc = torch.empty(N, splits, R, D, device=context.device, dtype=torch.float32)
    run_max = torch.empty(N, splits, R, device=context.device, dtype=torch.float32)
    run_sum = torch.empty_like(run_max)
    keep_ptr, M, stride_km = _mask_args(context, keep)
    dot_dtype, precision = dot_config(context.dtype)
    grid = (triton.cdiv(R, block_r), splits, N)
    _context_attention_fwd_kernel[grid](
        queries, context, keep_ptr, acc, run_max, run_sum,
        S, R, D, M, tiles_per_split, eps, *context.stride(), stride_km,
        HAS_MASK=keep is not None, NORMALIZED=normalized, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, PRECISION=precision, **options)
    # Log-sum-exp merge of the key splits (flash-decoding's second phase; [N, splits, R] sized).
    top = run_max.amax(1, keepdim=True)
    weight = torch.exp(run_max - top)
    total = (weight * run_sum).sum(1)
    u = (weight.unsqueeze(-1) * acc).sum(1) / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    lse = torch.where(total > 0, top.squeeze(1) + total.log(), torch.full_like(total, EMPTY_LSE))
    return u, lse


def context_attention_backward(queries, context, keep, eps, normalized, u, lse, du, dlse, context_grad,
                               num_splits=None):
    """Gradients of `context_attention_forward` for ``queries`` and (if asked) ``context``."""
    N, R, D = queries.shape
    S = context.shape[1]
    block_r, block_s, block_d, tiles_per_split, splits, options = _tiles(
        N, R, S, D, context.device, num_splits, backward=True)
    du = du.contiguous()
    delta = ((du * u).sum(-1) - dlse).contiguous()
    dqueries = torch.empty(N, splits, R, D, device=context.device, dtype=torch.float32)
    dctx = torch.zeros(N, S, D, device=context.device, dtype=torch.float32) if context_grad else dqueries
    keep_ptr, M, stride_km = _mask_args(context, keep)
    dot_dtype, precision = dot_config(context.dtype)
    grid = (triton.cdiv(R, block_r), splits, N)
    _context_attention_bwd_kernel[grid](
        queries, du, lse, delta, context, keep_ptr, dqueries, dctx,
        S, R, D, M, tiles_per_split, eps, *context.stride(), stride_km,
        HAS_MASK=keep is not None, NORMALIZED=normalized, CONTEXT_GRAD=context_grad, BLOCK_R=block_r,
        BLOCK_S=block_s,
        BLOCK_D=block_d, DOT_DTYPE=dot_dtype, PRECISION=precision, **options)
    return dqueries.sum(1), (dctx.to(context.dtype) if context_grad else None)


class ContextAttention(torch.autograd.Function):
    """Autograd wrapper of the context half: ``(queries, context) → (u, lse)``; recomputes in backward."""

    @staticmethod
    def forward(ctx, queries, context, keep, eps, normalized, num_splits):
        u, lse = context_attention_forward(queries, context, keep, eps, normalized, num_splits)
        ctx.save_for_backward(queries, context, keep, u, lse)
        ctx.eps, ctx.normalized, ctx.num_splits = eps, normalized, num_splits
        return u, lse

    @staticmethod
    def backward(ctx, du, dlse):
        queries, context, keep, u, lse = ctx.saved_tensors
        du = torch.zeros_like(u) if du is None else du.float()
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        dqueries, dcontext = context_attention_backward(
            queries, context, keep, ctx.eps, ctx.normalized, u, lse, du, dlse, ctx.needs_input_grad[1],
            ctx.num_splits)
        return dqueries, dcontext, None, None, None, None


def _kernel_context_part(queries, context, context_mask, eps, normalized, num_splits):
    """`absorbed_attention`'s context half through the kernels: ``(u, lse)``, autograd included."""
    keep = None if context_mask is None else (context_mask != 0).to(torch.uint8).contiguous()
    queries = queries.to(torch.promote_types(queries.dtype, torch.float32)).contiguous()  # fp32 under autocast
    return ContextAttention.apply(queries, context, keep, eps, normalized, num_splits)


def perceiver_attention_splits(*args, num_splits: int | None):
    """`perceiver_attention` (same positional arguments) with ``num_splits`` key splits per row
    forced (None: enough to fill the device)."""
    return absorbed_attention(functools.partial(_kernel_context_part, num_splits=num_splits))(*args)


perceiver_attention = absorbed_attention(functools.partial(_kernel_context_part, num_splits=None))
perceiver_attention.__doc__ = """The Triton backend of `v2l_fast.ops.perceiver_attention` (arguments validated).

Same result and gradients as the reference; gradients flow to the latents, every weight and,
when it requires grad, the context. The projections of the Q latents and the heads run in fp32
PyTorch (tensors of size nh·Q × D per row); the context is read only by the kernels.
"""
