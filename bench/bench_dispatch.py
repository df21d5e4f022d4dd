"""Per-call cost of a `LoRAPatch` hook (`pytest bench/bench_dispatch.py --benchmark`).

What a patched ``down_proj`` costs on top of the plain Linear, split into the LoRA compute
itself and everything around it (the hook, backend dispatch, argument checks, metadata lookup):

- op "hook call": one ``down_proj`` Linear call at decode shapes (``rows`` = 1, 8, 64 batch
  rows of 1 token, one adapter per row, rank 16), widths "tiny" (the tiny test SmolVLM2,
  I=128, O=64) and "256M" (I=1536, O=576). Three callables, timed interleaved:
  ``linear`` (the Linear, no patch), ``patched`` (the same weight with a `LoRAPatch` hook) and
  ``kernel`` (the chosen backend's compute called directly, no checks, metadata prebuilt,
  base output precomputed). ``overhead_us = patched − linear`` is the hook's whole cost per
  call and ``dispatch_us = patched − linear − kernel`` the part that is not LoRA arithmetic.
  One row per backend that runs on the device: ``auto`` (the `LoRAPatch` default), ``torch``,
  ``cpp`` on the CPU, ``triton`` / ``cuda`` on a GPU.
- op "decode step": one new token per row on top of a 32-token KV cache through a random
  tiny SmolVLM2 (4 decoder layers, every ``down_proj`` patched), 1 and 8 rows; ``base``
  (unpatched) and ``patched`` steps interleaved; ``overhead_us_per_layer`` is
  ``(patched − base) / layers``. The cache is cropped back to 32 tokens after every step.

Interleaving: every benchmark round runs ``CALLS`` (resp. ``STEPS``) back-to-back calls of each
callable in turn, rotating which goes first, and times each block on its own; the per-call µs
fields (``<name>_us_median`` / ``_us_min``) are over rounds, the overhead medians are medians of
the per-round paired differences, the ``_min`` overheads differences of the minima. A row's
``median_s`` / ``min_s`` time one whole round (all callables), not a call.

CPU rows run with ``torch.set_num_threads(THREADS)`` in fp32; on a GPU the activations are
bf16 and the adapters fp32 (spec §9), and a round ends with a synchronisation, so GPU rows are
the host-side cost of back-to-back calls. Without a GPU the CUDA rows are recorded as
``unmeasured: no GPU``. Results: ``bench/results/bench_dispatch_<device>.json``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import statistics
import time
from collections.abc import Callable

import pytest
import torch

import v2l_fast
from v2l_fast import ops
from v2l_fast._ext import load_extension
from v2l_fast.ops import available_backends, lora_sgmv_metadata
from v2l_fast.reference import lora_sgmv as reference_lora_sgmv
from v2l_fast.vlm import LoRAPatch, down_proj_targets

try:
    from v2l_fast.vlm.factory import random_smolvlm
except ImportError:  # the BEFORE run on d16d76d, where it lived in v2l_fast.testing
    from v2l_fast.testing import random_smolvlm

import harness

THREADS = 1  # the dispatch cost is single-threaded host work; one thread keeps the shared cores quiet
RANK, SCALING = 16, 2.0
WIDTHS = {"tiny": dict(I=128, O=64), "256M": dict(I=1536, O=576)}
ROWS = (1, 8, 64)
DECODE_ROWS = (1, 8)
DECODE_MODEL = "tiny"
CACHE_TOKENS = 32
CALLS, ROUNDS = 10, 400  # hook calls per callable per round, rounds
STEPS, STEP_ROUNDS = 2, 200  # decode steps per callable per round, rounds
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
NO_GPU = "unmeasured: no GPU"


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """The same intra-op thread count for every row of this module; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def act_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def runs_on(backend: str, device: str) -> bool:
    """Whether ``backend`` takes ``device`` tensors (cpp: CPU only; triton, cuda: CUDA only)."""
    return not (backend == "cpp" and device == "cuda" or backend in ("triton", "cuda") and device == "cpu")


def skip_reason(device: str, backend: str, record) -> str | None:
    """Why ``backend`` on ``device`` gets no row; a CUDA row without a GPU is recorded as unmeasured."""
    if not runs_on(backend, device):
        return f"{backend} does not run on {device} tensors"
    if device == "cuda" and not torch.cuda.is_available():
        record(None, result=NO_GPU)
        return NO_GPU
    if backend != "auto" and backend not in available_backends("lora_sgmv"):
        return f"the {backend} backend cannot run here"
    return None


