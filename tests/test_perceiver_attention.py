"""The `perceiver_attention` backends against the reference (fp64): the torch implementation with
K/V absorbed (kernels/perceiver_attention_torch.py) and the Triton kernels
(kernels/perceiver_attention.py, under TRITON_INTERPRET=1 without a GPU: fp32, fp16; bf16 only
on a GPU).
"""

from __future__ import annotations

import functools

import pytest
import torch

from v2l_fast import ops
from v2l_fast import reference as reference_module
from v2l_fast.kernels import perceiver_attention_torch
from v2l_fast.reference import perceiver_attention as reference
from v2l_fast.testing import REL_TOLERANCE, assert_rel_close, rel_error

WEIGHTS = ("q_weight", "k_weight", "v_weight", "o_weight", "latents_norm_weight",
           "context_norm_weight")
EPS = 1e-6


def triton_module():
    return pytest.importorskip("v2l_fast.kernels.perceiver_attention")


def implementation(name: str, num_splits: int | None = None):
    """A backend's kernel-level function, called with the op's arguments in order."""
    if name == "torch":
        return perceiver_attention_torch.perceiver_attention
    return functools.partial(triton_module().perceiver_attention_splits, num_splits=num_splits)


# (backend, forced key splits of the Triton kernel): 1 split, several, the device heuristic.
IMPLEMENTATIONS = [("torch", None), ("triton", 1), ("triton", 3), ("triton", None)]
IMPL_IDS = ["torch", "triton-1split", "triton-3splits", "triton-auto"]


def make_inputs(N, Q, S, D, nh, nkv, hd, dtype, device, seed):
    """Fresh random latents, context and weights with the scales of a trained block."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return dict(
        latents=rnd(N, Q, D), context=rnd(N, S, D, scale=3.0),
        q_weight=rnd(nh * hd, D, scale=D ** -0.5), k_weight=rnd(nkv * hd, D, scale=D ** -0.5),
        v_weight=rnd(nkv * hd, D, scale=D ** -0.5), o_weight=rnd(D, nh * hd, scale=(nh * hd) ** -0.5),
        latents_norm_weight=1 + rnd(D, scale=0.2), context_norm_weight=1 + rnd(D, scale=0.2))


def ragged_mask(M, S, gen, device):
    """Keep-mask with every row's length drawn in [1, S] (so 1-token rows occur), as int8."""
    lengths = torch.randint(1, S + 1, (M,), generator=gen)
    lengths[0] = 1
    return (torch.arange(S)[None, :] < lengths[:, None]).to(device=device, dtype=torch.int8)


def call(fn, inputs, mask, nh, nkv, context_normalized=False):
    """A kernel-level backend function: every argument positional, as the op passes them."""
    return fn(inputs["latents"], inputs["context"], mask, *(inputs[k] for k in WEIGHTS), nh, nkv, EPS,
              context_normalized)


def call_reference(inputs, mask, nh, nkv, context_normalized=False):
    return reference(inputs["latents"], inputs["context"], mask, **{k: inputs[k] for k in WEIGHTS},
                     num_heads=nh, num_kv_heads=nkv, eps=EPS, context_normalized=context_normalized)


def fp64_reference(inputs, mask, nh, nkv, context_normalized=False):
    return call_reference({k: v.detach().double() for k, v in inputs.items()}, mask, nh, nkv, context_normalized)


def assert_gradients_match(fn, inputs, mask, nh, nkv, grad_out, context_normalized=False):
    """Gradients of every input that requires grad against the fp64 reference's; none is NaN."""
    names = [k for k, t in inputs.items() if t.requires_grad]
    grads = torch.autograd.grad(call(fn, inputs, mask, nh, nkv, context_normalized), [inputs[k] for k in names],
                                grad_out)
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    ref_grads = torch.autograd.grad(call_reference(ref_inputs, mask, nh, nkv, context_normalized),
                                    [ref_inputs[k] for k in names], grad_out.double())
    for name, g, r in zip(names, grads, ref_grads):
        err = rel_error(g.float(), r.float())
        assert err <= REL_TOLERANCE[torch.float32], f"d{name}: relative error {err:.2e}"
    return names


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors, so unwritten kernel outputs show."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(empty_like(*a, **k)))


