"""Perceiver cross-attention (FRAMES2LORA_SPEC §3.4) with K and V absorbed, in plain PyTorch.

The ``backend="torch"`` of `v2l_fast.ops.perceiver_attention`: the same result and gradients as
`v2l_fast.reference.perceiver_attention`, which materialises K and V of every context token;
this module never does. Imports no triton. `absorbed_attention` is also the outer half of the
Triton backend (kernels/perceiver_attention.py), which swaps in its kernel for the context part.

The algebra (why K and V of the context never exist)
----------------------------------------------------
Write the context RMSNorm of token t as ``cn_t = w_c ⊙ y_t`` with ``y_t = cast(s_t x_t)``,
``s_t = rsqrt(mean(x_t²) + eps)`` (the cast back to the input dtype is the official one). For
query i of head h, reading kv head g = h // (nh/nkv), with ``q = zn W_qᵀ``::

    score_t = q_h,i · (W_k,g cn_t) / √hd = ((W_k,gᵀ q_h,i ⊙ w_c) / √hd) · y_t = a_r · y_t
    Σ_t p_t W_v,g cn_t = W_v,g (w_c ⊙ Σ_t p_t y_t)

so with the *absorbed queries* ``a_r = (W_k,gᵀ q_h,i) ⊙ w_c / √hd`` (one D-vector per query row
r = h·Q + i) the context part of every head is plain softmax attention in D-space whose keys
and values are the same normalised context rows ``y_t``. GQA disappears in this form: all nh·Q
query rows read the same ``y_t`` (the kv group only decides which ``W_k,g`` / ``W_v,g`` absorbs a
head). FLOPs per context token: 4·nh·Q·D (scores + values) against 4·nkv·hd·D + 4·nh·Q·hd with
K/V materialised; for nh=16, Q=8, D=512, nkv=4, hd=128 that is 0.26 vs 1.11 MFLOP.

Keys are ``[context ; latents]``. The Q latent keys and values are made in head space as the
reference makes them (``W_k zn_j``, ``W_v zn_j``: Q rows per sequence, no ``w_c``), scored
against ``q`` there, and the two key sets are softmax-normalised separately and merged per head
by log-sum-exp (``lse = log(e^lse_c + e^lse_l)``, ``o = e^(lse_c−lse) o_c + e^(lse_l−lse) o_l``),
exactly the joint softmax over all S + Q keys, so the context is never concatenated.

The gain ``w_c`` and ``1/√hd`` sit on the small tensors: ``W_k,g ⊙ w_c`` and ``W_v,g ⊙ w_c``
(``[nkv·hd, D]``, once per call) and ``q`` (``[N, Q, nh·hd]``). The ``[N, nh·Q, D]`` absorbed
queries and context mixtures are only ever GEMM inputs and outputs: no elementwise pass over
them in the forward or the backward (measured on the training step's hypernetwork, 8 videos ×
8 layers, S = 96: 2.69 → 2.44 s forward + backward, bench/NOTES.md).

In fp32 and fp64 the cast in ``y_t`` is the identity, so ``a·y_t = s_t (a·x_t)`` and
``Σ_t p_t y_t = Σ_t (p_t s_t) x_t``: the torch context part scales the [R, S] score and
probability columns by ``s_t`` and multiplies by the raw context, which is then read by two
GEMMs and one norm reduction and never rewritten. Half inputs keep the rounded ``y_t``. A
context passed ``context_normalized`` is the ``y_t`` themselves (the Perceiver normalises its
context once for all the layers that read it): then the rows go into the GEMMs as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from v2l_fast.kernels._common import EMPTY_LSE, rms_norm


def context_attention(queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
                      eps: float, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``queries [N, R, D]`` over the normalised context rows ``y_t``.

    ``y_t = cast(x_t · s_t)``, ``s_t = rsqrt(‖x_t‖²/D + eps)`` (the context RMSNorm without its
    gain); with ``normalized`` the context rows are the ``y_t`` already. Returns ``u [N, R, D]``
    in the queries' dtype and ``lse [N, R]`` in the work dtype (the queries' promoted to at least
    fp32): ``u_r = Σ_t p_rt y_t`` with ``p_r = softmax_t(queries_r · y_t)`` over the kept tokens
    (``context_mask [M, S]``, row n uses mask row n mod M) and ``lse_r`` the log-sum-exp of those
    scores. Half queries (autocast's) meet a half context as they are: its dots round them to its
    dtype anyway. Masked scores are `EMPTY_LSE` (finite): a row with no kept token gets
    ``lse ≈ EMPTY_LSE``, so its (finite, meaningless) ``u`` has weight exactly 0 in a log-sum-exp
    merge, and so do its gradients.
    """
    N, R, D = queries.shape
    S = context.shape[1]
    work = torch.promote_types(queries.dtype, torch.float32)
    keys, column_scale = context, None
    if not normalized:
        scale = torch.rsqrt(torch.linalg.vector_norm(context, dim=-1, dtype=work).square() / D + eps)
        if context.dtype == work:
            # y_t = s_t x_t exactly: scale the score and probability columns, not the context.
            column_scale = scale[:, None, :]
        else:
            # Half context: y_t rounded to its dtype as the official norm does; dots in that dtype.
            keys = (context.to(work) * scale[..., None]).to(context.dtype)
    scores = torch.matmul(queries.to(keys.dtype), keys.mT).to(work)
    if column_scale is not None:
        scores = scores * column_scale
    if context_mask is not None:
        M = context_mask.shape[0]
        dropped = (context_mask == 0)[None, :, None, :]
        scores = scores.view(N // M, M, R, S).masked_fill(dropped, EMPTY_LSE).view(N, R, S)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None])
    if column_scale is not None:
        probs = probs * column_scale
    return torch.matmul(probs.to(keys.dtype), keys).to(queries.dtype), lse


def absorbed_attention(context_part: Callable) -> Callable:
    """A `perceiver_attention` backend with K/V absorbed (module docstring), the context half
    computed by ``context_part(queries, context, context_mask, eps, normalized) -> (u, lse)``
    (`context_attention`, or the Triton kernel).

    The backend takes the op's kernel arguments (the reference's, positionally). Everything but
    the context half runs in it in fp32 (fp64 for fp64 inputs): the latents' norm and q
    projection, the absorption of ``W_k ⊙ w_c`` into ``[N, nh·Q, D]`` queries, ``W_v ⊙ w_c`` on the
    context half's mixtures, the latents' own Q keys and values in head space, the log-sum-exp
    merge per head and o_proj. It returns ``[N, Q, D]`` in the promoted dtype of all inputs.
    """

    def attention(latents, context, context_mask, q_weight, k_weight, v_weight, o_weight, latents_norm_weight,
                  context_norm_weight, num_heads, num_kv_heads, eps=1e-6, context_normalized=False):
        N, Q, D = latents.shape
        out_dtype = functools.reduce(torch.promote_types, (t.dtype for t in (
            latents, context, q_weight, k_weight, v_weight, o_weight, latents_norm_weight, context_norm_weight)))
        if N == 0 or Q == 0:
            return latents.new_zeros(N, Q, D, dtype=out_dtype)
        work = torch.promote_types(out_dtype, torch.float32)
        hd = q_weight.shape[0] // num_heads
        group = num_heads // num_kv_heads

        zn = rms_norm(latents, latents_norm_weight, eps)
        q = F.linear(zn.to(work), q_weight.to(work)).view(N, Q, num_kv_heads, group, hd) / math.sqrt(hd)
        k_heads = k_weight.to(work).view(num_kv_heads, hd, D)
        v_heads = v_weight.to(work).view(num_kv_heads, hd, D)
        context_weight = context_norm_weight.to(work)
        # Absorb W_k ⊙ w_c into the queries: row r = h·Q + i of [N, nh·Q, D], head h = g·group + j.
        # The gain and 1/√hd go on the weights and q, never on an [N, nh·Q, D] tensor.
        queries = torch.einsum("nqgjh,ghd->ngjqd", q, k_heads * context_weight).reshape(N, num_heads * Q, D)
        # Under autocast the einsum returns bf16 queries, and the context half takes them as they
        # are (its dots round them to the context's bf16 either way) and returns u in bf16, which
        # the values' einsum would cast to anyway: no fp32 round trip of [N, nh·Q, D] tensors.
        u_ctx, lse_ctx = context_part(queries, context, context_mask, eps, context_normalized)
        # Values of the context: (W_v,g ⊙ w_c) applied to each head's D-space mixture.
        ctx_heads = torch.einsum("ngjqd,ghd->nqgjh", u_ctx.view(N, num_kv_heads, group, Q, D),
                                 v_heads * context_weight)

        # The latents' own keys and values in head space, as the reference makes them (zn in the kv dtype).
        kv_latents = zn.to(torch.promote_types(context.dtype, context_norm_weight.dtype)).to(work)
        k_lat = F.linear(kv_latents, k_heads.view(-1, D)).view(N, Q, num_kv_heads, hd)
        v_lat = F.linear(kv_latents, v_heads.view(-1, D)).view(N, Q, num_kv_heads, hd)
        latent_scores = torch.einsum("nqgjh,nkgh->nqgjk", q, k_lat)
        lse_lat = torch.logsumexp(latent_scores, -1)
        lat_heads = torch.einsum("nqgjk,nkgh->nqgjh", torch.softmax(latent_scores, -1), v_lat)

        # Joint softmax over [context ; latents] by log-sum-exp merge, per head and query.
        lse_ctx = lse_ctx.view(N, num_kv_heads, group, Q).permute(0, 3, 1, 2)
        lse = torch.logaddexp(lse_ctx, lse_lat)
        heads = torch.exp(lse_ctx - lse)[..., None] * ctx_heads + torch.exp(lse_lat - lse)[..., None] * lat_heads
        return F.linear(heads.reshape(N, Q, num_heads * hd), o_weight.to(work)).to(out_dtype)

    return attention


perceiver_attention = absorbed_attention(context_attention)
perceiver_attention.__doc__ = """The torch backend of `v2l_fast.ops.perceiver_attention` (arguments validated).

`absorbed_attention` with the context half as two batched GEMMs (`context_attention`):
scores ``[N, nh·Q, S]`` and values ``[N, nh·Q, D]``, 4·nh·Q·D FLOPs per context token.
Differentiable by autograd (it keeps the ``[N, nh·Q, S]`` scores for the backward).
"""