# The bench times the dispatch change side by side, so it also runs on the tree before it
# (d16d76d): there `v2l_fast.ops.backends.resolve` returned the bare function, the reference
# took ``check=``, and the triton kernel took keyword arguments and the metadata object.
def auto_backend(device: str) -> str:
    """The backend name ``auto`` resolves to for ``device`` tensors."""
    if hasattr(ops, "resolve"):
        return ops.resolve("lora_sgmv", "auto", torch.device(device)).backend
    from v2l_fast.ops.backends import resolve  # d16d76d

    impl = resolve("lora_sgmv", "auto", torch.device(device))
    return next(name for name in available_backends("lora_sgmv")
                if runs_on(name, device) and resolve("lora_sgmv", name, torch.device(device)) is impl)


def kernel_call(backend: str, x, A, B, indptr, adapters, base) -> Callable[[], torch.Tensor]:
    """``backend``'s LoRA compute on 2-D ``x`` / ``base`` with no dispatch and no checks."""
    if backend == "torch":
        unchecked = {"check": False} if "check" in inspect.signature(reference_lora_sgmv).parameters else {}
        return functools.partial(reference_lora_sgmv, x, A, B, indptr, adapters, scaling=SCALING, base=base,
                                 **unchecked)
    if backend == "cpp":
        return functools.partial(load_extension().lora_sgmv_cpu, x, A, B, indptr, adapters, None, SCALING, base)
    meta = lora_sgmv_metadata(indptr, adapters, x.shape[0], A.shape[0])
    if backend == "cuda":
        return functools.partial(load_extension().lora_sgmv_cuda, x, A, B, None, SCALING, base, meta.sorted_tokens,
                                 meta.work_group, meta.work_start, meta.work_end)
    from v2l_fast.kernels.lora_sgmv import lora_sgmv as triton_lora_sgmv

    if "metadata" in inspect.signature(triton_lora_sgmv).parameters:  # d16d76d
        return functools.partial(triton_lora_sgmv, x, A, B, indptr, adapters, scaling=SCALING, base=base,
                                 check=False, metadata=meta)
    return functools.partial(triton_lora_sgmv, x, A, B, indptr, adapters, None, SCALING, base, meta.tensors(),
                             meta.block_m)


def interleaved(contenders: dict[str, Callable], calls: int, samples: dict[str, list[float]],
                around: dict[str, Callable] | None = None) -> Callable[[], None]:
    """One benchmark round: ``calls`` calls of each contender, each block timed alone (seconds
    per call appended to ``samples[name]``), the first contender rotating from round to round.

    ``around[name]``, if given, is a context-manager factory entered untimed around that block.
    """
    order = list(contenders)
    around = around or {}

    def run_round() -> None:
        for name in order:
            fn = contenders[name]
            with around.get(name, contextlib.nullcontext)():
                harness.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                harness.synchronize()
                samples[name].append((time.perf_counter() - start) / calls)
        order.append(order.pop(0))

    return run_round


