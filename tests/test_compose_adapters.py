"""The Triton backend of `compose_adapters` (kernels/compose_adapters.py) against the fp64 reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (fp64, fp32, fp16; bf16 only on a GPU).
The concatenation is exact; a re-compressed adapter is unique only up to the gauge of its
factors, so re-compression is compared through ΔW = Bᵀ·A and its singular values.
"""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.reference import compose_adapters as reference
from v2l_fast.testing import REL_TOLERANCE, assert_rel_close

DTYPES = [torch.float64, torch.float32, torch.float16]
IDS = ["fp64", "fp32", "fp16"]


pytestmark = pytest.mark.triton  # every test runs the Triton kernel (interpreter on the CPU)


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating ``torch.empty`` during the call is NaN-filled, so unwritten output shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def segments(ranks, I, O, lead=(), dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    """Random segment factors ``[*lead, r, I]`` / ``[*lead, r, O]``, one per rank in ``ranks``."""
    gen = torch.Generator().manual_seed(seed)
    As = [(torch.randn(*lead, r, I, generator=gen) * scale).to(device=device, dtype=dtype) for r in ranks]
    Bs = [(torch.randn(*lead, r, O, generator=gen) * scale).to(device=device, dtype=dtype) for r in ranks]
    return As, Bs


def delta(A, B):
    return B.double().mT @ A.double()


def fp64(ts):
    return [t.detach().double() for t in ts]


def call(As, Bs, backend, **kwargs):
    return ops.compose_adapters(As, Bs, backend=backend, **kwargs)


def assert_recompression_matches(A_k, B_k, As, Bs, dtype, **kwargs):
    """ΔW_k and its singular values against the fp64 reference's, within the dtype's bound."""
    bias = kwargs.pop("bias", None)
    ref_bias = None if bias is None else tuple(fp64(bias))
    A_r, B_r = reference(fp64(As), fp64(Bs), bias=ref_bias, **kwargs)
    assert A_k.shape == A_r.shape and B_k.shape == B_r.shape
    assert A_k.dtype == dtype and B_k.dtype == dtype
    got, want = delta(A_k, B_k), delta(A_r, B_r)
    assert_rel_close(got, want, tol=REL_TOLERANCE[dtype])
    k = A_k.shape[-2]
    if k:
        s_got = torch.linalg.svdvals(got)[..., :k]
        s_want = torch.linalg.svdvals(want)[..., :k]
        assert_rel_close(s_got, s_want, tol=REL_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weights", [None, [0.5, -2.0, 1.25]])
def test_concatenation_is_exact(dtype, with_bias, weights, device, poisoned):
    As, Bs = segments([4, 1, 7], 37, 23, lead=(2, 3), dtype=dtype, device=device, seed=1)
    bias = None
    if with_bias:
        bA, bB = segments([3], 37, 23, lead=(2, 3), dtype=dtype, device=device, seed=2)
        bias = (bA[0], bB[0])
    A, B = call(As, Bs, "triton", weights=weights, bias=bias)
    A_r, B_r = reference(As, Bs, weights=weights, bias=bias)
    assert not A.isnan().any() and not B.isnan().any()
    assert A.dtype == dtype and A.shape == A_r.shape and B.shape == B_r.shape
    torch.testing.assert_close(A, A_r, rtol=0, atol=0)
    torch.testing.assert_close(B, B_r, rtol=0, atol=0)


def test_noncontiguous_views_and_a_segment_of_rank_zero(device, poisoned):
    gen = torch.Generator().manual_seed(3)
    # A with K not contiguous (a transposed view), a column slice, a rank-0 segment; B with a
    # transposed lead.
    a0 = torch.randn(2, 33, 5, generator=gen).to(device).transpose(-1, -2)  # [2, 5, 33], stride_k 5
    a1 = torch.randn(2, 3, 50, generator=gen).to(device)[..., 7:40]
    a2 = torch.randn(2, 0, 33).to(device)
    b0 = torch.randn(2, 5, 21, generator=gen).to(device)
    b1 = torch.randn(3, 2, 21, generator=gen).to(device).transpose(0, 1)
    b2 = torch.randn(2, 0, 21).to(device)
    assert not a0.is_contiguous() and a0.stride(-1) != 1
    As, Bs = [a0, a1, a2], [b0, b1, b2]
    A, B = call(As, Bs, "triton", weights=[2.0, -1.0, 3.0])
    A_r, B_r = reference(As, Bs, weights=[2.0, -1.0, 3.0])
    torch.testing.assert_close(A, A_r, rtol=0, atol=0)
    torch.testing.assert_close(B, B_r, rtol=0, atol=0)
    A_k, B_k = call(As, Bs, "triton", weights=[2.0, -1.0, 3.0], max_rank=4)
    assert_recompression_matches(A_k, B_k, As, Bs, torch.float32, weights=[2.0, -1.0, 3.0], max_rank=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("k", [1, 5, 8, 64])
def test_recompression_matches_the_reference(dtype, k, device, poisoned):
    As, Bs = segments([5, 2, 4], 50, 31, lead=(3,), dtype=dtype, device=device, seed=k)
    bA, bB = segments([3], 50, 31, lead=(3,), dtype=dtype, device=device, seed=100 + k)
    kwargs = dict(weights=[1.0, 0.3, -0.7], bias=(bA[0], bB[0]), max_rank=k)
    A_k, B_k = call(As, Bs, "triton", **kwargs)
    assert not A_k.isnan().any() and not B_k.isnan().any()
    assert_recompression_matches(A_k, B_k, As, Bs, dtype, **kwargs)


def test_recompression_above_the_total_rank_is_exact(device):
    As, Bs = segments([3, 2], 20, 10, dtype=torch.float64, device=device)
    A, B = call(As, Bs, "triton", max_rank=64)
    assert A.shape[-2] == 5
    torch.testing.assert_close(delta(A, B), delta(As[0], Bs[0]) + delta(As[1], Bs[1]), rtol=1e-12, atol=1e-12)


def test_named_256m_four_segments_to_rank_16(device, poisoned):
    """SmolVLM2-256M shapes: L = 30, I = 1536, H = 576, r = 16; 4 segments + the bias → 16."""
    L, I, H, r = 30, 1536, 576, 16
    As, Bs = segments([r] * 4, I, H, lead=(L,), device=device, seed=7, scale=0.05)
    bA, bB = segments([r], I, H, lead=(L,), device=device, seed=8, scale=0.02)
    kwargs = dict(bias=(bA[0], bB[0]), max_rank=r)
    A, B = call(As, Bs, "triton", bias=kwargs["bias"])
    assert A.shape == (L, 5 * r, I) and B.shape == (L, 5 * r, H)
    torch.testing.assert_close(A, reference(As, Bs, bias=kwargs["bias"])[0], rtol=0, atol=0)
    A_k, B_k = call(As, Bs, "triton", **kwargs)
    assert A_k.shape == (L, r, I) and B_k.shape == (L, r, H)
    assert_recompression_matches(A_k, B_k, As, Bs, torch.float32, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_named_ragged_composition_with_zero_rows(dtype, device, poisoned):
    """Three videos of 4, 2 and 1 segments in one call, as `combine_lora` lays them out: the
    slots of the shorter groups hold zero blocks (and the bias moves up), so most Grams are
    singular; the zero rows must come out as nothing, not NaN."""
    from v2l_fast.hypernet.compose import combine_lora

    L, I, H, r, sizes = 2, 96, 40, 4, [4, 2, 1]
    A, B = segments([r] * sum(sizes), I, H, lead=(L,), dtype=dtype, device=device, seed=11)
    bA, bB = segments([r], I, H, lead=(L,), dtype=dtype, device=device, seed=12)
    stacked_A, stacked_B = torch.stack(A), torch.stack(B)
    with ops.use_backend("triton"):
        A_c, B_c = combine_lora(stacked_A, stacked_B, sizes, bias=(bA[0], bB[0]))
    A_r, B_r = combine_lora(stacked_A, stacked_B, sizes, bias=(bA[0], bB[0]))  # auto: torch on CPU
    torch.testing.assert_close(A_c, A_r, rtol=0, atol=0)
    torch.testing.assert_close(B_c, B_r, rtol=0, atol=0)
    assert bool((A_c[1, :, 3 * r:] == 0).all()) and bool((A_c[2, :, 2 * r:] == 0).all())
    for k in (r, 3 * r, 5 * r):
        A_k, B_k = call([A_c], [B_c], "triton", max_rank=k)
        assert not A_k.isnan().any() and not B_k.isnan().any()
        assert_recompression_matches(A_k, B_k, [A_c], [B_c], dtype, max_rank=k)


def test_rank_deficient_inputs(device):
    """A repeated segment, R > min(I, O) and an all-zero adapter: exact ΔW, zeros, never NaN."""
    As, Bs = segments([6], 12, 9, lead=(2,), device=device, seed=5)
    A_k, B_k = call([As[0], As[0], As[0]], [Bs[0], Bs[0], Bs[0]], "triton", weights=[1.0, 0.5, -0.25], max_rank=9)
    assert A_k.shape == (2, 9, 12)  # min(k, R = 18, I = 12, O = 9)
    torch.testing.assert_close(delta(A_k, B_k), 1.25 * delta(As[0], Bs[0]), rtol=1e-4, atol=1e-4)
    zero_A, zero_B = torch.zeros(2, 4, 12, device=device), torch.zeros(2, 4, 9, device=device)
    A_z, B_z = call([zero_A, As[0]], [zero_B, Bs[0]], "triton", weights=[1.0, 0.0], max_rank=3)
    assert A_z.shape == (2, 3, 12) and not A_z.isnan().any() and not B_z.isnan().any()
    assert float(delta(A_z, B_z).abs().max()) == 0.0


def test_more_rows_than_one_program_holds(device, poisoned):
    """144 rows (> MAX_GRAM_ROWS): row-blocked writes, the Gram from one GEMM over them."""
    from v2l_fast.kernels.compose_adapters import MAX_GRAM_ROWS, tiles

    assert not tiles(144)[3] and MAX_GRAM_ROWS < 144
    As, Bs = segments([16] * 9, 200, 70, lead=(2,), device=device, seed=9)
    A, B = call(As, Bs, "triton")
    torch.testing.assert_close(A, reference(As, Bs)[0], rtol=0, atol=0)
    A_k, B_k = call(As, Bs, "triton", max_rank=12)
    assert_recompression_matches(A_k, B_k, As, Bs, torch.float32, max_rank=12)


def test_empty_leading_dims_and_rank_zero(device):
    As, Bs = segments([2, 3], 8, 5, lead=(0, 4), device=device)
    A, B = call(As, Bs, "triton", max_rank=2)
    assert A.shape == (0, 4, 2, 8) and B.shape == (0, 4, 2, 5)
    As, Bs = segments([0, 0], 8, 5, lead=(2,), device=device)
    for max_rank in (None, 3):
        A, B = call(As, Bs, "triton", max_rank=max_rank)
        assert A.shape == (2, 0, 8) and B.shape == (2, 0, 5)


def test_gradients_match_the_reference(device):
    """Concatenation (factors and tensor weights) and the re-compressed ΔW, fp64, vs the reference's."""
    As, Bs = segments([3, 2], 11, 7, lead=(2,), dtype=torch.float64, device=device, seed=13)
    bA, bB = segments([2], 11, 7, lead=(2,), dtype=torch.float64, device=device, seed=14)
    gen = torch.Generator().manual_seed(15)
    weights = torch.tensor([0.5, -1.5], dtype=torch.float64, device=device)

    def run(backend, leaves, w, max_rank):
        a0, a1, b0, b1, ab, bb = leaves
        A, B = ops.compose_adapters([a0, a1], [b0, b1], weights=w, bias=(ab, bb), max_rank=max_rank,
                                    backend=backend)
        return B.mT @ A if max_rank else torch.cat([A, B], -1)

    for max_rank in (None, 3):
        out_grad = None
        grads = {}
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (*As, *Bs, bA[0], bB[0])]
            w = weights.clone().requires_grad_()
            out = run(backend, leaves, w, max_rank)
            if out_grad is None:
                out_grad = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(device)
            grads[backend] = torch.autograd.grad(out, [*leaves, w], out_grad)
        for got, want in zip(grads["triton"], grads["torch"]):
            assert_rel_close(got, want, tol=1e-8)


@pytest.mark.gpu
def test_bf16_on_gpu(device):
    """bf16: GPU only (the interpreter multiplies bf16 tl.dot operands as raw bits)."""
    As, Bs = segments([16] * 4, 1536, 576, lead=(30,), dtype=torch.bfloat16, device=device, seed=21, scale=0.05)
    A, B = call(As, Bs, "triton")
    torch.testing.assert_close(A, reference(As, Bs)[0], rtol=0, atol=0)
    A_k, B_k = call(As, Bs, "triton", max_rank=16)
    assert_recompression_matches(A_k, B_k, As, Bs, torch.bfloat16, max_rank=16)


def test_auto_never_chooses_the_interpreter():
    assert ops.compose_adapters.op.choose("auto", torch.device("cpu")) == "torch"
    assert "triton" in ops.compose_adapters.op.backends


@pytest.mark.parametrize("kwargs,message", [
    (dict(As=[], Bs=[]), r"^As: expected a non-empty sequence"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(2, 4)]), r"^Bs\[0\]: expected rank 3 in dim -2"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], weights=[1.0, 2.0]), r"^weights: expected 1 scalars"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], weights=["x"]), r"^weights: expected 1 real scalars"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], weights=torch.tensor(1.0)),
     r"^weights: expected a 1-D real tensor"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], max_rank=True), r"^max_rank: expected a positive int"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], max_rank=0), r"^max_rank: expected a positive int"),
])
def test_bad_input_is_refused_before_the_kernel(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.compose_adapters(**kwargs, backend="triton")


_COMPILE_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
import test_kernels_compile as tkc
from v2l_fast.kernels import compose_adapters as K

problem = tkc._toolchain_problem([90])
if problem:
    print(json.dumps({{"skip": problem}}))
    sys.exit(0)
L, I, H, r = 30, 1536, 576, 16
rows, seen = [], set()
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for max_rank in (None, r):
        As = [torch.randn(L, r, I).to(dtype) for _ in range(4)]
        Bs = [torch.randn(L, r, H).to(dtype) for _ in range(4)]
        with tkc._recorded_launches([K._compose_pass_kernel], [K.ComposePass], tkc.SM_COUNT[90]) as launches:
            try:
                K.compose_adapters(As, Bs, None, None, max_rank)
            except Exception:
                pass  # the launches are recorded, not run: what follows them may fail on empty outputs
        for kernel, args, kwargs in launches:
            row = tkc._compile(kernel, args, kwargs, 90, seen)
            if row is not None:
                rows.append(row)
print(json.dumps({{"rows": rows}}, default=str))
"""


def test_kernel_compiles_for_sm90():
    """The kernel's launches at the 256M shapes (fp32, fp16, bf16; with and without the Gram)
    compile to sm_90 cubins with triton's NVIDIA backend, without a GPU (tests/test_kernels_compile.py's
    recorder and compiler, in a subprocess without the interpreter)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        proc = subprocess.run([sys.executable, "-c", _COMPILE_WORKER.format(tests=tests)], env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    rows = report["rows"]
    assert len(rows) == 6, rows  # 3 dtypes × (concatenation only, with the Gram)
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["ptx_has_entry"] and row["cubin_bytes"] > 0
        assert row["spill_stores"] in (0, None), row
