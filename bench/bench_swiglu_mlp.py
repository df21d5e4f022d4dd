"""Benchmark of the Perceiver's modality projection, the SwiGLU H → 4H → D=512 over all L·S rows
of one video (`pytest bench/bench_swiglu_mlp.py --benchmark`); it is 80–96 % of the hypernetwork's
forward FLOPs (bench/NOTES.md).

Providers, interleaved round by round (`harness.interleaved`): ``reference``
(three linears, the official module's order), ``torch`` (the torch backend: gate and up as one
GEMM, cache-sized row blocks, in-place activation) and ``triton`` (gate+up kernel with the
activation in its epilogue, then a cuBLAS down GEMM; GPU only, the interpreter's timings mean
nothing). Forward without autograd, as at internalisation. Without CUDA only the 500M model at
12 frames runs (fp32). Rows carry the FLOPs and the rate reached.
"""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch

from v2l_fast.kernels.swiglu_mlp_torch import swiglu_mlp as torch_swiglu
from v2l_fast.reference import swiglu_mlp as reference_swiglu

import harness
from workloads import FRAMES, MODELS, D, context_length, projection_flops

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _provider(name: str):
    if name == "reference":
        return reference_swiglu
    if name == "torch":
        return torch_swiglu
    from v2l_fast.kernels.swiglu_mlp import swiglu_mlp

    return swiglu_mlp


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("model", list(MODELS))
def test_projection(benchmark, bench_record, model, frames):
    if not ON_GPU and (model, frames) != ("500M", 12):
        pytest.skip("without a GPU only the 500M projection at 12 frames runs (CPU time)")
    L, H = MODELS[model]["L"], MODELS[model]["H"]
    rows = L * context_length(model, frames)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, H, generator=gen).to(DEVICE, DTYPE)
    gate, up = ((torch.randn(4 * H, H, generator=gen) / math.sqrt(H)).to(DEVICE, DTYPE) for _ in range(2))
    down = (torch.randn(D, 4 * H, generator=gen) / math.sqrt(4 * H)).to(DEVICE, DTYPE)
    flops = projection_flops(rows, H)

    def step_of(provider):
        return torch.no_grad()(functools.partial(_provider(provider), x, gate, up, down))

    providers = ["reference", "torch"] + (["triton"] if ON_GPU else [])
    harness.interleaved(benchmark, bench_record, {p: step_of(p) for p in providers}, rounds=10 if ON_GPU else 5,
                        derive=lambda p, times: {"tflop_s": flops / statistics.median(times[p]) / 1e12},
                        op="projection", model=model, frames=frames, rows=rows, H=H, mode="fwd", dtype=str(DTYPE),
                        flops=flops)
