"""Weighted cross-entropy of an LM head's logits without keeping the logits (chunked, gradient in the forward).

``loss = Σ_t w_t · (logsumexp_v z_tv − z_t,y_t)``, ``z_t = W h_t`` (``h [tokens, H]`` the final
hidden states at the answer positions, ``W [vocab, H]`` the head's weight, ``y`` the targets, ``w``
per-token weights: spec §7's CE is ``w_t = 1 / (count of t's row · rows)``). Its gradients are

    ∂loss/∂h_t = w_t · (softmax(z_t) − onehot(y_t)) W        ∂loss/∂W = Σ_t w_t (softmax(z_t) − onehot(y_t))ᵀ h_t

so each chunk of positions makes its logits, its loss and its gradients at once and drops the
logits: the ``[tokens, vocab]`` fp32 matrix (400 MB at 2048 answer tokens × SmolVLM2's 49 280) is
never stored for backward, and the separate log-softmax, its backward and the head's backward
GEMM over the stored logits become one pass per chunk (19 % faster on the CPU, `CHUNK_TOKENS`):
``e = exp(z − max z)`` is made in the logits' storage, and the softmax's ``1 / Σe``, the token
weights and the one-hot term are applied on the ``[chunk, H]`` side of the GEMMs, never as
another pass over ``[chunk, vocab]``.
Backward only scales the gradients kept from the forward by the incoming gradient (the loss is a
scalar). The same trick as Liger-Kernel's fused linear cross-entropy, written for this objective's
per-token weights.

The logits are made as the head makes them (``F.linear`` in the head's dtype, autocast applies)
and then cast to fp32, as `v2l_fast.train.objective.answer_logits` does; the loss equals
``Σ w · cross_entropy(logits.float())`` within fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v2l_fast.errors import check_int, check_tensor, fail

# Positions per chunk. Forward + backward of the training step's head (2048 answer positions, H 576,
# vocab 49 280, fp32, 2 cores, fastest of 6 rounds on a noisy machine): full logits 1.54 s; chunks of
# 256 / 512 / 1024 / 2048 positions 1.39 / 1.29 / 1.25 / 1.32 s. 1024 keeps the gain with a 200 MB
# transient (1024 × 49 280 fp32) instead of the full logits and their gradient.
CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, w = hidden[start:start + chunk], targets[start:start + chunk], token_weights[start:start + chunk]
            logits = F.linear(h, weight).float()
            target_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            e = logits.sub_(peak).exp_()  # exp(z − max), in the logits' storage
            total = e.sum(dim=1)
            loss += (w * (peak.squeeze(1) + total.log() - target_logit)).sum()
            # (softmax − onehot)·w = e·(w / total) − onehot·w: the scales go on the [chunk, H] sides
            scale = (w / total).unsqueeze(1)
            if need_h:
                grad = (e.to(weight.dtype) @ weight).float() * scale - w.unsqueeze(1) * weight[y].float()
                grad_h[start:start + chunk] = grad.to(hidden.dtype)
            if need_w:
                hf = h.float()
                grad_w += e.t() @ (hf * scale)
                grad_w.index_add_(0, y, -(w.unsqueeze(1) * hf))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor, *, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """``Σ_t token_weights[t] · CE(hidden[t] @ weightᵀ, targets[t])`` in fp32, the logits never stored.

    Args:
        hidden: ``[tokens, H]`` final hidden states (float).
        weight: ``[vocab, H]`` the LM head's weight (no bias), same dtype as ``hidden``.
        targets: ``[tokens]`` int64 in ``[0, vocab)``.
        token_weights: ``[tokens]`` float32 weight of each token's CE.
        chunk: positions per pass (`CHUNK_TOKENS`).

    Gradients reach ``hidden`` and ``weight`` when they require them (module docstring).
    """
    check_tensor("hidden", hidden, ndim=2, floating=True, shape_hint="[tokens, H]")
    check_tensor("weight", weight, ndim=2, floating=True, shape_hint="[vocab, H]")
    check_tensor("targets", targets, ndim=1, index=True, shape_hint="[tokens]")
    check_tensor("token_weights", token_weights, ndim=1, floating=True, shape_hint="[tokens]")
    check_int("chunk", chunk, 1)
    if weight.shape[1] != hidden.shape[1]:
        fail("weight", f"[vocab, {hidden.shape[1]}] (the hidden size)", list(weight.shape))
    if len(targets) != len(hidden) or len(token_weights) != len(hidden):
        fail("targets", f"one target and one weight per token ({len(hidden)} tokens)",
             f"{len(targets)} targets, {len(token_weights)} weights")
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        fail("targets", f"token ids in [0, {weight.shape[0]})", f"[{int(targets.min())}, {int(targets.max())}]")
    return _LinearCrossEntropy.apply(hidden, weight, targets, token_weights.float(), chunk)
