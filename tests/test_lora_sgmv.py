"""`lora_sgmv` backends (triton, cpp, cuda) against the reference: forward, gradients, metadata, bad input.

Triton runs under the interpreter on CPU (fp32, fp16); bf16 and the cuda backend only on a GPU.
Kernel outputs and workspaces are poisoned with NaN (``torch.empty`` patched) so that any
element a kernel forgets to write, or reads without writing, fails the comparison.
"""

from __future__ import annotations

import functools
import math
import zlib

import pytest
import torch

from v2l_fast import ops
from v2l_fast.ops.registry import resolve, runtime_missing
from v2l_fast.reference import lora_sgmv as reference
from v2l_fast.testing import REL_TOLERANCE, assert_rel_close, rel_error

CPP_MISSING = runtime_missing("cpp", torch.device("cpu"))


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating tensor from torch.empty starts as NaN while the test runs."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_case(T, I, O, R, n, S, *, L=None, dtype=torch.float32, w_dtype=torch.float32, mixed_ranks=False,
              strided=False, seed=0, device="cpu"):
    """Random inputs; segments with empty ones and -1 ids; x/base as non-contiguous views if strided."""
    gen = torch.Generator().manual_seed(seed)
    pool = (n,) if L is None else (n, L)
    x = (torch.randn(I, T, generator=gen).t() if strided else torch.randn(T, I, generator=gen)).to(dtype)
    A = (torch.randn(*pool, R, I, generator=gen) / I**0.5).to(w_dtype)
    B = (torch.randn(*pool, R, O, generator=gen) / max(R, 1) ** 0.5).to(w_dtype)
    base = torch.randn(T, 2 * O, generator=gen)[:, ::2] if strided else torch.randn(T, O, generator=gen)
    if S == T:  # decode: one token per segment
        indptr = torch.arange(T + 1)
    else:
        cuts = torch.sort(torch.randint(0, T + 1, (S - 1,), generator=gen)).values
        indptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])])
    adapters = torch.randint(-1, n, (S,), generator=gen)
    ranks = torch.randint(0, R + 1, (n,), generator=gen) if mixed_ranks else None
    args = dict(x=x, A=A, B=B, seg_indptr=indptr, seg_adapter=adapters, ranks=ranks,
                layer=None if L is None else L - 1, scaling=0.75, base=base.to(dtype))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def reference_fp64(args):
    """The reference on the same (rounded) inputs, computed in fp64."""
    double = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    return reference(**double)


CASES = {
    # T, I, O, R, n, S, extra
    "500M_down_proj_mixed_ranks": (6, 2560, 960, 16, 3, 4, dict(L=2, mixed_ranks=True)),
    "2.2B_down_proj_rank16+bias": (4, 8192, 2048, 32, 2, 3, dict(L=2)),
    "odd_rank48_mixed": (37, 100, 77, 48, 5, 9, dict(mixed_ranks=True, strided=True)),
    "rank1": (13, 33, 17, 1, 2, 4, {}),
    "rank8_prefill": (150, 64, 48, 8, 2, 2, dict(strided=True)),
    "decode_one_token_per_segment": (24, 300, 200, 16, 7, 24, dict(mixed_ranks=True)),
    "one_token": (1, 64, 40, 8, 1, 1, {}),
}


def run_case(name, backend, dtype, device="cpu", w_dtype=torch.float32):
    T, I, O, R, n, S, extra = CASES[name]
    args = make_case(T, I, O, R, n, S, dtype=dtype, w_dtype=w_dtype, seed=zlib.crc32(name.encode()), device=device,
                     **extra)
    out = ops.lora_sgmv(**args, backend=backend)
    assert out.dtype == dtype and out.shape == (T, O)
    assert_rel_close(out.float().cpu(), reference_fp64(args).float().cpu(), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, dtype, poisoned):
    run_case(name, "triton", dtype)


