"""Adapter composition: the torch and Triton backends side by side, and the dense SVD they replace.

Providers of `v2l_fast.ops.compose_adapters`: ``torch`` (the reference: ``torch.cat``, then thin
QRs of the factors and an SVD of the small core) and ``triton`` (one fused pass that weights,
concatenates and accumulates the R × R Grams, then eigh/SVD of R × R matrices in fp64); for
re-compression also ``dense_svd`` (form ΔW = Bᵀ·A as an O × I matrix, full SVD, truncate).

Workloads:

* ``test_compose``: a whole model's adapters, the layer axis batched: k segments of rank r = 16
  plus the bias block (r rows), for the 256M, 500M and 2.2B shapes; ``concat`` (the spec's
  combine, exact) and ``recompress`` (to rank 16). Providers run interleaved in one run
  (`harness.interleaved`), so the ratios come from the same load. Rows carry the minimal bytes
  (every factor read once and the concatenation written once).
* ``test_recompress``: one down_proj layer, rank 32 per segment, re-compressed to 32: the
  rank-space route against the dense SVD.

Without a GPU the triton rows are recorded as skipped with the reason: the kernel then runs only
under the Triton interpreter, whose timings mean nothing (tests/test_compose_adapters.py checks
its results there). ``dense_svd`` of a whole model is skipped on the CPU (tens of seconds a
round); the single-layer rows show its cost.
"""

from __future__ import annotations

import pytest
import torch

from v2l_fast.ops import compose_adapters

import harness
from harness import device, measure, timed

ON_GPU = torch.cuda.is_available()
SHAPES = {"500M": (2560, 960), "2.2B": (8192, 2048)}
SEGMENTS = [4, 16] if ON_GPU else [4]
# name: (L, I, H) of the SmolVLM2 text models.
MODELS = {"256M": (30, 1536, 576), "500M": (32, 2560, 960), "2.2B": (24, 8192, 2048)}
COMPOSE = [(m, s) for m in MODELS for s in (4, 16)] if ON_GPU else [("256M", 4), ("500M", 4)]
RANK = 16
ROUNDS = 10 if ON_GPU else 3
TRITON_SKIP = "triton runs only under the interpreter without a GPU: its timing is not meaningful"


def dense_svd(A, B, k):
    dense = B.mT @ A
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return Vh[..., :k, :] * S[..., :k, None], U[..., :k].mT


def _factors(lead, ranks, I, O, dtype):
    gen = torch.Generator().manual_seed(0)
    As = [(0.05 * torch.randn(*lead, r, I, generator=gen)).to(device(), dtype) for r in ranks]
    Bs = [(0.05 * torch.randn(*lead, r, O, generator=gen)).to(device(), dtype) for r in ranks]
    return As, Bs


@pytest.mark.parametrize("workload", ["concat", "recompress"])
@pytest.mark.parametrize("model,segments", COMPOSE, ids=[f"{m}-{s}seg" for m, s in COMPOSE])
def test_compose(benchmark, bench_record, model, segments, workload):
    """A whole model's composition, every provider interleaved; the results checked against torch's."""
    L, I, H = MODELS[model]
    dtype = torch.float32  # generated adapters are fp32 (docs/method.md §9)
    As, Bs = _factors((L,), [RANK] * segments, I, H, dtype)
    bias_A, bias_B = _factors((L,), [RANK], I, H, dtype)
    max_rank = RANK if workload == "recompress" else None
    kwargs = dict(bias=(bias_A[0], bias_B[0]), max_rank=max_rank, check=False)
    steps, skipped = {}, {}
    for provider in ("torch", "triton", "dense_svd"):
        if provider == "triton" and not ON_GPU:
            skipped[provider] = TRITON_SKIP
        elif provider == "dense_svd" and workload == "concat":
            continue
        elif provider == "dense_svd" and not ON_GPU:
            skipped[provider] = "dense SVD of every layer's O × I ΔW takes tens of seconds a round on the CPU"
        elif provider == "dense_svd":
            A_cat, B_cat = torch.cat(As + bias_A, -2), torch.cat(Bs + bias_B, -2)
            steps[provider] = lambda A=A_cat, B=B_cat: dense_svd(A, B, RANK)
        else:
            steps[provider] = lambda p=provider: compose_adapters(As, Bs, backend=p, **kwargs)
    want = steps["torch"]()
    errors = {}
    for provider, step in steps.items():
        A, B = step()
        if max_rank is None:
            errors[provider] = float(max((A - want[0]).abs().max(), (B - want[1]).abs().max()))
        else:  # the factors are unique only up to gauge: compare ΔW of one layer
            got, ref = B[0].double().mT @ A[0].double(), want[1][0].double().mT @ want[0][0].double()
            errors[provider] = float((got - ref).norm() / ref.norm())
    R = RANK * (segments + 1)
    nbytes = 2 * L * R * (I + H) * torch.finfo(dtype).bits // 8

    def derive(provider, times):
        return dict(rel_error_vs_torch=errors[provider], time_vs_torch=min(times[provider]) / min(times["torch"]))

    row = dict(op=f"compose_adapters({workload})", model=model, L=L, I=I, O=H, segments=segments, rank_in=R,
               max_rank=max_rank, dtype=str(dtype).removeprefix("torch."), bytes=nbytes)
    harness.interleaved(benchmark, bench_record, steps, rounds=ROUNDS, derive=derive, **row)
    for provider, reason in skipped.items():
        bench_record(None, **row, provider=provider, error=reason)


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["rank_space", "triton", "dense_svd"])
def test_recompress(benchmark, bench_record, provider, shape, segments):
    """One layer: rank-space re-compression (torch, triton) against the dense truncated SVD."""
    I, O = SHAPES[shape]
    row = dict(op="compose_adapters(max_rank=32)", provider=provider, shape=shape, I=I, O=O, segments=segments,
               rank_in=32 * segments)
    if provider == "triton" and not ON_GPU:
        bench_record(None, **row, error=TRITON_SKIP)
        pytest.skip(TRITON_SKIP)
    gen = torch.Generator().manual_seed(0)
    As = [torch.randn(32, I, generator=gen).to(device()) for _ in range(segments)]
    Bs = [torch.randn(32, O, generator=gen).to(device()) for _ in range(segments)]
    if provider == "dense_svd":
        A, B = torch.cat(As), torch.cat(Bs)
        fn = timed(lambda: dense_svd(A, B, 32))
    else:
        backend = "torch" if provider == "rank_space" else "triton"
        fn = timed(lambda: compose_adapters(As, Bs, max_rank=32, backend=backend))
    measure(benchmark, bench_record, fn, rounds=3, **row)