def paired_stats(samples: dict[str, list[float]], rounds: int,
                 overheads: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """µs fields of the last ``rounds`` rounds: each contender's median and min, and for each
    ``overheads[field] = (minuend, *subtrahends)`` the median of the per-round differences and
    the difference of the minima."""
    last = {name: [s * 1e6 for s in values[-rounds:]] for name, values in samples.items()}
    out = {}
    for name, values in last.items():
        out[f"{name}_us_median"] = statistics.median(values)
        out[f"{name}_us_min"] = min(values)
    for field, (plus, *minus) in overheads.items():
        diffs = [last[plus][i] - sum(last[m][i] for m in minus) for i in range(rounds)]
        out[f"{field}_median"] = statistics.median(diffs)
        out[f"{field}_min"] = min(last[plus]) - sum(min(last[m]) for m in minus)
    return out


def measure_interleaved(benchmark, record, contenders, *, calls: int, rounds: int,
                        overheads: dict[str, tuple[str, ...]], around: dict[str, Callable] | None = None,
                        **row) -> None:
    """`harness.measure` of interleaved rounds, the row completed with `paired_stats`."""
    samples = {name: [] for name in contenders}

    def add(bench, **fields):
        if bench is not None and bench.stats:
            fields.update(paired_stats(samples, len(bench.stats.stats.data), overheads))
        record(bench, **fields)

    harness.measure(benchmark, add, interleaved(contenders, calls, samples, around), rounds=rounds,
                    calls_per_round=calls, threads=torch.get_num_threads(), v2l_fast_source=v2l_fast.__path__[0],
                    **row)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("device", DEVICES)
def test_hook_call(benchmark, bench_record, device, width, rows, backend):
    I, O = WIDTHS[width]["I"], WIDTHS[width]["O"]
    row = dict(op="hook call", device=device, width=width, I=I, O=O, R=RANK, rows=rows, tokens=rows,
               adapters=rows, backend=backend)
    reason = skip_reason(device, backend, functools.partial(bench_record, **row))
    if reason:
        pytest.skip(reason)
    dtype = act_dtype(device)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(O, I, generator=gen) / I**0.5
    A = torch.randn(rows, 1, RANK, I, generator=gen) / I**0.5
    B = torch.randn(rows, 1, RANK, O, generator=gen) / RANK**0.5
    x = torch.randn(rows, 1, I, generator=gen).to(device, dtype)
    patched, plain = (torch.nn.Linear(I, O, bias=False, device=device, dtype=dtype) for _ in range(2))
    patched.weight = plain.weight = torch.nn.Parameter(weight.to(device, dtype), requires_grad=False)
    A, B = A.to(device), B.to(device)
    used = auto_backend(device) if backend == "auto" else backend
    indptr = torch.arange(rows + 1, device=device)
    adapters = torch.arange(rows, device=device)
    with torch.no_grad():
        kernel = kernel_call(used, x.view(rows, I), A[:, 0], B[:, 0], indptr, adapters, plain(x).view(rows, O))
    contenders = {"linear": functools.partial(plain, x), "patched": functools.partial(patched, x), "kernel": kernel}
    with LoRAPatch([patched], A, B, SCALING, backend=backend), torch.no_grad():
        measure_interleaved(benchmark, bench_record, contenders, calls=CALLS, rounds=ROUNDS,
                            overheads={"overhead_us": ("patched", "linear"),
                                       "dispatch_us": ("patched", "linear", "kernel")},
                            backend_used=used, act_dtype=str(dtype), adapter_dtype=str(A.dtype), **row)


@functools.cache
def decode_model(device: str):
    """The random tiny SmolVLM2 of the decode rows, eval mode, on ``device``."""
    return random_smolvlm(DECODE_MODEL, dtype=act_dtype(device), device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", DECODE_ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_step(benchmark, bench_record, device, rows, backend):
    from transformers import DynamicCache

    row = dict(op="decode step", device=device, model=DECODE_MODEL, rows=rows, cache_tokens=CACHE_TOKENS,
               R=RANK, backend=backend)
    reason = skip_reason(device, backend, functools.partial(bench_record, **row))
    if reason:
        pytest.skip(reason)
    model = decode_model(device)
    targets = down_proj_targets(model)
    I, O = targets[0].in_features, targets[0].out_features
    gen = torch.Generator().manual_seed(0)
    A = (torch.randn(rows, len(targets), RANK, I, generator=gen) / I**0.5).to(device)
    B = (torch.randn(rows, len(targets), RANK, O, generator=gen) * 1e-2).to(device)
    vocab = model.config.text_config.vocab_size
    prompt = torch.randint(3, vocab, (rows, CACHE_TOKENS + 1), generator=gen).to(device)
    mask = torch.ones_like(prompt)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True)

    def step():
        model(input_ids=prompt[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to CACHE_TOKENS: every step sees the same cache

    @contextlib.contextmanager
    def with_patch():
        with LoRAPatch(targets, A, B, SCALING, backend=backend):
            step()  # untimed: builds the patch's per-shape segment metadata
            yield

    def record(bench, **fields):
        for stat in ("median", "min"):
            if f"overhead_us_{stat}" in fields:
                fields[f"overhead_us_per_layer_{stat}"] = fields[f"overhead_us_{stat}"] / len(targets)
        bench_record(bench, **fields)

    with torch.no_grad():
        measure_interleaved(benchmark, record, {"base": step, "patched": step}, calls=STEPS,
                            rounds=STEP_ROUNDS, around={"patched": with_patch},
                            overheads={"overhead_us": ("patched", "base")}, layers=len(targets), I=I, O=O,
                            act_dtype=str(act_dtype(device)), **row)
