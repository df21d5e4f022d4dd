"""The Frames2LoRA hypernetwork: stacked layer states of one VLM pass → a LoRA adapter per video.

Perceiver (aggregator) → ResMLP → L2 normalisation → per-layer linear head → A/B rows ×
per-layer, per-rank scalers, then the context-independent bias block appended along the rank
axis (FRAMES2LORA_SPEC §3–§5). Parameter names follow the official module, so released state
dicts load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from v2l_fast.errors import check_dim, check_tensor, describe, fail
from v2l_fast.hypernet.compose import combine_lora
from v2l_fast.hypernet.config import Frames2LoRAConfig
from v2l_fast.hypernet.perceiver import Perceiver

# The only target module of the released method; parameter dicts are keyed by module name.
TARGET_MODULE = "down_proj"


@dataclass
class GeneratedAdapters:
    """Adapters for a batch of videos, for every decoder layer's ``down_proj``.

    ``A [B, L, 2r, I]`` and ``B [B, L, 2r, H]`` are the combined factors (generated rows, then
    the bias block); the patched layer computes ``y = x Wᵀ + alpha · (x Aᵀ) B``. The per-video
    generated rows alone (scalers applied) are ``generated_A [B, L, r, I]`` /
    ``generated_B [B, L, r, H]`` and the shared bias block ``bias_A [L, r, I]`` /
    ``bias_B [L, r, H]``: the inputs of multi-chunk composition (`combine_lora`).
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    generated_A: torch.Tensor
    generated_B: torch.Tensor
    bias_A: torch.Tensor
    bias_B: torch.Tensor


class ResMLPBlock(nn.Module):
    """``e ← e + LN_b(W2·silu(W1·LN_a(e) + b1) + b2)`` (§4.1).

    Identity at positions 1 and 4 stands for the official p = 0 dropouts, keeping the
    ``mlp.{0,2,5,6}`` parameter names of released checkpoints.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width, eps=eps), nn.Identity(), nn.Linear(width, 4 * width), nn.SiLU(),
            nn.Identity(), nn.Linear(4 * width, width), nn.LayerNorm(width, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class PerLayerHead(nn.Module):
    """One bias-free linear map per decoder layer: ``y[b, l, k] = e[b, l, k] · weight[l]`` (§4.3)."""

    def __init__(self, num_layers: int, in_width: int, out_width: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, in_width, out_width))
        nn.init.normal_(self.weight, std=0.5 / (in_width + out_width * rank) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, r, D]`` → ``[B, L, r, d_lora]``."""
        return torch.einsum("blrd,ldo->blro", x, self.weight)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / ‖x‖₂`` over the last dim, with no epsilon (as the official head input, §4.2)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


