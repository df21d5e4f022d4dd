"""Rank-space composition of LoRA adapters, the reference (docs/method.md §5).

Adapters of consecutive video segments combine by concatenating their factors along the rank
axis, so ΔW = Bᵀ·A of the result is the (weighted) sum of the segments' ΔW. Re-compression to
rank k finds the best rank-k approximation of that sum from thin QRs of the two factors and an
SVD of the small core, never forming the dense ``O × I`` matrix::

    Aᵀ = Q_a R_a,  Bᵀ = Q_b R_b   ⇒   ΔW = Bᵀ A = Q_b (R_b R_aᵀ) Q_aᵀ
    R_b R_aᵀ = U Σ Vᵀ             ⇒   B_k = (Q_b U_k Σ_k^½)ᵀ,  A_k = Σ_k^½ V_kᵀ Q_aᵀ
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def truncate_rank(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-≤k factors of ΔW = Bᵀ·A, computed in rank space (see module docstring).

    A ``[..., R, I]``, B ``[..., R, O]`` → ``([..., k', I], [..., k', O])`` with
    ``k' = min(k, R, I, O)``; the work runs in fp64 for fp64 input, else fp32.
    """
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    q_a, r_a = torch.linalg.qr(A.to(work).mT)
    q_b, r_b = torch.linalg.qr(B.to(work).mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    k = min(k, s.shape[-1])
    root = s[..., :k].sqrt()
    B_k = (q_b @ (u[..., :k] * root[..., None, :])).mT
    A_k = (root[..., :, None] * vh[..., :k, :]) @ q_a.mT
    return A_k.to(A.dtype), B_k.to(B.dtype)


def compose_adapters(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine k segment adapters into one along the rank axis.

    Args:
        As: k down factors ``[..., R_i, I]`` with the same leading dims (e.g. the layer axis).
        Bs: k up factors ``[..., R_i, O]`` (rank-major), matching ``As``.
        weights: k scalars multiplying each segment's A (spec §5 ``scalers``), default 1.
        bias: optional ``(A_b [..., R_b, I], B_b [..., R_b, O])`` appended once, unweighted.
        max_rank: if given, re-compress to the best rank-≤max_rank approximation of the sum.

    Returns:
        ``(A, B)`` of rank ``ΣR_i (+R_b)``, chunk-major then bias, whose ``Bᵀ·A`` is exactly
        ``Σ w_i B_iᵀ A_i (+ B_bᵀ A_b)``; or rank ≤ max_rank factors of its truncated SVD.
    """
    a_parts = list(As) if weights is None else [w * a for w, a in zip(weights, As)]
    b_parts = list(Bs)
    if bias is not None:
        a_parts.append(bias[0])
        b_parts.append(bias[1])
    A, B = torch.cat(a_parts, dim=-2), torch.cat(b_parts, dim=-2)
    if max_rank is None:
        return A, B
    return truncate_rank(A, B, max_rank)
