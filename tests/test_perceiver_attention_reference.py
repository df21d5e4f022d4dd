"""`reference.perceiver_attention` against a brute-force loop, fp64 gradcheck, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from v2l_fast import ops
from v2l_fast.reference import perceiver_attention, rms_norm
from v2l_fast.testing import assert_rel_close, rel_error

WEIGHTS = ("q_weight", "k_weight", "v_weight", "o_weight", "latents_norm_weight",
           "context_norm_weight")


def brute_force(latents, context, mask, w, nh, nkv, eps=1e-6):
    """Independent ground truth in fp64: one row, head and query at a time; masked keys dropped."""
    N, Q, D = latents.shape
    hd = w["q_weight"].shape[0] // nh
    out = torch.zeros(N, Q, D, dtype=torch.float64)
    wq, wk, wv, wo = (w[k].double() for k in ("q_weight", "k_weight", "v_weight", "o_weight"))

    def norm(x, weight):
        return weight.double() * x / torch.sqrt((x * x).mean() + eps)

    for n in range(N):
        zn = [norm(latents[n, i].double(), w["latents_norm_weight"]) for i in range(Q)]
        kept = range(context.shape[1]) if mask is None else \
            [t for t in range(context.shape[1]) if mask[n % mask.shape[0], t]]
        keys = [norm(context[n, t].double(), w["context_norm_weight"]) for t in kept] + zn
        for i in range(Q):
            heads = []
            for h in range(nh):
                g = h // (nh // nkv)
                q = wq[h * hd:(h + 1) * hd] @ zn[i]
                ks = [wk[g * hd:(g + 1) * hd] @ x for x in keys]
                vs = [wv[g * hd:(g + 1) * hd] @ x for x in keys]
                scores = torch.stack([q @ k for k in ks]) / math.sqrt(hd)
                p = torch.exp(scores - scores.max())
                heads.append(sum(pj * v for pj, v in zip(p / p.sum(), vs)))
            out[n, i] = wo @ torch.cat(heads)
    return out


def make_inputs(N, Q, S, D, nh, nkv, hd, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return dict(
        latents=rnd(N, Q, D), context=rnd(N, S, D, scale=2.0),
        q_weight=rnd(nh * hd, D, scale=D ** -0.5), k_weight=rnd(nkv * hd, D, scale=D ** -0.5),
        v_weight=rnd(nkv * hd, D, scale=D ** -0.5), o_weight=rnd(D, nh * hd, scale=(nh * hd) ** -0.5),
        latents_norm_weight=1 + rnd(D, scale=0.2), context_norm_weight=1 + rnd(D, scale=0.2))


def call(inputs, mask, nh, nkv, fn=perceiver_attention, **kw):
    return fn(inputs["latents"], inputs["context"], mask,
                               **{k: inputs[k] for k in WEIGHTS}, num_heads=nh, num_kv_heads=nkv, **kw)


@pytest.mark.parametrize("N,M,Q,S,D,nh,nkv,hd", [
    (2, None, 3, 5, 8, 2, 1, 4),
    (4, 2, 2, 7, 12, 4, 2, 3),     # [B, S] mask serving L = 2 layers
    (3, 3, 1, 1, 6, 2, 2, 5),      # one context token, one latent
    (2, 1, 4, 9, 10, 6, 3, 2),
])
def test_matches_brute_force(N, M, Q, S, D, nh, nkv, hd):
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, seed=N + S)
    gen = torch.Generator().manual_seed(S)
    mask = None if M is None else torch.rand(M, S, generator=gen) > 0.4
    if mask is not None:
        mask[:, 0] = True
    out = call(inputs, mask, nh, nkv)
    assert out.shape == (N, Q, D) and out.dtype == torch.float32
    assert_rel_close(out, brute_force(inputs["latents"], inputs["context"], mask, inputs, nh, nkv).float())


def test_mask_row_follows_layer_major_fold():
    """Row l·B + b uses mask row b: an [N, S] mask repeating the [B, S] one gives the same result."""
    L, B, Q, S, D = 3, 2, 2, 6, 8
    inputs = make_inputs(L * B, Q, S, D, 2, 1, 4, seed=3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    full = mask.repeat(L, 1)
    torch.testing.assert_close(call(inputs, mask, 2, 1), call(inputs, full, 2, 1))
    swapped = call(inputs, mask.flip(0), 2, 1)
    assert not torch.allclose(swapped, call(inputs, mask, 2, 1))


def test_rms_norm_casts_before_the_weight():
    x = torch.randn(5, 16).to(torch.float16)
    weight = torch.rand(16) + 0.5
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    out = rms_norm(x, weight)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gradients_match_brute_force_autograd():
    inputs = make_inputs(4, 3, 7, 10, 4, 2, 3, dtype=torch.float64, seed=9)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0, 0]])
    leaves = [t.requires_grad_(True) for t in inputs.values()]
    grad_out = torch.randn(4, 3, 10, dtype=torch.float64)
    grads = torch.autograd.grad(call(inputs, mask, 4, 2), leaves, grad_out)
    brute = brute_force(inputs["latents"], inputs["context"], mask, inputs, 4, 2)
    for name, g, r in zip(inputs, grads, torch.autograd.grad(brute, leaves, grad_out)):
        err = rel_error(g, r)
        assert err <= 1e-10, f"d{name}: relative error {err:.2e}"


def test_gradcheck_fp64():
    inputs = make_inputs(2, 2, 4, 6, 4, 2, 3, dtype=torch.float64, seed=9)
    mask = torch.tensor([[1, 0, 1, 1]])
    names = list(inputs)

    def fn(*tensors):
        return call(dict(zip(names, tensors)), mask, 4, 2)

    args = tuple(t.requires_grad_(True) for t in inputs.values())
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_check_false_skips_the_value_check():
    inputs = make_inputs(2, 2, 3, 8, 2, 1, 4, seed=4)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    out = call(inputs, mask, 2, 1, fn=ops.perceiver_attention, check=False, backend="torch")
    assert_rel_close(out, brute_force(inputs["latents"], inputs["context"], mask, inputs, 2, 1).float())


def _bad(**changes):
    inputs = make_inputs(4, 2, 5, 8, 4, 2, 2, seed=1)
    kw = dict(nh=4, nkv=2, mask=None)
    for key, value in changes.items():
        (kw if key in kw else inputs)[key] = value
    mask = kw.pop("mask")
    return inputs, mask, kw


@pytest.mark.parametrize("changes,match", [
    (dict(latents=torch.zeros(4, 2)), "latents"),
    (dict(latents=torch.zeros(4, 2, 8, dtype=torch.int64)), "latents"),
    (dict(context=torch.zeros(3, 5, 8)), "context"),
    (dict(context=torch.zeros(4, 5, 9)), "context"),
    (dict(context=torch.zeros(4, 0, 8)), "context"),
    (dict(context=torch.zeros(4, 5, 8, device="meta")), "context"),
    (dict(q_weight=torch.zeros(7, 8)), "q_weight"),
    (dict(k_weight=torch.zeros(6, 8)), "k_weight"),
    (dict(v_weight=torch.zeros(4, 8, dtype=torch.int32)), "v_weight"),
    (dict(o_weight=torch.zeros(8, 4)), "o_weight"),
    (dict(latents_norm_weight=torch.zeros(7)), "latents_norm_weight"),
    (dict(context_norm_weight=torch.zeros(8, 1)), "context_norm_weight"),
    (dict(nkv=3), "num_heads"),
    (dict(nkv=0), "num_heads"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), "context_mask"),
    (dict(mask=torch.ones(4, 6, dtype=torch.bool)), "context_mask"),
    (dict(mask=torch.ones(4, 5)), "context_mask"),
    (dict(mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])), r"context_mask.*all-masked rows \[1\]"),
])
def test_bad_input_names_the_argument(changes, match):
    inputs, mask, kw = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        call(inputs, mask, fn=ops.perceiver_attention, backend="torch", **kw)
