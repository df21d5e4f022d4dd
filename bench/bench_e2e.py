"""End-to-end benchmarks: the hypernetwork forward and answering with adapters
(`pytest bench/bench_e2e.py --benchmark`).

Hypernetwork (op "hypernet"): `Frames2LoRA.generate` with random weights at the released
shapes (500M: L=32, H=960, I=2560; 2.2B: L=24, H=2048, I=8192; r=16, D=512, Q=8, NB=9) on the
features of one video of 3 / 12 / 64 / 256 / 1024 frames (64 / 81 tokens per frame plus 64
prompt tokens; 500M: S = 256 at 3 frames, 832 at 12). Providers, interleaved round by round
with a dense matmul (the FLOP floor's yardstick, measured under the same load):
``reference`` (the previous torch path: the ops' torch backend set to the references, K/V
materialised, three linears), ``torch`` (the torch fast paths: K/V absorbed, gate+up as one
GEMM), ``triton`` (GPU only) and ``authors`` (their ``HyperLoRA.generate_weights`` and
``combine_lora`` with the same weights, imported from ``$V2L_AUTHORS_CODE``; a row says "not
available" when it is unset). Modes ``fwd`` (no grad, as at internalisation) and ``fwd+bwd``
(gradients into every hypernetwork parameter, the features frozen, as in training; not for the
authors' module). bf16 autocast on a GPU (the default of `generate`, fp32 weights), fp32 on the
CPU. Each row carries the FLOPs of the whole pass (`hypernet_flops`), the FLOP floor (those
FLOPs at the fastest matmul round's rate, bf16 on a GPU, fp32 on the CPU), time / floor, and
the relative error of the provider's adapters against the reference provider's.

Serving (op "serve"): a random SmolVLM2 text decoder (Llama) answers a batch of B prompts of
64 tokens, prompt b with its own rank-32 adapter on every ``down_proj``: one prefill forward,
then decode forwards up to ``new_tokens`` greedy tokens (``model.generate``, as `v2l_fast.api.ask`).
Providers: ``base`` (no adapter, the floor), ``LoRAPatch`` with backend ``torch`` / ``triton`` /
``cuda`` / ``cpp``, and ``peft``'s mixed-adapter batch (``adapter_names=``). Rows carry tokens/s.

Without CUDA only a small subset runs (the 500M hypernetwork at 3 and 12 frames, forward; the
serving comparison on a 2-layer 256M-shaped decoder with 1 and 8 prompts), and triton is
skipped: the interpreter's timings mean nothing.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import pytest
import torch

from v2l_fast import ops, reference
from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig
from v2l_fast.kernels.perceiver_attention_torch import perceiver_attention as torch_attention
from v2l_fast.kernels.swiglu_mlp_torch import swiglu_mlp as torch_swiglu
from v2l_fast.ops.registry import positional, runtime_missing
from v2l_fast.testing import rel_error
from v2l_fast.vlm.factory import SMOLVLM2_SHAPES, smolvlm_config
from v2l_fast.vlm.lora_patch import LoRAPatch, decoder_layers

import harness
from peers import AUTHORS_ENV, authors_adapters, authors_code, authors_hypernet, peft_lora_model
from workloads import NUM_HEADS, D, Q, block_flops, context_length, projection_flops

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
CPU_ONLY_SUBSET = "CPU: only the small subset runs"
TRITON_ON_CPU = "triton runs only under the interpreter without a GPU: interpreter timing is not meaningful"

MODELS = ("500M", "2.2B")
FRAMES = (12, 64, 256, 1024)
RANK = 16  # the released hypernetworks' r; their adapters have 2r rows (generated + bias block)


def derived_record(record, derive):
    """``bench_record`` that also stores ``derive(median_s)`` in the row once it is timed."""

    def add(benchmark, **row):
        if benchmark is not None and benchmark.stats:
            row.update(derive(statistics.median(benchmark.stats.stats.data)))
        record(benchmark, **row)

    return add


YARDSTICK_CALLS = 8  # matmuls per round of the "matmul" step


def matmul_step():
    """The FLOP floor's yardstick: dense matmuls, bf16 8192³ on a GPU, fp32 2048³ on the CPU.

    Returns ``(step, flops, calls)``: ``step`` runs `YARDSTICK_CALLS` matmuls and appends each
    one's time to ``calls``; ``flops`` is one matmul's. The bench runs the step in every round
    among the providers' and takes the fastest single matmul as the device's rate: on a shared
    machine a 0.1 s call finds the cores free far more often than a seconds-long provider run,
    so the floor is, if anything, too low (the ratio to it too high).
    """
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    calls = []

    def step():
        for _ in range(YARDSTICK_CALLS):
            harness.synchronize()
            start = time.perf_counter()
            torch.matmul(a, b)
            harness.synchronize()
            calls.append(time.perf_counter() - start)

    return step, 2 * n**3, calls


# ---------------------------------------------------------------------------------------------
# Hypernetwork forward


def hypernet_flops(model: str, frames: int, training: bool) -> dict[str, int]:
    """FLOPs of `Frames2LoRA.generate` on one video, by part (absorbed attention: the least work).

    projection: SwiGLU H → 4H → D over the L·S rows. context_attention: the 9 encoder blocks
    (Q=8 latents) and the decoder block (r=16 queries) scoring and averaging the projected
    context, 4·nh·queries·D per token and layer. latents: per (layer, block) the latent-side
    projections, the absorption of W_k / W_v, the latents' own keys and the SwiGLU (60·q·D²).
    head: the ResMLP and the per-layer head D → I + H on L·r rows. Training counts backward as
    2× forward, except that the features are frozen: the gate/up GEMMs need no input gradient.
    """
    text = SMOLVLM2_SHAPES[model]["text"]
    L, H, I = text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]
    S = context_length(model, frames)
    gate_up = L * S * 16 * H * H
    down = projection_flops(L * S, H) - gate_up
    parts = {
        "projection": 2 * gate_up + 3 * down if training else gate_up + down,
        "context_attention": block_flops(L, S, absorbed=True) + L * S * 4 * NUM_HEADS * RANK * D,
        "latents": L * 60 * D * D * (9 * Q + RANK),
        "head": L * RANK * (16 * D * D + 2 * D * (I + H)),
    }
    if training:
        parts.update({k: 3 * v for k, v in parts.items() if k != "projection"})
    return parts


@functools.cache
def random_hypernet(model: str) -> Frames2LoRA:
    """A Frames2LoRA for ``model``'s text shapes with random weights, on the device (fp32).

    Initialised as the official module, except that ``scaler_B`` (1) and ``bias_B`` (small
    normal) are moved off their zero init, so that the B adapters the providers are compared on
    are not identically zero.
    """
    config = Frames2LoRAConfig.for_vlm(smolvlm_config(model), rank=RANK)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        hypernet = Frames2LoRA(config).eval()
    with torch.no_grad():
        hypernet.scaler_B["down_proj"].fill_(1.0)
        hypernet.bias_B["down_proj"].normal_(std=0.02)
    return hypernet


@contextlib.contextmanager
def torch_backend_is(implementations: dict):
    """Register ``implementations`` ({op name: fn}) as the ops' torch backend for the block."""
    saved = {name: getattr(ops, name).op.backends["torch"] for name in implementations}
    for name, fn in implementations.items():
        getattr(ops, name).op.register("torch", fn)
    try:
        with ops.use_backend("torch"):
            yield
    finally:
        for name, fn in saved.items():
            getattr(ops, name).op.register("torch", fn)


