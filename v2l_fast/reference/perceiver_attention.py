"""Perceiver cross-attention over stacked layer states, the reference (docs/method.md §3.3–3.4).

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


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without its gain: ``cast(x · rsqrt(mean(x²) + eps))``, statistics in fp32 (fp64 stays fp64)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Idefics2 RMSNorm (spec §3.3): `rms_normalize`, then times ``weight``."""
    return weight * rms_normalize(x, eps)


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
    context_normalized: bool = False,
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
        context_normalized: ``context`` already holds ``rms_normalize(context, eps)`` (the
            context RMSNorm without its gain), so only ``context_norm_weight`` is applied: the
            layers of a resampler all read one context and normalise it once.

    Returns:
        ``[N, Q, D]`` attention output after o_proj, before the residual add.
    """
    N, Q, _ = latents.shape
    S = context.shape[1]
    hd = q_weight.shape[0] // num_heads
    zn = rms_norm(latents, latents_norm_weight, eps)
    cn = context_norm_weight * context if context_normalized else rms_norm(context, context_norm_weight, eps)
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