@pytest.mark.skipif(CPP_MISSING is not None, reason=f"cpp backend: {CPP_MISSING}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_cpp_matches_reference(name, dtype):
    run_case(name, "cpp", dtype)


@pytest.mark.skipif(CPP_MISSING is not None, reason=f"cpp backend: {CPP_MISSING}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["prompts_of_one_video_side_by_side", "one_video_on_both_sides_of_another"])
def test_cpp_gemm_groups_as_one_run_or_gathered(layout, dtype):
    """Groups of ≥ 8 tokens take GEMMs: on views when the group's tokens are one run (two adjacent
    segments of adapter 0), on gathered rows when they are not (adapter 0's segments around adapter
    1's: a view from its first to its last token would take adapter 1's rows too)."""
    seg_adapter = torch.tensor([0, 0, 1] if layout == "prompts_of_one_video_side_by_side" else [0, 1, 0])
    gen = torch.Generator().manual_seed(11)
    args = dict(x=torch.randn(48, 96, generator=gen).to(dtype), A=(torch.randn(2, 8, 96, generator=gen) / 10).to(dtype),
                B=torch.randn(2, 8, 40, generator=gen).to(dtype), seg_indptr=torch.tensor([0, 16, 32, 48]),
                seg_adapter=seg_adapter, ranks=None, scaling=0.75, base=torch.randn(48, 40, generator=gen).to(dtype))
    assert_rel_close(ops.lora_sgmv(**args, backend="cpp").float(), reference_fp64(args).float(), dtype)


@pytest.mark.triton
def test_triton_fp16_weights_use_the_native_dot(poisoned):
    T, I, O, R, n, S, extra = CASES["odd_rank48_mixed"]
    args = make_case(T, I, O, R, n, S, dtype=torch.float16, w_dtype=torch.float16, **extra)
    out = ops.lora_sgmv(**args, backend="triton")
    assert_rel_close(out.float(), reference_fp64(args).float(), torch.float16)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=pytest.mark.skipif(
    CPP_MISSING is not None, reason=f"cpp backend: {CPP_MISSING}"))])
def test_no_adapter_and_empty_segments_return_base(backend, poisoned):
    gen = torch.Generator().manual_seed(5)
    x, A = torch.randn(7, 40, generator=gen), torch.randn(2, 16, 40, generator=gen)
    B = torch.randn(2, 16, 24, generator=gen)
    base = torch.randn(7, 24, generator=gen)
    out = ops.lora_sgmv(x, A, B, torch.tensor([0, 0, 7, 7]), torch.tensor([0, -1, 1]), base=base,
                             backend=backend)
    assert torch.equal(out, base)
    delta = ops.lora_sgmv(x, A, B, torch.tensor([0, 7]), torch.tensor([-1]), backend=backend)
    assert torch.equal(delta, torch.zeros(7, 24))
    zero_rank = ops.lora_sgmv(x, A, B, torch.tensor([0, 7]), torch.tensor([1]), ranks=torch.tensor([16, 0]),
                                   base=base, backend=backend)
    assert torch.equal(zero_rank, base)
    empty = ops.lora_sgmv(x[:0], A, B, torch.tensor([0]), torch.tensor([], dtype=torch.long), backend=backend)
    assert empty.shape == (0, 24)


@pytest.mark.triton
def test_triton_base_is_not_modified_and_dtype_follows_base(poisoned):
    args = make_case(9, 48, 32, 16, 2, 3)
    args["x"] = args["x"].bfloat16()  # the LoRA patch: bf16 activations, fp32 adapters (spec §9)
    args["base"] = args["base"].half()
    before = args["base"].clone()
    out = ops.lora_sgmv(**args, backend="triton")
    assert torch.equal(args["base"], before) and out.dtype == torch.float16
    assert_rel_close(out.float(), reference_fp64(args).float(), torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("split_k", [1, 3])
def test_shrink_split_k_partials_sum_to_x_at(split_k, poisoned):
    from v2l_fast.kernels.lora_sgmv import sgmv_shrink
    from v2l_fast.kernels.lora_sgmv_metadata import lora_sgmv_metadata

    gen = torch.Generator().manual_seed(split_k)
    T, I, R, n = 10, 1000, 16, 3
    x, A = torch.randn(T, I, generator=gen), torch.randn(n, R, I, generator=gen)
    indptr, adapters, ranks = torch.tensor([0, 4, 4, 10]), torch.tensor([2, 0, 1]), torch.tensor([16, 5, 9])
    meta = lora_sgmv_metadata(indptr, adapters, T, n)
    s = sgmv_shrink(x, A, meta, ranks, split_k=split_k)
    assert s.shape == (split_k, T, R)
    total = s.sum(0)
    for t, a in [(0, 2), (3, 2), (4, 1), (9, 1)]:
        r = int(ranks[a])
        assert_rel_close(total[t, :r], x[t].double() @ A[a, :r].double().T, torch.float32)


def test_metadata_groups_every_token_once():
    from v2l_fast.kernels.lora_sgmv_metadata import lora_sgmv_metadata

    gen = torch.Generator().manual_seed(7)
    T, n, S = 200, 6, 30
    cuts = torch.sort(torch.randint(0, T + 1, (S - 1,), generator=gen)).values
    indptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])])
    adapters = torch.randint(-1, n, (S,), generator=gen)
    meta = lora_sgmv_metadata(indptr, adapters, T, n, block_m=16)
    token_adapter = torch.repeat_interleave(adapters, indptr[1:] - indptr[:-1])
    assert torch.equal(torch.sort(meta.sorted_tokens.long()).values, torch.arange(T))
    covered = torch.zeros(T, dtype=torch.long)
    for g, lo, hi in zip(meta.work_group.tolist(), meta.work_start.tolist(), meta.work_end.tolist()):
        if g < 0:
            continue
        assert 0 < hi - lo <= 16
        tokens = meta.sorted_tokens[lo:hi].long()
        covered[tokens] += 1
        expected = torch.where(token_adapter[tokens] < 0, n, token_adapter[tokens])
        assert torch.all(expected == g)
    assert torch.all(covered == 1)