# The hypernetwork providers: the previous torch path (the ops' references: K/V materialised,
# three linears), the torch fast paths, the Triton kernels (GPU), the authors' code.
TORCH_PATHS = {
    "reference": {"perceiver_attention": positional(reference.perceiver_attention),
                  "swiglu_mlp": reference.swiglu_mlp},
    "torch": {"perceiver_attention": torch_attention, "swiglu_mlp": torch_swiglu},
}
HYPERNET_PROVIDERS = ("reference", "torch", "triton", "authors")
# frames → S = 64·frames + 64 for the 500M model: 3 frames is S = 256, 12 frames S = 832.
HYPERNET_FRAMES = (3, 12, 64, 256, 1024)


def _hypernet_generate(provider: str, model: str):
    """``generate(features) -> (A, B)`` of ``provider``, or None when it cannot run here."""
    hypernet = random_hypernet(model)
    if provider == "authors":
        theirs = authors_hypernet(hypernet, DEVICE)
        return None if theirs is None else functools.partial(authors_adapters, theirs)
    if provider == "triton":
        if not ON_GPU:
            return None  # the interpreter's timings mean nothing

        def generate(features):
            with ops.use_backend("triton"):
                out = hypernet.generate(features)
            return out.A, out.B

        return generate

    def generate(features):
        with torch_backend_is(TORCH_PATHS[provider]):
            out = hypernet.generate(features)
        return out.A, out.B

    return generate


