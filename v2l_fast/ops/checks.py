"""Argument checks of the public ops, one function per op, run once before any backend.

Each takes the op's bound arguments (`Arguments`: one attribute per parameter of the
op's reference signature) and raises the project's ValueError naming the offending argument
(`v2l_fast.errors`). Shape, dtype and device checks read metadata only and always run; the
data-dependent ones (``values=True``) read tensors, so they synchronise with a GPU and are
skipped with ``check=False`` in a hot loop.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from v2l_fast.errors import check_dim, check_tensor, describe, fail
from v2l_fast.kernels.lora_sgmv_metadata import LoraSgmvMetadata

if TYPE_CHECKING:
    from v2l_fast.ops.registry import Arguments


def lora_sgmv(a: Arguments, *, values: bool = True) -> None:
    """Validate `lora_sgmv` arguments; raise ValueError naming the offending one.

    Shape, dtype and device checks are free (metadata only) and always run. ``values``
    adds the data-dependent checks (indptr monotone and ending at T, adapter ids and ranks in
    range), which read tensors and so synchronise with a GPU: skip them in a hot loop.
    """
    x, A, B, seg_indptr, seg_adapter = a.x, a.A, a.B, a.seg_indptr, a.seg_adapter
    ranks, layer, base = a.ranks, a.layer, a.base
    check_tensor("x", x, ndim=2, floating=True, shape_hint="[T, I]")
    dev = x.device
    T, I = x.shape
    check_tensor("A", A, ndim=(3, 4), floating=True, device=dev, shape_hint="[n, R, I] or [n, L, R, I]")
    check_tensor("B", B, ndim=A.dim(), floating=True, device=dev,
                 shape_hint="[n, R, O]" if A.dim() == 3 else "[n, L, R, O] (same rank as A)")
    check_dim("A", A, -1, I, "I, the width of x")
    if A.shape[:-1] != B.shape[:-1]:
        fail("B", f"leading dims {list(A.shape[:-1])} matching A ([n, R] or [n, L, R])", describe(B))
    n, R = A.shape[0], A.shape[-2]
    if A.dim() == 4:
        L = A.shape[1]
        if layer is None:
            fail("layer", f"a layer index in [0, {L}) for the 4-D adapter pool A", None)
        if not isinstance(layer, int) or not 0 <= layer < L:
            fail("layer", f"an int in [0, {L})", layer)
    elif layer is not None:
        fail("layer", "None for a 3-D adapter pool A [n, R, I]", layer)
    check_tensor("seg_indptr", seg_indptr, ndim=1, index=True, device=dev, shape_hint="[S+1]")
    if seg_indptr.numel() < 1:
        fail("seg_indptr", "at least one element ([S+1] with seg_indptr[0] == 0)", describe(seg_indptr))
    S = seg_indptr.numel() - 1
    check_tensor("seg_adapter", seg_adapter, ndim=1, index=True, device=dev, shape_hint=f"[S] = [{S}]")
    check_dim("seg_adapter", seg_adapter, 0, S, "S, one adapter id per segment")
    if ranks is not None:
        check_tensor("ranks", ranks, ndim=1, index=True, device=dev, shape_hint=f"[n] = [{n}]")
        check_dim("ranks", ranks, 0, n, "n, one rank per adapter")
    if base is not None:
        check_tensor("base", base, ndim=2, floating=True, device=dev, shape_hint=f"[T, O] = [{T}, {B.shape[-1]}]")
        if tuple(base.shape) != (T, B.shape[-1]):
            fail("base", f"shape [{T}, {B.shape[-1]}] ([T, O])", describe(base))
    _lora_sgmv_metadata(getattr(a, "metadata", None), T, n, dev)
    if not values:
        return
    ptr = seg_indptr.tolist()
    if ptr[0] != 0 or ptr[-1] != T:
        shown = ptr if len(ptr) <= 16 else f"[{ptr[0]}, ..., {ptr[-1]}]"
        fail("seg_indptr", f"to start at 0 and end at T = {T}", shown)
    if any(b < a for a, b in zip(ptr, ptr[1:])):
        fail("seg_indptr", "a non-decreasing sequence", ptr if len(ptr) <= 16 else "a sequence with a decreasing step")
    if S and not bool(((seg_adapter >= -1) & (seg_adapter < n)).all()):
        fail("seg_adapter", f"ids in [-1, {n}) (n = {n} adapters; -1 means none)", seg_adapter.tolist())
    if ranks is not None and n and not bool(((ranks >= 0) & (ranks <= R)).all()):
        fail("ranks", f"values in [0, {R}] (R = {R}, the pool's rank)", ranks.tolist())


def _lora_sgmv_metadata(metadata: object, num_tokens: int, num_adapters: int, device: torch.device) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, LoraSgmvMetadata):
        fail("metadata", "a LoraSgmvMetadata from lora_sgmv_metadata(...)", type(metadata).__name__)
    if (metadata.num_tokens, metadata.num_adapters) != (num_tokens, num_adapters):
        fail("metadata", f"built for T = {num_tokens} tokens and n = {num_adapters} adapters",
             f"T = {metadata.num_tokens}, n = {metadata.num_adapters}")
    if metadata.sorted_tokens.device != device:
        fail("metadata", f"tensors on {device}", metadata.sorted_tokens.device)


def perceiver_attention(a: Arguments, *, values: bool = True) -> None:
    """Validate `perceiver_attention` arguments; raise ValueError naming the offending one.

    ``values`` adds the data-dependent check that no context row is fully masked.
    """
    latents, context, context_mask, num_heads, num_kv_heads = (
        a.latents, a.context, a.context_mask, a.num_heads, a.num_kv_heads)
    q_weight, k_weight, v_weight, o_weight = a.q_weight, a.k_weight, a.v_weight, a.o_weight
    latents_norm_weight, context_norm_weight = a.latents_norm_weight, a.context_norm_weight
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
    if not isinstance(a.context_normalized, bool):
        fail("context_normalized", "a bool", type(a.context_normalized).__name__)
    if context_mask is None:
        return
    check_tensor("context_mask", context_mask, ndim=2, device=dev, shape_hint="[M, S] with N % M == 0")
    if context_mask.is_floating_point() or context_mask.is_complex():
        fail("context_mask", "a bool or integer tensor (1 = keep)", describe(context_mask))
    M = context_mask.shape[0]
    if context_mask.shape[1] != S or M == 0 or N % M:
        fail("context_mask", f"shape [M, {S}] with N = {N} a multiple of M", describe(context_mask))
    if values and not bool(context_mask.bool().any(dim=1).all()):
        empty = (~context_mask.bool().any(dim=1)).nonzero().squeeze(1).tolist()
        fail("context_mask", "at least one kept token in every row", f"all-masked rows {empty}")


def swiglu_mlp(a: Arguments, *, values: bool = True) -> None:
    """Validate `swiglu_mlp` arguments; raise ValueError naming the offending one (no data checks)."""
    x, gate_weight, up_weight, down_weight = a.x, a.gate_weight, a.up_weight, a.down_weight
    check_tensor("x", x, floating=True, shape_hint="[..., H]")
    if x.dim() < 1:
        fail("x", "a tensor with a last dim H", describe(x))
    H = x.shape[-1]
    check_tensor("gate_weight", gate_weight, ndim=2, floating=True, device=x.device, shape_hint="[F, H]")
    if gate_weight.shape[1] != H:
        fail("gate_weight", f"shape [F, {H}] (H = width of x)", describe(gate_weight))
    F_ = gate_weight.shape[0]
    check_tensor("up_weight", up_weight, ndim=2, floating=True, device=x.device, shape_hint=f"[{F_}, {H}]")
    if tuple(up_weight.shape) != (F_, H):
        fail("up_weight", f"shape [{F_}, {H}] like gate_weight", describe(up_weight))
    check_tensor("down_weight", down_weight, ndim=2, floating=True, device=x.device, shape_hint=f"[D, {F_}]")
    if down_weight.shape[1] != F_:
        fail("down_weight", f"shape [D, {F_}]", describe(down_weight))


def compose_adapters(a: Arguments, *, values: bool = True) -> None:
    """Validate `compose_adapters` arguments; raise ValueError naming the offending one (no data checks)."""
    As, Bs, weights, bias, max_rank = a.As, a.Bs, a.weights, a.bias, a.max_rank
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
    if weights is not None:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1 or weights.is_complex() or weights.dtype == torch.bool:
                fail("weights", f"a 1-D real tensor of {len(As)} scalars", describe(weights))
        elif not isinstance(weights, Sequence) or not all(_is_real_scalar(w) for w in weights):
            fail("weights", f"{len(As)} real scalars, one per segment", repr(weights))
        if len(weights) != len(As):
            fail("weights", f"{len(As)} scalars, one per segment", len(weights))
    if max_rank is not None and (type(max_rank) is not int or max_rank < 1):
        fail("max_rank", "a positive int or None", max_rank)


def _is_real_scalar(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