# (N, M, Q, S, D, nh, nkv, hd): M = mask rows (None: no mask; M < N: one row per video).
SHAPES = [
    (2, 2, 8, 1, 32, 4, 1, 16),         # one context token
    (6, 2, 8, 77, 48, 4, 2, 16),        # [B, S] mask for L=3 layers, D not a power of two
    (4, 4, 5, 300, 64, 8, 4, 32),       # [N, S] mask, S not a multiple of any tile
    (3, None, 16, 130, 32, 16, 4, 16),  # no mask, nh·Q = 256 query rows (several row blocks)
    (2, 1, 8, 40, 64, 16, 4, 128),      # the spec's heads: nh=16, hd=128, nkv=4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,M,Q,S,D,nh,nkv,hd", SHAPES)
@pytest.mark.parametrize("backend,num_splits", IMPLEMENTATIONS, ids=IMPL_IDS)
def test_forward_matches_reference(backend, num_splits, N, M, Q, S, D, nh, nkv, hd, dtype, device,
                                   poisoned_empty):
    fn = implementation(backend, num_splits)
    seed = N * 1000 + S + D + (num_splits or 0)
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, dtype, device, seed)
    mask = None if M is None else ragged_mask(M, S, torch.Generator().manual_seed(seed), device)
    out = call(fn, inputs, mask, nh, nkv)
    assert out.dtype == dtype and out.shape == (N, Q, D)
    assert_rel_close(out, fp64_reference(inputs, mask, nh, nkv).to(dtype), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bool_mask_non_contiguous_inputs(backend, device):
    fn = implementation(backend, num_splits=2)
    N, Q, S, D, nh, nkv, hd = 4, 8, 90, 32, 4, 2, 16
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, torch.float32, device, 7)
    # Strided views: every other token of a longer context, latents transposed in memory.
    inputs["context"] = torch.randn(N, 2 * S, D, device=device)[:, ::2]
    inputs["latents"] = torch.randn(N, D, Q, device=device).transpose(1, 2)
    inputs["k_weight"] = torch.randn(D, nkv * hd, device=device).T / D ** 0.5
    mask = torch.rand(2, S, generator=torch.Generator().manual_seed(3)).to(device) > 0.4
    mask[:, 5] = True
    out = call(fn, inputs, mask, nh, nkv)
    assert_rel_close(out, fp64_reference(inputs, mask, nh, nkv).float(), torch.float32)


@pytest.mark.parametrize("context_grad", [True, False])
@pytest.mark.parametrize("N,M,Q,S,D,nh,nkv,hd", [SHAPES[1], SHAPES[3]])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_reference_autograd(backend, N, M, Q, S, D, nh, nkv, hd, context_grad, device,
                                            poisoned_empty):
    fn = implementation(backend, num_splits=3)
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, torch.float32, device, S + N)
    mask = None if M is None else ragged_mask(M, S, torch.Generator().manual_seed(S), device)
    for name, t in inputs.items():
        t.requires_grad_(name != "context" or context_grad)
    names = assert_gradients_match(fn, inputs, mask, nh, nkv, torch.randn(N, Q, D, device=device))
    assert ("context" in names) == context_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_row_attends_to_the_latents_only(backend, device):
    """A context row with no kept token (the op rejects it unless ``check=False``) sees only the
    latents' own keys, like the reference; its gradients are finite and match too."""
    fn = implementation(backend, num_splits=2)
    N, Q, S, D, nh, nkv, hd = 4, 8, 20, 32, 4, 2, 16
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, torch.float32, device, 11)
    mask = torch.ones(2, S, dtype=torch.bool, device=device)
    mask[1] = False
    weights = {k: inputs[k] for k in WEIGHTS}
    with pytest.raises(ValueError, match=r"context_mask.*all-masked rows \[1\]"):
        ops.perceiver_attention(inputs["latents"], inputs["context"], mask, **weights, num_heads=nh,
                                num_kv_heads=nkv, backend=backend)
    out = call(fn, inputs, mask, nh, nkv)
    assert_rel_close(out, fp64_reference(inputs, mask, nh, nkv).float(), torch.float32)
    for t in inputs.values():
        t.requires_grad_(True)
    assert_gradients_match(fn, inputs, mask, nh, nkv, torch.randn(N, Q, D, device=device))