def _hypernet_skip(model: str, frames: int, mode: str) -> str | None:
    if not ON_GPU and (model != "500M" or frames > 12 or mode != "fwd"):
        return CPU_ONLY_SUBSET
    return None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("frames", HYPERNET_FRAMES)
@pytest.mark.parametrize("model", MODELS)
def test_hypernet(benchmark, bench_record, model, frames, mode):
    """Every provider on the same features and weights, interleaved round by round, with the FLOP
    floor measured in the same rounds and each provider's adapters against the reference's."""
    reason = _hypernet_skip(model, frames, mode)
    if reason:
        pytest.skip(reason)
    hypernet = random_hypernet(model)
    cfg = hypernet.config
    S = context_length(model, frames)
    gen = torch.Generator(DEVICE).manual_seed(0)
    features = torch.randn(1, cfg.num_layers, S, cfg.hidden_size, generator=gen, device=DEVICE, dtype=DTYPE)
    training = mode == "fwd+bwd"
    params = list(hypernet.parameters())
    shape = (1, cfg.num_layers, cfg.adapter_rank)
    grad_A = torch.randn(*shape, cfg.intermediate_size, generator=gen, device=DEVICE)
    grad_B = torch.randn(*shape, cfg.hidden_size, generator=gen, device=DEVICE)
    generators = {p: _hypernet_generate(p, model) for p in HYPERNET_PROVIDERS}
    if training:  # the authors' module holds its own parameters: only ours are differentiated
        generators.pop("authors")
    generators = {p: g for p, g in generators.items() if g is not None}

    with torch.no_grad():
        adapters = {p: g(features) for p, g in generators.items()}

    def step_of(generate):
        def step():
            if not training:
                with torch.no_grad():
                    return generate(features)
            A, B = generate(features)
            return torch.autograd.grad((A, B), params, (grad_A, grad_B))

        return step

    matmul, matmul_flops, matmul_calls = matmul_step()
    steps = {"matmul": matmul, **{p: step_of(g) for p, g in generators.items()}}
    parts = hypernet_flops(model, frames, training)
    flops = sum(parts.values())

    def derive(provider, times):
        rate = matmul_flops / min(matmul_calls)
        floor = flops / rate
        mine = times[provider]
        A, B = adapters.get(provider, (None, None))
        ref_A, ref_B = adapters["reference"]
        return {
            "flops": YARDSTICK_CALLS * matmul_flops if provider == "matmul" else flops,
            "matmul_tflops": rate / 1e12, "flop_floor_s": floor,
            "time_over_flop_floor": statistics.median(mine) / floor, "min_time_over_flop_floor": min(mine) / floor,
            "adapter_rel_error_vs_reference": None if A is None else max(rel_error(A, ref_A), rel_error(B, ref_B)),
        }

    authors = "available" if "authors" in generators else f"not available (${AUTHORS_ENV} unset)"
    harness.interleaved(benchmark, bench_record, steps, rounds=5 if ON_GPU else 7, derive=derive, op="hypernet",
                        model=model, frames=frames, S=S, L=cfg.num_layers, H=cfg.hidden_size, I=cfg.intermediate_size,
                        mode=mode, dtype="bf16 autocast, fp32 weights" if ON_GPU else "fp32", flops_by_part=parts,
                        authors_code=authors)


@pytest.mark.parametrize("n_chunks", [(1,) * 8, (2, 1, 3, 2)], ids=["8x1", "ragged-2-1-3-2"])
def test_combine_lora(benchmark, bench_record, n_chunks):
    """`hypernet.combine_lora` against the authors' (one group loop per module and factor) on the
    500M adapters: 8 chunks, one per video (the released path) or ragged groups."""
    from v2l_fast.hypernet import combine_lora

    text = SMOLVLM2_SHAPES["500M"]["text"]
    L, H, I = text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]
    gen = torch.Generator(DEVICE).manual_seed(3)
    A, B = (torch.randn(sum(n_chunks), L, RANK, width, generator=gen, device=DEVICE) for width in (I, H))
    bias = tuple(torch.randn(L, RANK, width, generator=gen, device=DEVICE) for width in (I, H))
    sizes = torch.tensor(n_chunks, device=DEVICE)
    steps = {"v2l_fast": functools.partial(combine_lora, A, B, sizes, bias=bias)}
    code = authors_code()
    if code is not None:
        loras, lora_bias = {"down_proj": {"A": A, "B": B}}, {"down_proj": {"A": bias[0], "B": bias[1]}}

        def authors():
            out = code.combine_lora(loras, sizes, lora_bias=lora_bias)["down_proj"]
            return out["A"], out["B"]

        steps["authors"] = authors
        ours, theirs = steps["v2l_fast"](), authors()
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    harness.interleaved(benchmark, bench_record, steps, rounds=20, op="combine_lora", model="500M",
                        n_chunks=list(n_chunks), L=L, r=RANK, I=I, H=H,
                        authors_code="available" if code else f"not available (${AUTHORS_ENV} unset)")


