"""Serving throughput: 8 questions × 64 videos, each video its own adapter, side by side.

Providers, timed in turn in one run (`harness.interleaved`), all greedy, same prompts, same
adapters (rank 16: the per-video rows a bias-folded base serves), same base weights:

- ``engine``: `v2l_fast.serve.Engine`, all 512 requests submitted at once (continuous batching,
  one packed forward per step, one `lora_sgmv` per layer over all adapters);
- ``peft-mixed``: peft's mixed-adapter batch, one ``generate`` over the 512 rows with
  ``adapter_names`` (peft loops over the adapters present inside every LoRA layer);
- ``peft-swap``: one video at a time, ``set_adapter`` then ``generate`` of its 8 questions;
- ``engine-base``: the floor, the engine answering the same requests without adapters
  (``engine_speedup_vs_engine-base`` near 1 means the 64 adapters cost next to nothing).

Every provider generates exactly ``NEW_TOKENS`` per request (end-of-sequence ignored: a random
model emits it at random), and the engine's tokens are checked against peft's mixed batch.
Targets (issue 8): engine ≥ 10× peft-swap and ≥ 3× peft-mixed at 64 adapters.

CPU: the 2-layer 256M decoder stands in (as in bench_e2e's serving rows), 8 new tokens, in fp32
(op ``engine_throughput``) and, where the CPU multiplies bf16 in hardware (AMX:
`v2l_fast.precision`), in bf16 too (op ``engine_throughput_bf16``: every provider's weights in
bf16); a GPU runs the 500M and 2.2B shapes in bf16 with 32 new tokens.

Each provider's call starts with oneDNN on (``torch.backends.mkldnn.enabled``): when one of
oneDNN's matmuls fails to allocate its workspace, torch switches oneDNN off for the whole process
and every later bf16 matmul takes a slow path (peft's bf16 mixed-adapter ``generate`` of 512 rows
does this on the CPU: bench/NOTES.md). A provider pays for its own failure, not for another's; its
row says whether oneDNN was switched off during its calls (``onednn_switched_off``).

    pytest bench/bench_e2e_serve.py --benchmark

Results: ``bench/results/bench_e2e_serve_<device>.json`` and its plot ``….png``
(`plots.plot_engine_throughput`, drawn by `harness.ResultLog`).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.precision import bf16_matmul_hardware
from v2l_fast.serve import Engine, SamplingParams
from v2l_fast.vlm.factory import random_smolvlm, tiny_vlm
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.lora_patch import down_proj_targets

import harness
from peers import peft_lora_model

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
# the device's serving dtype (bf16 on a GPU, fp32 on the CPU), and bf16 on a CPU with AMX too
DTYPES = {"bf16": torch.bfloat16} if ON_GPU else {"fp32": torch.float32, "bf16": torch.bfloat16}
VIDEOS, QUESTIONS = 64, 8
PROMPT_TOKENS = 32
NEW_TOKENS = 32 if ON_GPU else 8
RANK = 16
ALPHA = 2.0 * RANK**1.5
# name → (SmolVLM2 size, text-config overrides)
MODELS = {"256M-2layers": ("256M", {"num_hidden_layers": 2}), "500M": ("500M", {}), "2.2B": ("2.2B", {})}
ROUNDS = 5 if ON_GPU else 3


def random_vlm(name: str, dtype: torch.dtype) -> VLM:
    """A random-weight SmolVLM2 of ``name``'s shapes in ``dtype`` with a character tokenizer (the
    prompts are token ids; the tokenizer only decodes). Its image token is moved to the tokenizer's id."""
    size, overrides = MODELS[name]
    model = random_smolvlm(size, dtype=dtype, device=DEVICE, **overrides)
    model.config.image_token_id = 150  # tiny_smolvlm_tokenizer's <image>; no prompt holds it
    return tiny_vlm(model=model)


