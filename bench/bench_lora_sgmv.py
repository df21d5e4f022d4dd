"""Benchmarks of the batched multi-adapter LoRA on down_proj (`pytest bench/bench_lora_sgmv.py --benchmark`).

Workloads at the SmolVLM2-500M (I=2560, O=960) and -2.2B (I=8192, O=2048) down_proj, rank 32
(r = 16 plus the bias block):

- decode: a batch of 1..256 tokens, one per sequence, using 1..256 distinct adapters;
- prefill: 16..8192 tokens in 4 segments (4 adapters);
- train: forward + backward (dx, dA, dB) of 8 videos × 4 questions × 256 tokens, one adapter
  per video (CPU: 4 × 4 × 80, the shape of the training issue's measurement), providers
  interleaved round by round.

Providers (op "lora", base output given): ``reference``, ``torch`` (the torch backend: batched
GEMMs over runs of one adapter), ``triton``, ``cuda``, ``cpp`` and the authors' form
``per_row`` (each row's adapter ``repeat_interleave``-d per row — not per token — then two
einsums over ``[rows, seq, ·]``, as their ``lora_forward``; rows of equal length). Op "down_proj" adds the base
linear to every provider so that ``peft``'s mixed-adapter batch (``adapter_names=``, which
always runs the base layer) compares like for like; ``base_linear`` alone is its floor.
The kernel providers get the batch's metadata prebuilt (it is built once per batch and reused
by every layer); op "metadata" times building it.

Without CUDA a CPU-sized subset runs in fp32 with few rounds, and triton is skipped (the
interpreter's timings mean nothing). Rows carry the minimal bytes moved (adapters read once,
x, base, out) for GB/s, and peak extra CUDA memory.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from v2l_fast import ops
from v2l_fast.ops.registry import runtime_missing
from v2l_fast.reference import lora_sgmv as reference

import harness

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
ACT_DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # adapters stay fp32 (spec §9)
ROUNDS = 20 if ON_GPU else 5
RANK, SCALING = 32, 2.0
MODELS = {"500M": dict(I=2560, O=960), "2.2B": dict(I=8192, O=2048)}

if ON_GPU:
    DECODE = [(m, b, a) for m in MODELS for b in (1, 16, 64, 256) for a in (1, 16, 64, 256) if a <= b]
    PREFILL = [(m, t) for m in MODELS for t in (16, 256, 2048, 8192)]
    TRAIN = [(m, 8, 4, 256) for m in MODELS]
else:
    DECODE = [("500M", 1, 1), ("500M", 16, 4), ("500M", 64, 64), ("2.2B", 64, 64)]
    PREFILL = [("500M", 256)]
    TRAIN = [("500M", 4, 4, 80)]  # CPU-sized stand-in for 8 × 4 × 256
LORA_PROVIDERS = ["reference", "torch", "triton", "cuda", "cpp", "per_row"]


def make_batch(model: str, tokens: int, num_segments: int, num_adapters: int, seed: int = 0):
    """x, adapters [n, R, ·], segments of equal length cycling over the adapters, base, W."""
    I, O = MODELS[model]["I"], MODELS[model]["O"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, I, generator=gen).to(DEVICE, ACT_DTYPE)
    A = (torch.randn(num_adapters, RANK, I, generator=gen) / I**0.5).to(DEVICE)
    B = (torch.randn(num_adapters, RANK, O, generator=gen) / RANK**0.5).to(DEVICE)
    W = (torch.randn(O, I, generator=gen) / I**0.5).to(DEVICE, ACT_DTYPE)
    indptr = torch.linspace(0, tokens, num_segments + 1).round().long().to(DEVICE)
    adapters = (torch.arange(num_segments) % num_adapters).to(DEVICE)
    base = F.linear(x, W)
    return dict(x=x, A=A, B=B, seg_indptr=indptr, seg_adapter=adapters, base=base), W


def lora_bytes(batch) -> int:
    """Bytes a perfect kernel moves: the used adapters once, x and base read, out written."""
    used = int(batch["seg_adapter"].unique().numel())
    A, B = batch["A"], batch["B"]
    adapters = used * (A[0].numel() * A.element_size() + B[0].numel() * B.element_size())
    x, base = batch["x"], batch["base"]
    return adapters + x.numel() * x.element_size() + 2 * base.numel() * base.element_size()


def per_row_lora(x, A, B, seg_indptr, seg_adapter, *, scaling, base):
    """The authors' form: each row's (segment's) adapter copied per row, then two einsums over
    ``[rows, seq, ·]`` (autocast bf16 on a GPU, as in their training); rows of equal length."""
    rows = seg_adapter.shape[0]
    x_rows = x.view(rows, x.shape[0] // rows, x.shape[1])
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):
        shrunk = torch.einsum("bsi,bri->bsr", x_rows, A[seg_adapter])
        delta = torch.einsum("bsr,bro->bso", shrunk, B[seg_adapter]).reshape(x.shape[0], -1)
    return (base.float() + scaling * delta.float()).to(base.dtype)


def lora_provider(name: str, batch):
    """A callable(x, A, B, base) for provider ``name``, or a skip reason."""
    if name == "triton" and not ON_GPU:
        return "triton runs only under the interpreter without a GPU: its timing is not meaningful"
    if name in ("cuda", "cpp"):
        missing = runtime_missing(name, DEVICE)
        if missing:
            return f"{name} backend: {missing}"
    fixed = dict(seg_indptr=batch["seg_indptr"], seg_adapter=batch["seg_adapter"], scaling=SCALING)
    if name == "per_row":
        return lambda x, A, B, base: per_row_lora(x, A, B, base=base, **fixed)
    if name == "reference":
        return lambda x, A, B, base: reference(x, A, B, base=base, **fixed)
    meta = ops.lora_sgmv_metadata(batch["seg_indptr"], batch["seg_adapter"], batch["x"].shape[0],
                                  batch["A"].shape[0])
    return lambda x, A, B, base: ops.lora_sgmv(x, A, B, base=base, check=False, metadata=meta, backend=name, **fixed)


def peft_layer(batch, W):
    """A peft LoRA Linear over W with one adapter per pool entry (weights copied in), eval mode."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class DownProj(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = nn.Linear(W.shape[1], W.shape[0], bias=False, device=DEVICE, dtype=W.dtype)

        def forward(self, x):
            return self.down_proj(x)

    config = LoraConfig(r=RANK, lora_alpha=SCALING * RANK, target_modules=["down_proj"])
    model = get_peft_model(DownProj(), config, adapter_name="a0")
    for a in range(1, batch["A"].shape[0]):
        model.add_adapter(f"a{a}", config)
    layer = model.base_model.model.down_proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        for a in range(batch["A"].shape[0]):
            layer.lora_A[f"a{a}"].weight.copy_(batch["A"][a])
            layer.lora_B[f"a{a}"].weight.copy_(batch["B"][a].T)
    model.eval()
    return layer


def _shape_row(batch, model, **extra):
    return dict(model=model, I=batch["x"].shape[1], O=batch["B"].shape[-1], R=RANK, tokens=batch["x"].shape[0],
                segments=batch["seg_adapter"].numel(), adapters=batch["A"].shape[0], act_dtype=str(ACT_DTYPE),
                adapter_dtype=str(batch["A"].dtype), **extra)


@pytest.mark.parametrize("provider", LORA_PROVIDERS)
@pytest.mark.parametrize("model,tokens,adapters", DECODE, ids=[f"{m}-b{b}-a{a}" for m, b, a in DECODE])
def test_decode(benchmark, bench_record, model, tokens, adapters, provider):
    batch, _ = make_batch(model, tokens, tokens, adapters)
    fn = lora_provider(provider, batch)
    if isinstance(fn, str):
        pytest.skip(fn)
    step = torch.no_grad()(functools.partial(fn, batch["x"], batch["A"], batch["B"], batch["base"]))
    harness.measure(benchmark, bench_record, step, rounds=ROUNDS,
                    op="lora", workload="decode", provider=provider,
                    bytes=lora_bytes(batch), **_shape_row(batch, model))


@pytest.mark.parametrize("provider", ["peft", "triton", "cuda", "cpp", "base_linear"])
@pytest.mark.parametrize("model,tokens,adapters", DECODE, ids=[f"{m}-b{b}-a{a}" for m, b, a in DECODE])
def test_decode_down_proj(benchmark, bench_record, model, tokens, adapters, provider):
    batch, W = make_batch(model, tokens, tokens, adapters)
    x = batch["x"]
    if provider == "peft":
        layer = peft_layer(batch, W)
        names = [f"a{a}" for a in batch["seg_adapter"].tolist()]
        fn = functools.partial(layer, x[:, None], adapter_names=names)
    elif provider == "base_linear":
        fn = functools.partial(F.linear, x, W)
    else:
        lora = lora_provider(provider, batch)
        if isinstance(lora, str):
            pytest.skip(lora)
        fn = lambda: lora(x, batch["A"], batch["B"], F.linear(x, W))
    harness.measure(benchmark, bench_record, torch.no_grad()(fn), rounds=ROUNDS,
                    op="down_proj", workload="decode", provider=provider,
                    bytes=lora_bytes(batch) + W.numel() * W.element_size(), **_shape_row(batch, model))


@pytest.mark.parametrize("provider", LORA_PROVIDERS)
@pytest.mark.parametrize("model,tokens", PREFILL, ids=[f"{m}-t{t}" for m, t in PREFILL])
def test_prefill(benchmark, bench_record, model, tokens, provider):
    batch, _ = make_batch(model, tokens, 4, 4)
    fn = lora_provider(provider, batch)
    if isinstance(fn, str):
        pytest.skip(fn)
    step = torch.no_grad()(functools.partial(fn, batch["x"], batch["A"], batch["B"], batch["base"]))
    harness.measure(benchmark, bench_record, step, rounds=ROUNDS,
                    op="lora", workload="prefill", provider=provider,
                    bytes=lora_bytes(batch), **_shape_row(batch, model))


@pytest.mark.parametrize("model,videos,questions,seq", TRAIN, ids=[f"{m}-{v}x{q}x{s}" for m, v, q, s in TRAIN])
def test_train(benchmark, bench_record, model, videos, questions, seq):
    """Every provider's forward + backward on the same batch, interleaved; gradients checked equal."""
    batch, _ = make_batch(model, videos * questions * seq, videos * questions, videos)
    batch["seg_adapter"] = torch.arange(videos * questions, device=DEVICE) // questions  # video-major
    grad_out = torch.randn_like(batch["base"])
    steps, skipped = {}, {}
    for provider in LORA_PROVIDERS:
        fn = lora_provider(provider, batch)
        if isinstance(fn, str):
            skipped[provider] = fn
            continue
        leaves = [batch[k].detach().requires_grad_() for k in ("x", "A", "B", "base")]
        steps[provider] = functools.partial(lambda fn, leaves: torch.autograd.grad(fn(*leaves), leaves, grad_out),
                                            fn, leaves)
    want = steps["reference"]()
    errors = {p: max(float((g - w).norm() / w.norm()) for g, w in zip(step(), want)) for p, step in steps.items()}
    assert max(errors.values()) <= (2e-2 if ON_GPU else 1e-4), errors  # bf16 autocast of per_row on a GPU

    def derive(provider, times):
        return dict(grad_rel_error=errors[provider], time_vs_per_row=min(times[provider]) / min(times["per_row"]))

    harness.interleaved(benchmark, bench_record, steps, rounds=ROUNDS, derive=derive, op="lora",
                        workload="train fwd+bwd", videos=videos, questions=questions, seq=seq,
                        bytes=3 * lora_bytes(batch), **_shape_row(batch, model))
    for provider, reason in skipped.items():
        bench_record(None, op="lora", workload="train fwd+bwd", provider=provider, error=reason)


@pytest.mark.parametrize("model,tokens,adapters", DECODE[-1:] + [(m, t, 4) for m, t in PREFILL[-1:]])
def test_metadata(benchmark, bench_record, model, tokens, adapters):
    segments = tokens if (model, tokens, adapters) in DECODE else 4
    batch, _ = make_batch(model, tokens, segments, adapters)
    fn = functools.partial(ops.lora_sgmv_metadata, batch["seg_indptr"], batch["seg_adapter"], tokens, adapters)
    harness.measure(benchmark, bench_record, fn, rounds=ROUNDS,
                    op="metadata", workload="build once per batch", provider="torch",
                    **_shape_row(batch, model))