# ---------------------------------------------------------------------------------------------
# Serving: answering with one adapter per prompt

PROMPT_TOKENS = 64
ADAPTER_RANK = 2 * RANK  # generated rows + the bias block
ALPHA = 2.0 * RANK**1.5  # the released scaling, applied as is (spec §4)
# name → (SmolVLM2 size, text-config overrides); the 2-layer 256M decoder is the CPU stand-in.
SERVING_MODELS = {"500M": ("500M", {}), "2.2B": ("2.2B", {}), "256M-2layers": ("256M", {"num_hidden_layers": 2})}
BATCHES = (1, 8, 64)
NEW_TOKENS = 32 if ON_GPU else 8
SERVING_PROVIDERS = ("base", "torch", "triton", "cuda", "cpp", "peft")


@functools.cache
def random_decoder(name: str):
    """A random SmolVLM2 text decoder (LlamaForCausalLM) of ``name``'s shapes, eval mode, on the device."""
    from transformers import AutoModelForCausalLM

    size, overrides = SERVING_MODELS[name]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(smolvlm_config(size, **overrides).text_config, dtype=DTYPE)
    return model.eval()


def random_adapters(model, batch: int):
    """``A [B, L, 2r, I]``, ``B [B, L, 2r, H]`` fp32 (spec §9), small so activations stay finite."""
    down = decoder_layers(model)[0].mlp.down_proj
    L = len(decoder_layers(model))
    gen = torch.Generator(DEVICE).manual_seed(1)
    A = torch.randn(batch, L, ADAPTER_RANK, down.in_features, generator=gen, device=DEVICE) / down.in_features**0.5
    B = torch.randn(batch, L, ADAPTER_RANK, down.out_features, generator=gen, device=DEVICE) * 1e-3
    return A, B


def _serving_skip(name: str, batch: int, provider: str) -> str | None:
    if provider == "triton" and not ON_GPU:
        return TRITON_ON_CPU
    if provider in ("torch", "triton", "cuda", "cpp"):
        missing = runtime_missing(provider, DEVICE)
        if missing:
            return f"{provider} backend: {missing}"
    if ON_GPU and name == "256M-2layers":
        return "the 2-layer decoder is the CPU stand-in; a GPU runs the full 500M and 2.2B decoders"
    if not ON_GPU and (name != "256M-2layers" or batch > 8):
        return CPU_ONLY_SUBSET
    return None


@pytest.mark.parametrize("provider", SERVING_PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(SERVING_MODELS))
def test_serve(benchmark, bench_record, name, batch, provider):
    reason = _serving_skip(name, batch, provider)
    if reason:
        pytest.skip(reason)
    model = random_decoder(name)
    text = model.config
    gen = torch.Generator(DEVICE).manual_seed(2)
    input_ids = torch.randint(3, text.vocab_size, (batch, PROMPT_TOKENS), generator=gen, device=DEVICE)
    # min_new_tokens: a random model may emit EOS early; every row times the same work.
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=text.pad_token_id)
    A, B = random_adapters(model, batch)
    patch, peft_model, runner = None, None, model
    if provider == "peft":
        peft_model, names = peft_lora_model(model, A, B, ALPHA)
        runner, kwargs["adapter_names"] = peft_model, names
    elif provider != "base":
        patch = LoRAPatch([layer.mlp.down_proj for layer in decoder_layers(model)], A, B, ALPHA, backend=provider)
    new_tokens = batch * NEW_TOKENS
    record = derived_record(bench_record, lambda median: {"tokens_per_s": new_tokens / median})
    try:
        harness.measure(benchmark, record, torch.no_grad()(functools.partial(runner.generate, **kwargs)),
                        rounds=5, op="serve", model=name, layers=text.num_hidden_layers,
                        H=text.hidden_size, I=text.intermediate_size, batch=batch, prompt_tokens=PROMPT_TOKENS,
                        new_tokens=NEW_TOKENS, adapters=0 if provider == "base" else batch,
                        adapter_rank=ADAPTER_RANK, provider=provider, dtype=str(DTYPE))
    finally:
        if patch is not None:
            patch.remove()
        if peft_model is not None:
            peft_model.unload()