@pytest.mark.triton
def test_explicit_metadata_is_reused_across_layers(poisoned):
    args = make_case(20, 64, 48, 16, 3, 5, L=3)
    meta = ops.lora_sgmv_metadata(args["seg_indptr"], args["seg_adapter"], 20, 3)
    for layer in range(3):
        args["layer"] = layer
        out = ops.lora_sgmv(**args, metadata=meta, check=False, backend="triton")
        assert_rel_close(out, reference_fp64(args).float(), torch.float32)


@pytest.mark.triton
def test_without_metadata_each_call_groups_its_own_segments(poisoned):
    args = make_case(20, 64, 48, 16, 3, 5)
    ops.lora_sgmv(**args, backend="triton")
    args["seg_adapter"].copy_(torch.tensor([2, 1, 0, -1, 2]))  # same tensor, new values
    out = ops.lora_sgmv(**args, backend="triton")
    assert_rel_close(out, reference_fp64(args).float(), torch.float32)


def test_metadata_built_for_another_batch_is_rejected():
    args = make_case(20, 64, 48, 16, 3, 5)
    meta = ops.lora_sgmv_metadata(args["seg_indptr"], args["seg_adapter"], 20, 4)
    with pytest.raises(ValueError, match="^metadata: expected"):
        ops.lora_sgmv(**args, metadata=meta, backend="triton")
    with pytest.raises(ValueError, match="^metadata: expected"):
        ops.lora_sgmv(**args, metadata="not metadata", backend="triton")


GRAD_CASES = {
    "mixed_ranks_layer_pool": (23, 40, 24, 16, 3, 6, dict(L=2, mixed_ranks=True, strided=True)),
    "500M_down_proj": (5, 2560, 960, 16, 2, 3, {}),  # large I: split-K in the backward's shrink
    "decode": (9, 48, 32, 8, 4, 9, dict(mixed_ranks=True)),
}


@pytest.mark.triton
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_triton_gradients_match_reference_autograd(name, poisoned):
    T, I, O, R, n, S, extra = GRAD_CASES[name]
    args = make_case(T, I, O, R, n, S, seed=11, **extra)
    leaves = {k: args[k].detach().clone().requires_grad_() for k in ("x", "A", "B", "base")}
    dy = torch.randn(T, O, generator=torch.Generator().manual_seed(12))
    grads = {}
    for backend in ("triton", "torch"):
        inputs = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
        out = ops.lora_sgmv(**(args | inputs), backend=backend)
        out.backward(dy)
        grads[backend] = {k: v.grad for k, v in inputs.items()}
    for k in ("x", "A", "B", "base"):
        got, want = grads["triton"][k], grads["torch"][k]
        assert got.shape == want.shape and got.dtype == want.dtype, k
        assert rel_error(got, want) <= REL_TOLERANCE[torch.float32], (k, rel_error(got, want))


@pytest.mark.triton
def test_triton_gradient_of_one_input_only(poisoned):
    args = make_case(12, 40, 24, 8, 2, 3, L=2)
    A = args["A"].clone().requires_grad_()
    ops.lora_sgmv(**(args | dict(A=A)), backend="triton").sum().backward()
    A_ref = args["A"].clone().requires_grad_()
    reference(**(args | dict(A=A_ref))).sum().backward()
    assert_rel_close(A.grad, A_ref.grad, torch.float32)
    assert torch.count_nonzero(A.grad[:, 0]) == 0  # only the selected layer gets a gradient