def workload(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt ids ``[V·Q, PROMPT_TOKENS]`` (video-major, ids above the special tokens) and the
    adapters ``A [V, L, r, I]``, ``B [V, L, r, H]`` (fp32, small: activations stay finite)."""
    down = down_proj_targets(model)
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.text_config.vocab_size
    prompts = torch.randint(200, vocab, (VIDEOS * QUESTIONS, PROMPT_TOKENS), generator=gen)
    A = torch.randn(VIDEOS, len(down), RANK, down[0].in_features, generator=gen) / down[0].in_features**0.5
    B = torch.randn(VIDEOS, len(down), RANK, down[0].out_features, generator=gen) * 1e-2
    return prompts, A, B


def _skip(name: str, dtype: str) -> str | None:
    if dtype == "bf16" and bf16_matmul_hardware(DEVICE) is None:
        return f"bf16 is not in hardware on this {DEVICE.type} (it would be emulated)"
    if ON_GPU and name == "256M-2layers":
        return "the 2-layer decoder is the CPU stand-in; a GPU runs the full 500M and 2.2B decoders"
    if not ON_GPU and name != "256M-2layers":
        return "CPU: only the 2-layer 256M stand-in runs (a full decoder × 512 requests × 3 providers × 3 rounds " \
               "takes tens of minutes on 2 cores)"
    return None


def onednn_fresh(step, switched_off: set, name: str):
    """``step`` called with oneDNN switched on first; ``name`` joins ``switched_off`` when the call
    leaves it off (one of its matmuls failed in oneDNN)."""
    def run():
        torch.backends.mkldnn.enabled = True
        try:
            return step()
        finally:
            if not torch.backends.mkldnn.enabled:
                switched_off.add(name)
            torch.backends.mkldnn.enabled = True

    return run


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(MODELS))
def test_engine_throughput(benchmark, bench_record, name, dtype):
    reason = _skip(name, dtype)
    if reason:
        pytest.skip(reason)
    torch_dtype = DTYPES[dtype]
    op = "engine_throughput" if ON_GPU or dtype == "fp32" else "engine_throughput_bf16"
    vlm = random_vlm(name, torch_dtype)
    model = vlm.model
    prompts, A, B = workload(model)
    video_of = torch.arange(VIDEOS).repeat_interleave(QUESTIONS)
    engine = Engine(vlm, fold=False, max_batch=VIDEOS * QUESTIONS, max_len=PROMPT_TOKENS + NEW_TOKENS,
                    max_rank=RANK, pool_bytes=VIDEOS * len(down_proj_targets(model)) * RANK
                    * (A.shape[-1] + B.shape[-1]) * 4, max_prefill_tokens=VIDEOS * QUESTIONS * PROMPT_TOKENS)
    engine.eos_ids = set()  # every request generates NEW_TOKENS, as min_new_tokens does for peft
    base = base_fingerprint(model)
    for v in range(VIDEOS):
        engine.add_adapter(f"video{v}", Adapters(A[v:v + 1], B[v:v + 1], ALPHA, base))
    rows = [row.tolist() for row in prompts]
    adapter_ids = [f"video{v}" for v in video_of.tolist()]
    params = SamplingParams(max_tokens=NEW_TOKENS)
    engine_tokens = {}

    def run_engine():
        handles = [engine.submit(prompt_ids=r, adapter=a, params=params) for r, a in zip(rows, adapter_ids)]
        engine.run_until_done()
        engine_tokens["last"] = [h.result().token_ids for h in handles]

    # peft replaces the down_proj modules it wraps: it gets its own copy of the same weights
    peft_model, names = peft_lora_model(random_vlm(name, torch_dtype).model, A.to(DEVICE, torch_dtype),
                                        B.to(DEVICE, torch_dtype), ALPHA)
    input_ids = prompts.to(DEVICE)
    generate = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=model.config.text_config.pad_token_id)
    peft_tokens = {}

    @torch.no_grad()
    def run_peft_mixed():
        out = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  adapter_names=[names[v] for v in video_of.tolist()], **generate)
        peft_tokens["last"] = out[:, PROMPT_TOKENS:].tolist()

    @torch.no_grad()
    def run_peft_swap():
        for v in range(VIDEOS):
            peft_model.set_adapter(names[v])
            rows_v = input_ids[v * QUESTIONS:(v + 1) * QUESTIONS]
            peft_model.generate(input_ids=rows_v, attention_mask=torch.ones_like(rows_v), **generate)

    def run_engine_base():  # the floor: the same requests on the base model, no adapter
        for r in rows:
            engine.submit(prompt_ids=r, params=params)
        engine.run_until_done()

    switched_off: set[str] = set()
    steps = {provider: onednn_fresh(step, switched_off, provider) for provider, step in (
        ("engine", run_engine), ("engine-base", run_engine_base), ("peft-mixed", run_peft_mixed),
        ("peft-swap", run_peft_swap))}
    text = model.config.text_config

    def derive(provider, times):
        median = statistics.median(times[provider])
        ratios = {f"engine_speedup_vs_{p}": statistics.median(times[p]) / median
                  for p in times if p != "engine"} if provider == "engine" else {}
        return {"tokens_per_s": VIDEOS * QUESTIONS * NEW_TOKENS / median,
                "onednn_switched_off": provider in switched_off, **ratios}

    harness.interleaved(benchmark, bench_record, steps, rounds=ROUNDS, derive=derive, op=op,
                            model=name, layers=text.num_hidden_layers, H=text.hidden_size,
                            I=text.intermediate_size, videos=VIDEOS, questions=QUESTIONS,
                            prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, adapter_rank=RANK,
                            dtype=str(torch_dtype))
    # the same greedy tokens in fp32; in bf16 a near-tie may break either way
    same = sum(a == b for a, b in zip(engine_tokens["last"], peft_tokens["last"]))
    bench_record(None, op=f"{op}_agreement", model=name, requests=len(rows),
                 identical_token_sequences=same, dtype=str(torch_dtype))
    if dtype == "fp32":
        assert same == len(rows), f"engine and peft disagree on {len(rows) - same} of {len(rows)} answers"
