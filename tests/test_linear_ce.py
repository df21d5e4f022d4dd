"""The chunked LM-head cross-entropy (`linear_cross_entropy`) against an fp64 reference."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from v2l_fast.train.linear_ce import linear_cross_entropy


def reference(hidden, weight, targets, token_weights):
    """Σ w_t · CE(W h_t, y_t) with full fp64 logits."""
    logits = hidden.double() @ weight.double().t()
    return (token_weights.double() * F.cross_entropy(logits, targets, reduction="none")).sum()


def case(tokens, hidden_size, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    token_weights = torch.rand(tokens, generator=gen)
    return hidden, weight, targets, token_weights


CASES = {
    # (tokens, hidden, vocab, chunk)
    "one chunk, toy VLM head": (40, 64, 150, 256),
    "ragged last chunk": (37, 32, 500, 8),
    "one position per chunk": (5, 16, 70, 1),
    "256M head width, two chunks": (300, 576, 2048, 256),
}


@pytest.mark.parametrize("name", CASES)
def test_loss_and_both_gradients_match_the_fp64_full_logits(name):
    tokens, width, vocab, chunk = CASES[name]
    hidden, weight, targets, token_weights = case(tokens, width, vocab, seed=len(name))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, token_weights, chunk=chunk)
    scale = torch.tensor(1.7)  # the incoming gradient is applied in backward
    (loss * scale).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = reference(h64, w64, targets, token_weights)
    (expected * scale.double()).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-6, atol=1e-6)
    for ours, exact in ((h.grad, h64.grad), (w.grad, w64.grad)):  # fp32 sums over up to 300 tokens
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    hidden, weight, targets, token_weights = case(20, 16, 90, seed=3)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, token_weights, chunk=7).backward()
    assert weight.grad is None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_without_gradients_only_the_loss_is_made():
    hidden, weight, targets, token_weights = case(12, 8, 30, seed=4)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, token_weights)
    torch.testing.assert_close(loss.double(), reference(hidden, weight, targets, token_weights),
                               rtol=2e-6, atol=1e-6)


BAD = {
    "targets: expected token ids in [0, 30), got [0, 30]": dict(targets=torch.tensor([0, 30])),
    "weight: expected [vocab, 8] (the hidden size), got [30, 9]": dict(weight=torch.zeros(30, 9)),
    "targets: expected one target and one weight per token (2 tokens), got 3 targets, 2 weights":
        dict(targets=torch.tensor([0, 1, 2])),
    "chunk: expected an int >= 1, got 0": dict(chunk=0),
}


@pytest.mark.parametrize("message", BAD)
def test_bad_inputs_fail_in_one_line(message):
    args = dict(hidden=torch.zeros(2, 8), weight=torch.zeros(30, 8), targets=torch.tensor([0, 1]),
                token_weights=torch.ones(2))
    args.update(BAD[message])
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        linear_cross_entropy(**args)
