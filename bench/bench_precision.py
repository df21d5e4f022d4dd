"""GEMM rate in fp32 and bf16 at the training step's shapes (`pytest bench/bench_precision.py --benchmark`).

What `v2l_fast.precision` rests on: training autocasts to bf16 only where the device multiplies
bf16 in hardware, faster than fp32 (CUDA; a CPU with AMX). Each shape of the features-given
training step (`bench_train`: 8 videos × 4 questions × 88 tokens on the 256M's decoder, the LM head
on the 2048 answer tokens, the Perceiver's linears) is timed as ``a @ b`` in both dtypes,
interleaved round by round; rows hold GFLOP/s by min and the bf16/fp32 ratio, and say which bf16
hardware `bf16_matmul_hardware` found (None: bf16 emulated here, the rows show what that costs).
"""

from __future__ import annotations

import functools

import pytest
import torch

from v2l_fast.precision import bf16_matmul_hardware

import harness

DEVICE = harness.device()
SHAPES = {  # name: (M, K, N)
    "decoder_gate_up": (2816, 576, 1536),
    "decoder_down_proj": (2816, 1536, 576),
    "lm_head_answer_tokens": (2048, 576, 49280),
    "perceiver_linear": (4096, 512, 512),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemm_rate(benchmark, bench_record, shape):
    M, K, N = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=gen).to(DEVICE), torch.randn(K, N, generator=gen).to(DEVICE)
    operands = {name: (a.to(dtype), b.to(dtype)) for name, dtype in DTYPES.items()}
    steps = {name: functools.partial(torch.matmul, *operands[name]) for name in DTYPES}
    flops = 2 * M * K * N

    def derive(provider, times):
        return dict(gflop_s=flops / min(times[provider]) / 1e9,
                    bf16_speedup=min(times["fp32"]) / min(times["bf16"]))

    harness.interleaved(benchmark, bench_record, steps, rounds=5, derive=derive, op="gemm", shape=shape,
                        M=M, K=K, N=N, bf16_hardware=bf16_matmul_hardware(DEVICE))
