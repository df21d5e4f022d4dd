"""Adapter composition: rank-space re-compression vs the dense truncated SVD it replaces.

Providers: ``rank_space`` (`v2l_fast.ops.compose_adapters(max_rank=k)`: QR of the factors, SVD
of the small core) and ``dense_svd`` (form ΔW = Bᵀ·A as an O × I matrix, full SVD, truncate).
Workload: k segment adapters of rank 32 (16 + bias block) on one down_proj layer of the 500M and
2.2B shapes, re-compressed to rank 32.
"""

from __future__ import annotations

import pytest
import torch

from v2l_fast.ops import compose_adapters

from harness import device, measure, timed

SHAPES = {"500M": (2560, 960), "2.2B": (8192, 2048)}
SEGMENTS = [4, 16] if torch.cuda.is_available() else [4]


def dense_svd(A, B, k):
    dense = B.mT @ A
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return Vh[..., :k, :] * S[..., :k, None], U[..., :k].mT


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["rank_space", "dense_svd"])
def test_recompress(benchmark, bench_record, provider, shape, segments):
    I, O = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    As = [torch.randn(32, I, generator=gen).to(device()) for _ in range(segments)]
    Bs = [torch.randn(32, O, generator=gen).to(device()) for _ in range(segments)]
    if provider == "rank_space":
        fn = timed(lambda: compose_adapters(As, Bs, max_rank=32))
    else:
        A, B = torch.cat(As), torch.cat(Bs)
        fn = timed(lambda: dense_svd(A, B, 32))
    measure(benchmark, bench_record, fn, rounds=3, op="compose_adapters(max_rank=32)", provider=provider,
            shape=shape, I=I, O=O, segments=segments, rank_in=32 * segments)
