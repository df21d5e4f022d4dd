"""Rank-space composition of LoRA adapters, the reference (FRAMES2LORA_SPEC §5).

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

from v2l_fast.errors import check_tensor, describe, fail


def _check_compose_args(As, Bs, weights, bias, max_rank) -> None:
    if not isinstance(As, Sequence) or not isinstance(Bs, Sequence) or len(As) == 0:
        fail("As", "a non-empty sequence of [..., R_i, I] tensors", type(As).__name__)
    if len(Bs) != len(As):
        fail("Bs", f"{len(As)} tensors, one per A factor", len(Bs))
    pairs = list(zip(As, Bs))
    if bias is not None:
        if not isinstance(bias, Sequence) or len(bias) != 2:
            fail("bias", "a pair (A_b [..., R_b, I], B_b [..., R_b, O])", type(bias).__name__)
        pairs.append(tuple(bias))
    lead = As[0].shape[:-2] if isinstance(As[0], torch.Tensor) else None
    I = O = None
    for i, (a, b) in enumerate(pairs):
        name_a, name_b = (f"As[{i}]", f"Bs[{i}]") if i < len(As) else ("bias[0]", "bias[1]")
        check_tensor(name_a, a, floating=True, shape_hint="[..., R_i, I]")
        check_tensor(name_b, b, floating=True, device=a.device, shape_hint="[..., R_i, O]")
        if a.dim() < 2 or b.dim() != a.dim():
            fail(name_b, f"a tensor of rank {a.dim()} ≥ 2 like {name_a}", describe(b))
        if a.shape[:-2] != lead or b.shape[:-2] != lead:
            fail(name_a if a.shape[:-2] != lead else name_b,
                 f"leading dims {list(lead)} (those of As[0])", describe(a if a.shape[:-2] != lead else b))
        if a.shape[-2] != b.shape[-2]:
            fail(name_b, f"rank {a.shape[-2]} in dim -2 (that of {name_a})", describe(b))
        I = a.shape[-1] if I is None else I
        O = b.shape[-1] if O is None else O
        if a.shape[-1] != I:
            fail(name_a, f"input width I = {I} in the last dim", describe(a))
        if b.shape[-1] != O:
            fail(name_b, f"output width O = {O} in the last dim", describe(b))
        if a.device != As[0].device:
            fail(name_a, f"a tensor on {As[0].device}", describe(a))
    if weights is not None and len(weights) != len(As):
        fail("weights", f"{len(As)} scalars, one per segment", len(weights))
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        fail("max_rank", "a positive int or None", max_rank)


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
    _check_compose_args(As, Bs, weights, bias, max_rank)
    a_parts = list(As) if weights is None else [w * a for w, a in zip(weights, As)]
    b_parts = list(Bs)
    if bias is not None:
        a_parts.append(bias[0])
        b_parts.append(bias[1])
    A, B = torch.cat(a_parts, dim=-2), torch.cat(b_parts, dim=-2)
    if max_rank is None:
        return A, B
    return truncate_rank(A, B, max_rank)