class Frames2LoRA(nn.Module):
    """The Frames2LoRA hypernetwork for one base model (L, H, I) and rank r.

    A fresh module is initialised as the official one (§3.8, §4): ``scaler_B`` and ``bias_B``
    are zero, so a fresh model's adapters change nothing. Load trained weights with
    `v2l_fast.hypernet.load_frames2lora`.
    """

    def __init__(self, config: Frames2LoRAConfig) -> None:
        super().__init__()
        if not isinstance(config, Frames2LoRAConfig):
            fail("config", "a Frames2LoRAConfig", type(config).__name__)
        self.config = config
        L, H, I, r, D = (config.num_layers, config.hidden_size, config.intermediate_size,
                         config.rank, config.latent_size)
        # Nested as in the official module tree so that state-dict keys match.
        self.aggregator = nn.ModuleDict({"perceiver": Perceiver(config)})
        self.layers = nn.ModuleList(
            ResMLPBlock(D, config.layer_norm_eps) for _ in range(config.num_pre_head_layers))
        self.head = PerLayerHead(L, D, config.head_width, r)
        self.scaler_A = nn.ParameterDict({TARGET_MODULE: nn.Parameter(torch.ones(1, L, r, 1))})
        self.scaler_B = nn.ParameterDict({TARGET_MODULE: nn.Parameter(torch.zeros(1, L, r, 1))})
        self.bias_A = nn.ParameterDict(
            {TARGET_MODULE: nn.Parameter(torch.randn(L, r, I) * (0.2 / (I * r) ** 0.5))})
        self.bias_B = nn.ParameterDict({TARGET_MODULE: nn.Parameter(torch.zeros(L, r, H))})

    def _check_inputs(self, features, mask) -> torch.Tensor:
        cfg = self.config
        check_tensor("features", features, ndim=4, floating=True,
                     shape_hint=f"[B, L, S, H] = [B, {cfg.num_layers}, S, {cfg.hidden_size}]")
        check_dim("features", features, 1, cfg.num_layers, "L, the number of decoder layers")
        check_dim("features", features, 3, cfg.hidden_size, "H, the VLM hidden size")
        B, _, S, _ = features.shape
        if B == 0 or S == 0:
            fail("features", "at least one video and one token", describe(features))
        if mask is None:
            return torch.ones(B, S, dtype=torch.bool, device=features.device)
        check_tensor("mask", mask, ndim=2, device=features.device, shape_hint=f"[B, S] = [{B}, {S}]")
        if mask.is_floating_point() or tuple(mask.shape) != (B, S):
            fail("mask", f"a bool or integer [B, S] = [{B}, {S}] tensor (1 = keep)", describe(mask))
        empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
        if empty:
            fail("mask", "at least one kept token per video", f"no kept token in videos {empty}")
        return mask

    def aggregate(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                  autocast: bool | None = None) -> torch.Tensor:
        """The Perceiver: ``features [B, L, S, H]``, ``mask [B, S]`` → latents ``[B, L, r, D]``.

        ``autocast``: run the Perceiver under bf16 autocast. ``None`` (default) does what the
        official code does: bf16 autocast on CUDA, plain fp32 elsewhere. Without autocast the
        features are cast to the parameters' dtype.
        """
        mask = self._check_inputs(features, mask)
        perceiver = self.aggregator["perceiver"]
        enabled = features.is_cuda if autocast is None else bool(autocast)
        if not enabled:
            features = features.to(perceiver.modality_projection.down_proj.weight.dtype)
        with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=enabled):
            return perceiver(features, mask)

    def pre_head(self, latents: torch.Tensor) -> torch.Tensor:
        """The ResMLP blocks, outside autocast: ``[B, L, r, D]`` → ``[B, L, r, D]``."""
        for block in self.layers:
            latents = block(latents)
        return latents

    def generate(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                 autocast: bool | None = None) -> GeneratedAdapters:
        """One adapter per video from its stacked layer states.

        Args:
            features: ``[B, L, S, H]``, the residual stream entering each decoder layer.
            mask: ``[B, S]`` bool/int, 1 = real token (None: all real).
            autocast: see `aggregate`; the head and everything after it always run outside
                autocast, in the parameters' dtype (fp32 for released checkpoints).

        Returns:
            `GeneratedAdapters` with ``A [B, L, 2r, I]``, ``B [B, L, 2r, H]`` and ``alpha``.
        """
        latents = self.aggregate(features, mask, autocast=autocast)
        with torch.autocast(features.device.type, enabled=False):
            rows = self.head(l2_normalize(self.pre_head(latents.to(self.head.weight.dtype))))
            I, H = self.config.intermediate_size, self.config.hidden_size
            A = rows[..., :I] * self.scaler_A[TARGET_MODULE]
            B = rows[..., I:I + H] * self.scaler_B[TARGET_MODULE]
            bias_A, bias_B = self.bias_A[TARGET_MODULE], self.bias_B[TARGET_MODULE]
            A_c, B_c = combine_lora(A, B, [1] * A.shape[0], bias=(bias_A, bias_B))
        return GeneratedAdapters(A=A_c, B=B_c, alpha=self.config.lora_alpha, generated_A=A,
                                 generated_B=B, bias_A=bias_A, bias_B=bias_B)
