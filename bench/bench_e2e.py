"""End-to-end benchmarks: the hypernetwork forward and answering with adapters
(`pytest bench/bench_e2e.py --benchmark`).

Hypernetwork (op "hypernet"): `Frames2LoRA.generate` with random weights at the released
shapes (500M: L=32, H=960, I=2560; 2.2B: L=24, H=2048, I=8192; r=16, D=512, Q=8, NB=9) on the
features of one video of 12 / 64 / 256 / 1024 frames (64 / 81 tokens per frame plus 64 prompt
tokens). Providers ``torch`` (eager) and ``triton``, chosen through ``$V2L_BACKEND`` for the
duration of the call, so every op of the stack switches as it does in `v2l_fast.api`. Modes
``fwd`` (no grad, as at internalisation) and ``fwd+bwd`` (gradients into every hypernetwork
parameter, the features frozen, as in training). bf16 autocast on a GPU (the default of
`generate`, fp32 weights), fp32 on the CPU. Each row carries the FLOPs of the whole pass
(`hypernet_flops`), the FLOP floor (those FLOPs at the device's measured matmul rate, bf16 on
a GPU, fp32 on the CPU) and time / floor.

Serving (op "serve"): a random SmolVLM2 text decoder (Llama) answers a batch of B prompts of
64 tokens, prompt b with its own rank-32 adapter on every ``down_proj``: one prefill forward,
then decode forwards up to ``new_tokens`` greedy tokens (``model.generate``, as `v2l_fast.api.ask`).
Providers: ``base`` (no adapter, the floor), ``LoRAPatch`` with backend ``torch`` / ``triton`` /
``cuda`` / ``cpp``, and ``peft``'s mixed-adapter batch (``adapter_names=``). Rows carry tokens/s.

Without CUDA only a small subset runs (the 500M hypernetwork at 12 frames, forward, eager; the
serving comparison on a 2-layer 256M-shaped decoder with 1 and 8 prompts), and triton is
skipped: the interpreter's timings mean nothing.
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch
from bench_perceiver_attention import NUM_HEADS, D, Q, block_flops, context_length, projection_flops

from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig
from v2l_fast.ops.registry import runtime_missing
from v2l_fast.vlm.factory import SMOLVLM2_SHAPES, smolvlm_config
from v2l_fast.vlm.lora_patch import LoRAPatch, decoder_layers

import harness

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


@functools.cache
def matmul_flops_per_s() -> float:
    """The device's measured dense matmul rate: bf16 8192³ on a GPU, fp32 2048³ on the CPU."""
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    best = float("inf")
    for i in range(13 if ON_GPU else 4):
        harness.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        harness.synchronize()
        if i >= (3 if ON_GPU else 1):  # warm-up calls (cuBLAS heuristics, CPU thread pool)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


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
    """A freshly initialised Frames2LoRA for ``model``'s text shapes, on the device (fp32)."""
    config = Frames2LoRAConfig.for_vlm(smolvlm_config(model), rank=RANK)
    with torch.device(DEVICE):
        return Frames2LoRA(config).eval()


def _hypernet_skip(model: str, frames: int, provider: str, mode: str) -> str | None:
    if provider == "triton" and not ON_GPU:
        return TRITON_ON_CPU
    if not ON_GPU and (model, frames, provider, mode) != ("500M", 12, "torch", "fwd"):
        return CPU_ONLY_SUBSET
    return None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("model", MODELS)
def test_hypernet(benchmark, bench_record, monkeypatch, model, frames, provider, mode):
    reason = _hypernet_skip(model, frames, provider, mode)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("V2L_BACKEND", provider)
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

    def step():
        if not training:
            with torch.no_grad():
                return hypernet.generate(features)
        out = hypernet.generate(features)
        return torch.autograd.grad((out.A, out.B), params, (grad_A, grad_B))

    parts = hypernet_flops(model, frames, training)
    flops = sum(parts.values())
    rate = matmul_flops_per_s()
    floor = flops / rate
    record = derived_record(bench_record, lambda median: {"time_over_flop_floor": median / floor})
    harness.measure(benchmark, record, step, rounds=5 if ON_GPU else 1, op="hypernet", model=model,
                    frames=frames, S=S, L=cfg.num_layers, H=cfg.hidden_size, I=cfg.intermediate_size,
                    provider=provider, mode=mode, dtype="bf16 autocast, fp32 weights" if ON_GPU else "fp32",
                    flops=flops, flops_by_part=parts, matmul_tflops=rate / 1e12, flop_floor_s=floor)


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


def peft_mixed_batch(model, A, B):
    """Wrap ``model`` with peft: one LoRA adapter per batch row on every down_proj (weights copied
    in). Returns the PeftModel and the adapter names; undo with ``peft_model.unload()``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=ADAPTER_RANK, lora_alpha=ALPHA * ADAPTER_RANK, target_modules=["down_proj"])
    names = [f"video{i}" for i in range(A.shape[0])]
    layers = decoder_layers(model)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    with torch.no_grad():
        for l, layer in enumerate(layers):
            for i, name in enumerate(names):
                layer.mlp.down_proj.lora_A[name].weight.copy_(A[i, l])
                layer.mlp.down_proj.lora_B[name].weight.copy_(B[i, l].T)
    return peft_model.eval(), names


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
        peft_model, names = peft_mixed_batch(model, A, B)
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
