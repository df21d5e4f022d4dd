"""The Idefics2-style Perceiver of Frames2LoRA (FRAMES2LORA_SPEC §3).

Module and parameter names follow the official module tree, so a released state dict loads
without renaming. The attention half of every layer is `v2l_fast.ops.perceiver_attention` and
every SwiGLU is `v2l_fast.ops.swiglu_mlp`; ``$V2L_BACKEND`` therefore switches the kernels here
too. This module only adds the residual stream, the sandwich norms, the layer folding and the
context's RMS normalisation, done once per resampler for all the layers that read it.
"""

from __future__ import annotations

import torch
from torch import nn

from v2l_fast import ops
from v2l_fast.hypernet.config import Frames2LoRAConfig

# Rows of the modality projection per chunk when no gradient is needed (see `Perceiver.project`).
PROJECTION_CHUNK_ROWS = 1 << 15


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its gain: ``cast(x · rsqrt(mean(x²) + eps))``.

    The statistics run in fp32 (fp64 stays fp64); the normalised value is cast back to the
    input dtype, as the official norm does before its gain.
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def normalize_context(context: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_normalize` of a resampler's context, which every cross-attention layer reads.

    Without a gradient through ``context`` it is normalised in place, `PROJECTION_CHUNK_ROWS`
    rows at a time (the fp32 temporaries of a chunk, not of a whole long video's context): the
    caller passes its own scratch tensor, the folded modality projection.
    """
    if torch.is_grad_enabled() and context.requires_grad:
        return rms_normalize(context, eps)
    rows = context.view(-1, context.shape[-1])
    for start in range(0, rows.shape[0], PROJECTION_CHUNK_ROWS):
        chunk = rows[start:start + PROJECTION_CHUNK_ROWS]
        chunk.copy_(rms_normalize(chunk, eps))
    return context


class RMSNorm(nn.Module):
    """Idefics2 RMSNorm (§3.3): ``weight · rms_normalize(x)``, gain initialised to 1.

    The (fp32) gain multiplies the normalised value in the input dtype, which promotes the
    result to fp32.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) ⊙ up(x))`` without biases, through `ops.swiglu_mlp`."""

    def __init__(self, in_width: int, hidden_width: int, out_width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.up_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.down_proj = nn.Linear(hidden_width, out_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class AttentionProjections(nn.Module):
    """The q/k/v/o projections of one Perceiver layer (grouped-query, no biases, §3.4)."""

    def __init__(self, config: Frames2LoRAConfig) -> None:
        super().__init__()
        D, hd = config.latent_size, config.head_dim
        self.q_proj = nn.Linear(D, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, D, bias=False)


class PerceiverLayer(nn.Module):
    """One Perceiver layer: cross-attention over ``[context ; latents]`` (or self-attention
    over the latents), then the post-attention sandwich norm and a pre/post-normed SwiGLU."""

    def __init__(self, config: Frames2LoRAConfig, *, cross_attention: bool) -> None:
        super().__init__()
        D, eps = config.latent_size, config.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.eps = config.num_heads, config.num_kv_heads, eps
        self.cross_attention = cross_attention
        self.input_latents_layernorm = RMSNorm(D, eps)
        if cross_attention:
            self.input_context_layernorm = RMSNorm(D, eps)
        self.self_attn = AttentionProjections(config)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_ff_layernorm = RMSNorm(D, eps)
        self.post_ff_layernorm = RMSNorm(D, eps)
        self.mlp = SwiGLU(D, 4 * D, D)

    def forward(self, latents: torch.Tensor, normalized_context: torch.Tensor | None,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        """``latents [N, Q, D]``, ``normalized_context [N, S, D]`` (the context after
        `rms_normalize`: this layer's ``input_context_layernorm`` applies only its gain),
        ``context_mask [B, S]`` (N = L·B) → latents. A self-attention layer ignores the context."""
        if self.cross_attention:
            context, context_norm, normalized = normalized_context, self.input_context_layernorm.weight, True
        else:
            # Self-attention (keys = latents only) as the same op: the latents also serve as a
            # fully masked context, normalised with the latents' own gain, so the kept keys are
            # exactly the normalised latents.
            context, context_norm, normalized = latents, self.input_latents_layernorm.weight, False
            context_mask = torch.zeros(1, latents.shape[1], dtype=torch.bool, device=latents.device)
        attn = self.self_attn
        attended = ops.perceiver_attention(
            latents, context, context_mask, q_weight=attn.q_proj.weight, k_weight=attn.k_proj.weight,
            v_weight=attn.v_proj.weight, o_weight=attn.o_proj.weight,
            latents_norm_weight=self.input_latents_layernorm.weight,
            context_norm_weight=context_norm, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, eps=self.eps, context_normalized=normalized, check=False)
        latents = latents + self.post_attention_layernorm(attended)
        return latents + self.post_ff_layernorm(self.mlp(self.pre_ff_layernorm(latents)))


class PerceiverResampler(nn.Module):
    """Learned queries read a context through a stack of layers, then a final RMSNorm."""

    def __init__(self, config: Frames2LoRAConfig, num_queries: int,
                 layer_kinds: list[bool]) -> None:
        super().__init__()
        self.latents_q = nn.Parameter(torch.randn(num_queries, config.latent_size))
        self.layers = nn.ModuleList(
            PerceiverLayer(config, cross_attention=cross) for cross in layer_kinds)
        self.layernorm = RMSNorm(config.latent_size, config.rms_norm_eps)

    def forward(self, normalized_context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """``normalized_context [N, S, D]`` (after `rms_normalize`, once for all the layers)
        (+ ``[B, S]`` mask, N = L·B) → ``[N, num_queries, D]``."""
        latents = self.latents_q.expand(normalized_context.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, normalized_context, context_mask)
        return self.layernorm(latents)


class Perceiver(nn.Module):
    """Modality projection, encoder resampler and decoder resampler (§3.2–§3.7).

    Every (video, layer) slice of the stacked layer states is read independently with shared
    weights: the layer axis is folded into the batch, layer-major (row ``l·B + b``). Each
    resampler's context is RMS-normalised once (`normalize_context`) and its cross-attention
    layers apply only their gains: the encoder's layers all read the same projected features, so
    the normalisation is not redone (and differentiated) in each of them.
    """

    def __init__(self, config: Frames2LoRAConfig) -> None:
        super().__init__()
        H, D = config.hidden_size, config.latent_size
        self.eps = config.rms_norm_eps
        self.modality_projection = SwiGLU(H, 4 * H, D)
        block = [True] + [False] * config.num_self_attn_per_block
        self.encoder = PerceiverResampler(config, config.num_latent_queries, block * config.num_blocks)
        self.decoder = PerceiverResampler(config, config.rank, [True])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The modality projection ``[..., H] → [..., D]``.

        Without autograd it runs in chunks of `PROJECTION_CHUNK_ROWS` rows: the SwiGLU's
        ``[rows, 4H]`` intermediates would otherwise dwarf everything else (33 GB each in bf16
        for the 2.2B model at 1024 frames), while a chunk's are 1 GB at most; same FLOPs.
        """
        proj = self.modality_projection
        rows = features.reshape(-1, features.shape[-1])
        needs_grad = torch.is_grad_enabled() and (
            features.requires_grad or any(p.requires_grad for p in proj.parameters()))
        if needs_grad or rows.shape[0] <= PROJECTION_CHUNK_ROWS:
            return proj(features)
        out = None
        for start in range(0, rows.shape[0], PROJECTION_CHUNK_ROWS):
            part = proj(rows[start:start + PROJECTION_CHUNK_ROWS])
            if out is None:
                out = part.new_empty(rows.shape[0], part.shape[-1])
            out[start:start + part.shape[0]] = part
        return out.view(*features.shape[:-1], out.shape[-1])

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``features [B, L, S, H]``, ``mask [B, S]`` (1 = keep) → latents ``[B, L, r, D]``."""
        B, L, S, _ = features.shape
        # Project before folding: the fold then copies D-wide rows instead of H-wide ones.
        context = self.project(features)
        context = context.transpose(0, 1).reshape(L * B, S, context.shape[-1])
        encoded = self.encoder(normalize_context(context, self.eps), mask)
        decoded = self.decoder(rms_normalize(encoded, self.eps), None)
        return decoded.view(L, B, *decoded.shape[1:]).transpose(0, 1)