def training_case(videos, questions, tokens, I, O, R, n, *, adapters=None, mixed_ranks=False, L=None, seed=0):
    """A batch laid out as the trainer does: each video's questions in consecutive rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = videos * questions
    adapters = torch.arange(videos) % n if adapters is None else torch.tensor(adapters)
    pool = (n,) if L is None else (n, L)
    return dict(x=torch.randn(rows * tokens, I, generator=gen), A=torch.randn(*pool, R, I, generator=gen) / I**0.5,
                B=torch.randn(*pool, R, O, generator=gen) / R**0.5, seg_indptr=torch.arange(rows + 1) * tokens,
                seg_adapter=adapters.repeat_interleave(questions),
                ranks=torch.randint(1, R + 1, (n,), generator=gen) if mixed_ranks else None,
                layer=None if L is None else L - 1, scaling=0.5, base=torch.randn(rows * tokens, O, generator=gen))


RUN_CASES = {
    # videos, questions, tokens, I, O, R, n, extra
    "256M_8_videos_x_4_questions": (8, 4, 16, 1536, 576, 16, 8, {}),
    "mixed_ranks_layer_pool": (3, 2, 5, 40, 24, 16, 3, dict(mixed_ranks=True, L=2)),
    "an_adapter_in_two_runs": (3, 2, 4, 32, 20, 8, 2, dict(adapters=[0, 1, 0])),
    "one_video": (1, 5, 7, 24, 16, 4, 1, {}),
}


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_torch_runs_match_the_fp64_reference_with_gradients(name):
    from v2l_fast.kernels.lora_sgmv_torch import uniform_runs

    videos, questions, tokens, I, O, R, n, extra = RUN_CASES[name]
    args = training_case(videos, questions, tokens, I, O, R, n, **extra)
    assert uniform_runs(args["seg_indptr"], args["seg_adapter"], args["x"].shape[0]) is not None
    leaves = {k: args[k].clone().requires_grad_() for k in ("x", "A", "B", "base")}
    out = ops.lora_sgmv(**(args | leaves), backend="torch")
    assert_rel_close(out, reference_fp64(args).float(), torch.float32)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(dy)
    double = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    reference(**(args | double)).backward(dy.double())
    for k in leaves:
        assert_rel_close(leaves[k].grad, double[k].grad.float(), torch.float32)


@pytest.mark.parametrize("indptr,adapters,expected", [
    ([0, 4, 8, 12], [2, 2, 0], None),            # runs of 8 and 4 tokens: ragged
    ([0, 4, 8, 12], [2, -1, 0], None),           # tokens without an adapter
    ([0, 4, 4, 8], [1, 2, 0], [1, 0]),           # an empty segment (of adapter 2) is no run
    ([0, 3, 6, 9, 12], [1, 1, 0, 0], [1, 0]),    # two rows per run
    ([0, 0], [0], None),                         # no tokens
])
def test_uniform_runs_finds_equal_runs_that_tile_the_tokens(indptr, adapters, expected):
    from v2l_fast.kernels.lora_sgmv_torch import uniform_runs

    assert uniform_runs(torch.tensor(indptr), torch.tensor(adapters), indptr[-1]) == expected


def _bad_args():
    return dict(x=torch.randn(5, 8), A=torch.randn(2, 3, 8), B=torch.randn(2, 3, 4),
                seg_indptr=torch.tensor([0, 2, 5]), seg_adapter=torch.tensor([0, 1]))


BAD_INPUTS = [
    (dict(x=torch.randn(5, 8, 1)), "x"),
    (dict(A=torch.randn(2, 3, 9)), "A"),
    (dict(B=torch.randn(3, 3, 4)), "B"),
    (dict(seg_indptr=torch.tensor([0, 6, 5])), "seg_indptr"),
    (dict(seg_indptr=torch.tensor([0, 2, 4])), "seg_indptr"),
    (dict(seg_adapter=torch.tensor([0, 2])), "seg_adapter"),
    (dict(seg_adapter=torch.tensor([-2, 0])), "seg_adapter"),
    (dict(ranks=torch.tensor([1, 4])), "ranks"),
    (dict(base=torch.randn(5, 5)), "base"),
    (dict(A=torch.randn(2, 4, 3, 8), B=torch.randn(2, 4, 3, 4), layer=4), "layer"),
]


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=pytest.mark.skipif(
    CPP_MISSING is not None, reason=f"cpp backend: {CPP_MISSING}"))])
@pytest.mark.parametrize("change,name", BAD_INPUTS)
def test_bad_input_names_the_argument(backend, change, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ops.lora_sgmv(**(_bad_args() | change), backend=backend)


@pytest.mark.triton
def test_triton_rejects_fp64_naming_the_argument():
    with pytest.raises(ValueError, match="^B: expected"):
        ops.lora_sgmv(**(_bad_args() | dict(B=torch.randn(2, 3, 4, dtype=torch.float64))), backend="triton")


def test_auto_never_picks_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    impl = resolve("lora_sgmv", "auto", torch.device("cpu"))
    assert impl.fn.__module__ != "v2l_fast.kernels.lora_sgmv"
    assert impl.backend == ("cpp" if CPP_MISSING is None else "torch")


@pytest.mark.skipif(CPP_MISSING is not None, reason=f"cpp backend: {CPP_MISSING}")
def test_cpp_with_gradients_falls_back_to_the_reference():
    args = make_case(12, 40, 24, 8, 2, 3)
    x = args["x"].clone().requires_grad_()
    ops.lora_sgmv(**(args | dict(x=x)), backend="cpp").sum().backward()
    x_ref = args["x"].clone().requires_grad_()
    reference(**(args | dict(x=x_ref))).sum().backward()
    assert_rel_close(x.grad, x_ref.grad, torch.float32)


@pytest.mark.skipif(CPP_MISSING is not None, reason=f"cpp backend: {CPP_MISSING}")
def test_cpp_keeps_fp64_accumulation():
    args = make_case(12, 40, 24, 8, 2, 3)
    args = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    out = ops.lora_sgmv(**args, backend="cpp")
    assert out.dtype == torch.float64
    assert_rel_close(out, reference(**args), torch.float64)


AUTOCAST_CASES = {  # (backend, case, with gradients)
    "reference_decode": ("reference", lambda: make_case(12, 40, 24, 8, 3, 12), False),
    "cpp_prefill": ("cpp", lambda: make_case(40, 40, 24, 8, 3, 5), False),
    "torch_training_runs": ("torch", lambda: training_case(4, 2, 5, 40, 24, 8, 4), True),
    "cpp_training_runs": ("cpp", lambda: training_case(4, 2, 5, 40, 24, 8, 4), True),
}


@pytest.mark.parametrize("name", list(AUTOCAST_CASES))
def test_under_bf16_autocast_every_cpu_backend_still_accumulates_in_fp32(name):
    """A training step on an AMX CPU runs under bf16 autocast: the op keeps its fp32 contract (and
    the reference stays a reference) instead of running its GEMMs in bf16."""
    backend, case, grad = AUTOCAST_CASES[name]
    if backend == "cpp" and CPP_MISSING is not None:
        pytest.skip(f"cpp backend: {CPP_MISSING}")
    args = case()
    run = reference if backend == "reference" else functools.partial(ops.lora_sgmv, backend=backend)

    def output_and_grads(autocast: bool):
        leaves = {k: args[k].clone().requires_grad_(grad) for k in ("x", "A", "B")}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(**(args | leaves))
        if grad:  # outside autocast, as the trainer (and torch's autocast docs) do
            out.backward(torch.ones_like(out))
        return out, [leaves[k].grad for k in leaves] if grad else []

    plain, autocast = output_and_grads(False), output_and_grads(True)
    assert autocast[0].dtype == torch.float32
    assert_rel_close(autocast[0], reference_fp64(args).float(), torch.float32)
    for a, b in zip(autocast[1], plain[1]):
        assert_rel_close(a, b, torch.float32)


GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference(backend, name, dtype):
    missing = runtime_missing(backend, torch.device("cuda"))
    if missing:
        pytest.skip(f"{backend} backend: {missing}")
    run_case(name, backend, dtype, device="cuda")
    if dtype != torch.float32:  # 16-bit adapters too (native tensor-core dot in triton's shrink)
        run_case(name, backend, dtype, device="cuda", w_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gpu_triton_gradients_bf16_activations(name):
    T, I, O, R, n, S, extra = GRAD_CASES[name]
    args = make_case(T, I, O, R, n, S, dtype=torch.bfloat16, device="cuda", **extra)
    A, A_ref = (args["A"].clone().requires_grad_() for _ in range(2))
    dy = torch.randn(T, O, device="cuda", dtype=torch.bfloat16)
    ops.lora_sgmv(**(args | dict(A=A)), backend="triton").backward(dy)
    reference(**(args | dict(A=A_ref))).backward(dy)
    assert_rel_close(A.grad, A_ref.grad, torch.bfloat16)
