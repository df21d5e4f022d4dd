"""Benchmarks of the Perceiver hypernetwork's cross-attention blocks at the workloads of
SmolVLM2-500M and -2.2B (`pytest bench/bench_perceiver_attention.py --benchmark`); the modality
projection's SwiGLU is in bench_swiglu_mlp.py.

Blocks: the 9 encoder cross-attention layers (D=512, Q=8 latents, nh=16, hd=128, nkv=4) over the
projected context of one video (N = L rows), ``z ← z + attention(z, context)`` per layer, forward
(no grad, as at internalisation) and forward+backward (gradients for the latents, every weight
and the context, as in training). Providers: ``reference`` (eager, K/V materialised),
``sdpa`` (K/V materialised, torch scaled_dot_product_attention), ``torch`` (the torch backend,
K/V absorbed into the queries) and ``triton`` (absorbed K/V, flash-decoding kernel), each layer
normalising the context; ``torch-norm-once`` / ``triton-norm-once``: the same backends called as
the Perceiver calls them, the context RMS-normalised once for the 9 layers
(``context_normalized=True``).

The providers of one workload run interleaved, round by round (`harness.interleaved`): on a shared,
noisy machine every provider then sees the same load, and the rows' ratios are side by side.
Without CUDA only 12 frames run (fp32) and triton is skipped: the interpreter's timings mean
nothing. Each row carries its FLOP count (the absorbed count for the absorbed providers) and the
bytes of projected context read.
"""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from v2l_fast.kernels.perceiver_attention_torch import perceiver_attention as torch_attention
from v2l_fast.reference import perceiver_attention as reference_attention
from v2l_fast.reference import rms_norm, rms_normalize

import harness
from workloads import FRAMES, HEAD_DIM, MODELS, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS, D, Q, block_flops, context_length

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
EPS = 1e-6
NORM_ONCE = "-norm-once"  # suffix of the providers called as the Perceiver calls them

def sdpa_attention(latents, context, context_mask, *, q_weight, k_weight, v_weight, o_weight,
                   latents_norm_weight, context_norm_weight, num_heads, num_kv_heads, eps=EPS):
    """The materialised-K/V peer: both norms, K/V of [context ; latents], fused SDPA, o_proj."""
    N, S = context.shape[:2]
    zn = rms_norm(latents, latents_norm_weight, eps).to(latents.dtype)
    kv_in = torch.cat([rms_norm(context, context_norm_weight, eps).to(context.dtype), zn], dim=1)
    q = F.linear(zn, q_weight).view(N, Q, num_heads, -1).transpose(1, 2)
    k = F.linear(kv_in, k_weight).view(N, S + Q, num_kv_heads, -1).transpose(1, 2)
    v = F.linear(kv_in, v_weight).view(N, S + Q, num_kv_heads, -1).transpose(1, 2)
    keep = torch.ones(N, 1, 1, S + Q, dtype=torch.bool, device=context.device)
    keep[:, 0, 0, :S] = context_mask.bool().repeat(N // context_mask.shape[0], 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    return F.linear(out.transpose(1, 2).reshape(N, Q, -1), o_weight)


def _normalizes_once(name: str) -> bool:
    return name.endswith(NORM_ONCE)


def _provider(name: str):
    """The attention of provider ``name``, called with keyword weights as the reference (the
    context already normalised for the ``*-norm-once`` providers)."""
    if name == "reference":
        return reference_attention
    if name == "sdpa":
        return sdpa_attention
    if name.startswith("torch"):
        kernel = torch_attention
    else:
        from v2l_fast.kernels.perceiver_attention import perceiver_attention as kernel
    normalized = _normalizes_once(name)

    def call(latents, context, mask, *, q_weight, k_weight, v_weight, o_weight, latents_norm_weight,
             context_norm_weight, num_heads, num_kv_heads):
        return kernel(latents, context, mask, q_weight, k_weight, v_weight, o_weight, latents_norm_weight,
                      context_norm_weight, num_heads, num_kv_heads, EPS, normalized)

    return call


def _block_weights(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)

    def linear(out_f, in_f):
        w = (torch.rand(out_f, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
        return w.to(DEVICE, DTYPE).requires_grad_(requires_grad)

    return [dict(q_weight=linear(NUM_HEADS * HEAD_DIM, D), k_weight=linear(NUM_KV_HEADS * HEAD_DIM, D),
                 v_weight=linear(NUM_KV_HEADS * HEAD_DIM, D), o_weight=linear(D, NUM_HEADS * HEAD_DIM),
                 latents_norm_weight=torch.ones(D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad),
                 context_norm_weight=torch.ones(D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad))
            for _ in range(NUM_BLOCKS)]


PROVIDERS = ("reference", "sdpa", "torch", "torch" + NORM_ONCE, "triton", "triton" + NORM_ONCE)


def _providers() -> list[str]:
    # The interpreter's timings mean nothing: triton runs only on a GPU.
    return [p for p in PROVIDERS if not p.startswith("triton") or ON_GPU]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("model", list(MODELS))
def test_blocks(benchmark, bench_record, model, frames, mode):
    if frames > 12 and not ON_GPU:
        pytest.skip("without a GPU only the 12-frame workloads run (CPU time)")
    L, S = MODELS[model]["L"], context_length(model, frames)
    training = mode == "fwd+bwd"
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(L, S, D, generator=gen).to(DEVICE, DTYPE).requires_grad_(training)
    latents = torch.randn(L, Q, D, generator=gen).to(DEVICE, DTYPE).requires_grad_(training)
    mask = torch.ones(1, S, dtype=torch.bool, device=DEVICE)
    blocks = _block_weights(training)
    leaves = [latents, context] + [w for weights in blocks for w in weights.values()]
    grad_out = torch.randn(L, Q, D, generator=gen).to(DEVICE, DTYPE)

    def step_of(provider):
        attention = functools.partial(_provider(provider), num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS)

        def forward():
            keys = rms_normalize(context, EPS) if _normalizes_once(provider) else context
            z = latents
            for weights in blocks:
                z = z + attention(z, keys, mask, **weights)
            return z

        def step():
            if not training:
                with torch.no_grad():
                    return forward()
            return torch.autograd.grad(forward(), leaves, grad_out)

        return step

    def derive(provider, times):
        flops = block_flops(L, S, absorbed=provider.startswith(("torch", "triton"))) * (3 if training else 1)
        return {"flops": flops, "tflop_s": flops / statistics.median(times[provider]) / 1e12}

    harness.interleaved(benchmark, bench_record, {p: step_of(p) for p in _providers()}, rounds=10 if ON_GPU else 3,
                        derive=derive, op="blocks", model=model, frames=frames, S=S, rows=L, mode=mode,
                        dtype=str(DTYPE), bytes=NUM_BLOCKS * context.numel() * context.element_size())
