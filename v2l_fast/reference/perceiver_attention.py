"""Perceiver cross-attention over stacked layer states, the reference (FRAMES2LORA_SPEC §3.3–3.4).

One call is the attention half of an Idefics2-style cross-attention layer, for ``N`` rows that
are (layer, video) pairs folded layer-major (row ``l·B + b``)::

    zn = RMSNorm_latents(z)            cn = RMSNorm_context(c)
    q  = zn W_qᵀ                       k, v = [cn ; zn] W_kᵀ, [cn ; zn] W_vᵀ
    out = softmax(q kᵀ / √hd + mask) v  W_oᵀ        (grouped-query heads, fp32 softmax)

Keys are the context tokens followed by the latents themselves; padded context tokens are
masked, the latents never are. The residual add and post-attention norm stay with the caller.
"""

from __future__ import annotations

import math

import torch

from v2l_fast.errors import check_dim, check_tensor, describe, fail


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Idefics2 RMSNorm (spec §3.3): statistics in fp32 (fp64 stays fp64), cast back, times ``weight``."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def check_perceiver_attention_args(
    latents: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    latents_norm_weight: torch.Tensor,
    context_norm_weight: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    check_values: bool = True,
) -> None:
    """Validate `perceiver_attention` arguments; raise ValueError naming the offending one.

    ``check_values`` adds the data-dependent check that no context row is fully masked.
    """
    check_tensor("latents", latents, ndim=3, floating=True, shape_hint="[N, Q, D]")
    dev = latents.device
    N, _, D = latents.shape
    check_tensor("context", context, ndim=3, floating=True, device=dev, shape_hint=f"[N, S, D] = [{N}, S, {D}]")
    check_dim("context", context, 0, N, "N, the number of latent rows")
    check_dim("context", context, 2, D, "D, the latent width")
    S = context.shape[1]
    if S == 0:
        fail("context", "at least one context token (S ≥ 1)", describe(context))
    if not (isinstance(num_heads, int) and isinstance(num_kv_heads, int)) or num_kv_heads <= 0 \
            or num_heads % num_kv_heads:
        fail("num_heads", f"a multiple of num_kv_heads = {num_kv_heads}", num_heads)
    check_tensor("q_weight", q_weight, ndim=2, floating=True, device=dev, shape_hint="[nh·hd, D]")
    if q_weight.shape[0] % num_heads or q_weight.shape[1] != D:
        fail("q_weight", f"shape [num_heads·hd, {D}] with num_heads = {num_heads}", describe(q_weight))
    hd = q_weight.shape[0] // num_heads
    for name, w, shape in (
        ("k_weight", k_weight, (num_kv_heads * hd, D)),
        ("v_weight", v_weight, (num_kv_heads * hd, D)),
        ("o_weight", o_weight, (D, num_heads * hd)),
    ):
        check_tensor(name, w, ndim=2, floating=True, device=dev)
        if tuple(w.shape) != shape:
            fail(name, f"shape {list(shape)}", describe(w))
    for name, w in (("latents_norm_weight", latents_norm_weight), ("context_norm_weight", context_norm_weight)):
        check_tensor(name, w, ndim=1, floating=True, device=dev, shape_hint=f"[D] = [{D}]")
        check_dim(name, w, 0, D, "D, the latent width")
    if context_mask is None:
        return
    check_tensor("context_mask", context_mask, ndim=2, device=dev, shape_hint="[M, S] with N % M == 0")
    if context_mask.is_floating_point() or context_mask.is_complex():
        fail("context_mask", "a bool or integer tensor (1 = keep)", describe(context_mask))
    M = context_mask.shape[0]
    if context_mask.shape[1] != S or M == 0 or N % M:
        fail("context_mask", f"shape [M, {S}] with N = {N} a multiple of M", describe(context_mask))
    if check_values and not bool(context_mask.bool().any(dim=1).all()):
        empty = (~context_mask.bool().any(dim=1)).nonzero().squeeze(1).tolist()
        fail("context_mask", "at least one kept token in every row", f"all-masked rows {empty}")


def expand_context_mask(context_mask: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[M, S]`` mask → ``[N, S]`` bool, row n using mask row ``n mod M`` (layer-major fold)."""
    keep = context_mask.bool()
    return keep.repeat(num_rows // keep.shape[0], 1)


def perceiver_attention(
    latents: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    latents_norm_weight: torch.Tensor,
    context_norm_weight: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float = 1e-6,
    check: bool = True,
) -> torch.Tensor:
    """Cross-attention of latent queries over ``[context ; latents]`` keys, then o_proj.

    Args:
        latents: ``[N, Q, D]`` latent states (before the latents' input RMSNorm).
        context: ``[N, S, D]`` context states (before the context's input RMSNorm); row
            ``l·B + b`` is layer l of video b.
        context_mask: optional ``[M, S]`` bool/int, 1 = keep, with ``N % M == 0``: row n uses
            mask row ``n mod M``, so a per-video ``[B, S]`` mask serves all L layers.
        q_weight: ``[nh·hd, D]``; k_weight, v_weight: ``[nkv·hd, D]``; o_weight: ``[D, nh·hd]``.
        latents_norm_weight, context_norm_weight: ``[D]`` RMSNorm gains.
        num_heads, num_kv_heads: query heads and kv heads (query head h reads kv head
            ``h // (num_heads // num_kv_heads)``).
        eps: RMSNorm epsilon.
        check: run the data-dependent check that no context row is fully masked.

    Returns:
        ``[N, Q, D]`` attention output after o_proj, before the residual add.
    """
    check_perceiver_attention_args(
        latents, context, context_mask, q_weight=q_weight, k_weight=k_weight, v_weight=v_weight,
        o_weight=o_weight, latents_norm_weight=latents_norm_weight,
        context_norm_weight=context_norm_weight, num_heads=num_heads, num_kv_heads=num_kv_heads,
        check_values=check)
    N, Q, _ = latents.shape
    S = context.shape[1]
    hd = q_weight.shape[0] // num_heads
    zn = rms_norm(latents, latents_norm_weight, eps)
    cn = rms_norm(context, context_norm_weight, eps)
    kv_in = torch.cat([cn, zn.to(cn.dtype)], dim=1)
    q = (zn @ q_weight.T).view(N, Q, num_heads, hd).transpose(1, 2)
    k = (kv_in @ k_weight.T).view(N, S + Q, num_kv_heads, hd).transpose(1, 2)
    v = (kv_in @ v_weight.T).view(N, S + Q, num_kv_heads, hd).transpose(1, 2)
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if context_mask is not None:
        keep = torch.ones(N, S + Q, dtype=torch.bool, device=latents.device)
        keep[:, :S] = expand_context_mask(context_mask, N)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # fp32 as the official code; fp64 kept
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    attn = (probs @ v).transpose(1, 2).reshape(N, Q, num_heads * hd)
    return attn @ o_weight.T