@pytest.mark.parametrize("normalized", [False, True], ids=["raw-context", "normalized-context"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_context_part_lse_and_empty_rows(backend, normalized, device):
    """The context half alone: u and lse against a softmax over normalised rows (normalised by
    the context half, or given normalised); an empty row's lse is ≈ -1e30 (so a log-sum-exp
    merge gives it weight exactly 0)."""
    if backend == "torch":
        context_part = perceiver_attention_torch.context_attention
    else:
        context_part = functools.partial(triton_module()._kernel_context_part, num_splits=3)
    gen = torch.Generator().manual_seed(5)
    N, R, S, D = 3, 20, 50, 24
    queries = torch.randn(N, R, D, generator=gen).to(device)
    context = torch.randn(N, S, D, generator=gen).to(device)
    keep = (torch.rand(N, S, generator=gen) > 0.5).to(device=device, dtype=torch.uint8)
    keep[2] = 0
    y = context.double() * torch.rsqrt(context.double().pow(2).mean(-1, keepdim=True) + EPS)
    u, lse = context_part(queries, y.float() if normalized else context, keep, EPS, normalized)
    scores = (queries.double() @ y.transpose(1, 2)).masked_fill(~keep.bool()[:, None], float("-inf"))
    assert_rel_close(lse[:2], torch.logsumexp(scores[:2], -1).float(), torch.float32)
    assert_rel_close(u[:2], (torch.softmax(scores[:2], -1) @ y[:2]).float(), torch.float32)
    assert bool((lse[2] < -1e29).all()) and bool(torch.isfinite(u).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_normalized_context(backend, dtype, device, poisoned_empty):
    """``context_normalized``: the op applies only the context gain. Given
    ``rms_normalize(context)`` (as the Perceiver's resampler normalises once for all its layers)
    it gives the output on the raw context; given rows that are not unit-RMS it must not
    normalise them either (output and gradients against the fp64 reference with the flag)."""
    fn = implementation(backend, num_splits=3)
    N, M, Q, S, D, nh, nkv, hd = SHAPES[1]
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, dtype, device, 21)
    mask = ragged_mask(M, S, torch.Generator().manual_seed(4), device)
    normalized = {**inputs, "context": reference_module.rms_normalize(inputs["context"], EPS)}
    assert_rel_close(call(fn, normalized, mask, nh, nkv, context_normalized=True),
                     fp64_reference(inputs, mask, nh, nkv).to(dtype), dtype)
    out = call(fn, inputs, mask, nh, nkv, context_normalized=True)  # rows of RMS ≈ 3: kept as they are
    assert_rel_close(out, fp64_reference(inputs, mask, nh, nkv, context_normalized=True).to(dtype), dtype)
    if dtype != torch.float32:
        return
    for t in inputs.values():
        t.requires_grad_(True)
    names = assert_gradients_match(fn, inputs, mask, nh, nkv, torch.randn(N, Q, D, device=device),
                                   context_normalized=True)
    assert names == list(inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_dispatch_and_empty_batch(backend, device):
    fn = implementation(backend)
    N, Q, S, D, nh, nkv, hd = 2, 8, 33, 32, 4, 4, 16
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, torch.float32, device, 13)
    weights = {k: inputs[k] for k in WEIGHTS}
    out = ops.perceiver_attention(inputs["latents"], inputs["context"], None, **weights, num_heads=nh,
                                  num_kv_heads=nkv, backend=backend)
    assert_rel_close(out, fp64_reference(inputs, None, nh, nkv).float(), torch.float32)
    empty = {**inputs, "latents": inputs["latents"][:0], "context": inputs["context"][:0]}
    assert call(fn, empty, None, nh, nkv).shape == (0, Q, D)


def test_auto_never_picks_the_interpreter_on_cpu():
    assert ops.resolve("perceiver_attention", "auto", torch.device("cpu")).backend != "triton"


def test_torch_implementations_import_no_triton():
    import subprocess
    import sys

    code = ("import sys, v2l_fast.kernels.perceiver_attention_torch, v2l_fast.kernels.swiglu_mlp_torch; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bad,match", [
    (dict(context=torch.zeros(3, 10, 32)), "context"),
    (dict(k_weight=torch.zeros(64, 31)), "k_weight"),
    (dict(num_kv_heads=3), "num_heads"),
    (dict(context_normalized=1), r"^context_normalized: expected a bool, got int$"),
])
def test_bad_input_names_the_argument(bad, match):
    inputs = make_inputs(2, 8, 10, 32, 4, 2, 16, torch.float32, "cpu", 1)
    kw = dict(num_heads=4, num_kv_heads=2)
    kw.update({k: v for k, v in bad.items() if not isinstance(v, torch.Tensor)})
    inputs.update({k: v for k, v in bad.items() if isinstance(v, torch.Tensor)})
    weights = {k: inputs[k] for k in WEIGHTS}
    with pytest.raises(ValueError, match=match):
        ops.perceiver_attention(inputs["latents"], inputs["context"], None, **weights, **kw,
                                backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("normalized", [False, True], ids=["raw-context", "normalized-context"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,M,Q,S,D,nh,nkv,hd", [(48, 2, 8, 1000, 512, 16, 4, 128),
                                                 (6, 2, 8, 77, 48, 4, 2, 16)])
def test_bf16_forward_and_gradients_on_gpu(backend, normalized, N, M, Q, S, D, nh, nkv, hd):
    """bf16 on a GPU against the fp64 reference, with the context normalised by the op or
    (``context_normalized``, the Perceiver's call) given normalised."""
    fn = implementation(backend)
    device = torch.device("cuda")
    inputs = make_inputs(N, Q, S, D, nh, nkv, hd, torch.bfloat16, device, 17)
    if normalized:
        inputs["context"] = reference_module.rms_normalize(inputs["context"], EPS)
    mask = ragged_mask(M, S, torch.Generator().manual_seed(1), device)
    for t in inputs.values():
        t.requires_grad_(True)
    out = call(fn, inputs, mask, nh, nkv, context_normalized=normalized)
    ref_inputs = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    ref = call_reference(ref_inputs, mask, nh, nkv, normalized)
    assert_rel_close(out, ref.to(out.dtype), torch.bfloat16)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    ref_grads = torch.autograd.grad(ref, list(ref_inputs.values()), grad_out.double())
    for name, g, r in zip(inputs, grads, ref_grads):
        err = rel_error(g.float(), r.float())
        assert err <= REL_TOLERANCE[torch.bfloat16], f"d{name}: relative error {err:.2e}"
