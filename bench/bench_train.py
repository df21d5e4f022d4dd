"""One hypernetwork training step, v2l_fast vs the authors' way (`pytest bench/bench_train.py --benchmark`).

Step (spec §7, the training issue's workload): 8 videos × 4 questions × 64 answer tokens (after a
24-token prompt); from the frozen VLM's features of each video ``[L, S, H]`` (cached: both sides
start from the same tensors), the hypernetwork makes one adapter per video, every text decoder
``down_proj`` gets its video's adapter, the student CE runs over the answer tokens, and backward
fills the hypernetwork's gradients. Model: SmolVLM2-256M text shapes with random weights; the
hypernetwork at the spec's sizes (r = 16, D = 512, Q = 8, 9 blocks).

Providers, interleaved round by round (`harness.interleaved`):

- ``v2l_fast``: `v2l_fast.train.objective.adapter_loss` — the hypernetwork on the ops' default
  backends, `LoRAPatch` with the rows of a video as segments of one adapter (SGMV; on the CPU the
  torch backend's batched GEMMs over runs), the LM head only on answer positions.
- ``authors``: their ``HyperLoRA.generate_weights`` + ``combine_lora`` with the same weights, their
  ``lora_forward`` bound to each ``down_proj`` as their ``apply_lora_to_layers`` does (each batch
  row's adapter ``repeat_interleave``-d per row, then einsum), full logits and spec §7's CE;
  imported from ``$V2L_AUTHORS_CODE`` (`peers`), a row saying "not available" without it.
- ``per_row_einsum``: the same per-row LoRA and full-logits CE, written here from the spec, on
  v2l_fast's hypernetwork: what remains of the authors' way when their code is not at hand.

``test_training_step_bf16`` times the same step in bf16 where the device multiplies bf16 in
hardware (`v2l_fast.precision`: CUDA, a CPU with AMX), as each code trains there: the frozen VLM's
weights in bf16 (the authors' ``load`` default) and the step under bf16 autocast, the hypernetwork's
Perceiver included (v2l_fast's trainer passes ``autocast=True`` and runs the step in
`training_autocast`, which on the CPU also picks the math SDPA kernel; the authors' code autocasts
its hypernetwork itself on CUDA, and the bench's CPU autocast covers it on the CPU). Every provider's
loss and gradients are then compared with v2l_fast's fp32 step, at bf16 tolerance.

``test_training_step_from_video`` times the step as each code trains, from the videos: the
authors' training re-runs the frozen VLM (vision tower and decoder) on the step's videos every
step; v2l_fast reads the same features from its on-disk `FeatureCache` (written once, as
``v2l-fast train --feature-cache`` does on the first epoch). FRAMES frames per video (1 on the
CPU, 12 on a GPU) at the 256M's 512 px.

Before timing, every provider's loss and hypernetwork gradients are compared with v2l_fast's
(rows carry the relative errors). Memory: peak CUDA memory on a GPU; on the CPU the bytes of
tensors saved for backward (what grows a training step's peak), counted per storage.
Without CUDA: 8 decoder layers and one frame (S = 96); with CUDA: all 30 layers, 12 frames.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig
from v2l_fast.precision import bf16_matmul_hardware, bf16_unavailable_reason, training_autocast
from v2l_fast.testing import rel_error
from v2l_fast.train.features_cache import FeatureCache, pad_videos
from v2l_fast.train.objective import IGNORE, StudentBatch, adapter_loss
from v2l_fast.vlm.factory import image_seq_len, random_smolvlm
from v2l_fast.vlm.features import extract_features
from v2l_fast.vlm.frames import VideoBatch
from v2l_fast.vlm.lora_patch import down_proj_targets

import harness
import peers

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
VIDEOS, QUESTIONS, ANSWER_TOKENS, PROMPT_TOKENS = 8, 4, 64, 24
LAYERS = 30 if ON_GPU else 8
CONTEXT = 12 * 64 + 32 if ON_GPU else 64 + 32  # 12 frames (1 on the CPU) of 64 tokens + text
RANK = 16


@functools.cache
def workload():
    """(VLM, hypernetwork, features, mask, student batch) on the device, seeded."""
    model = random_smolvlm("256M", seed=0, device=DEVICE, num_hidden_layers=LAYERS).requires_grad_(False)
    torch.manual_seed(1)
    with torch.device(DEVICE):
        hypernet = Frames2LoRA(Frames2LoRAConfig.for_vlm(model.config, rank=RANK))
    with torch.no_grad():  # off the zero init, so that B and its gradient path are not zero
        hypernet.scaler_B["down_proj"].fill_(1.0)
        hypernet.bias_B["down_proj"].normal_(std=0.02)
    cfg = model.config.text_config
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(VIDEOS, LAYERS, CONTEXT, cfg.hidden_size, generator=gen).to(DEVICE)
    rows, width = VIDEOS * QUESTIONS, PROMPT_TOKENS + ANSWER_TOKENS
    input_ids = torch.randint(3, cfg.vocab_size, (rows, width), generator=gen)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, PROMPT_TOKENS:] = input_ids[:, PROMPT_TOKENS:]
    batch = StudentBatch(input_ids, torch.ones_like(input_ids), labels,
                         torch.arange(VIDEOS).repeat_interleave(QUESTIONS)).to(DEVICE)
    return model, hypernet, features, None, batch


@functools.cache
def bf16_model() -> torch.nn.Module:
    """The workload's VLM with its weights in bf16 (how both codes hold the frozen VLM in bf16 runs)."""
    return copy.deepcopy(workload()[0]).to(torch.bfloat16)


def full_logits_loss(model, batch: StudentBatch) -> torch.Tensor:
    """Spec §7 as the authors compute it: logits at every position, fp32 CE with −100 labels,
    mean per row over its label tokens, then mean over rows."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    labels = batch.labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return (token_loss.sum(1) / (labels != IGNORE).sum(1)).mean()


@contextlib.contextmanager
def forwards_replaced(modules, forwards):
    """Each module's ``forward`` replaced (as their ``apply_lora_to_layers`` does) for the block."""
    for module, forward in zip(modules, forwards):
        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # back to the class's forward


def per_row_lora_forward(module, A, B, alpha, questions):
    """The authors' form from the spec: each row's adapter copied per row, then einsum."""
    A_rows, B_rows = A.repeat_interleave(questions, 0), B.repeat_interleave(questions, 0)

    def forward(x):
        delta = torch.einsum("bsr,bro->bso", torch.einsum("bsi,bri->bsr", x.to(A.dtype), A_rows), B_rows)
        base = F.linear(x, module.weight, module.bias)
        return (base + alpha * delta).to(base.dtype)

    return forward


def loss_fn(provider: str, from_video: bool = False, bf16: bool = False):
    """``() -> loss`` of one provider's step (None when it cannot run here); the step starts from
    `features_source` ``(provider, from_video)``; with ``bf16``, on `bf16_model` under bf16 autocast
    (v2l_fast's as its trainer runs it, `training_autocast`)."""
    step = _loss_fn(provider, from_video, bf16)
    if step is None or not bf16:
        return step

    def autocast_step():
        if provider == "v2l_fast":
            with training_autocast(DEVICE, True):
                return step()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return step()

    return autocast_step


def _loss_fn(provider: str, from_video: bool, bf16: bool):
    _, hypernet, _, _, batch = workload()
    model = bf16_model() if bf16 else workload()[0]
    source = features_source(provider, from_video)
    targets = down_proj_targets(model)
    n_qs = torch.full((VIDEOS,), QUESTIONS, device=DEVICE)
    generate = functools.partial(hypernet.generate, autocast=True if bf16 else None)
    if provider == "v2l_fast":
        generator = SimpleNamespace(generate=generate)  # as the trainer's generator passes autocast
        return lambda: adapter_loss(generator, model, *source(), batch)
    if provider == "per_row_einsum":
        def step():
            features, mask = source()
            out = generate(features, mask)
            forwards = [per_row_lora_forward(m, out.A[:, layer], out.B[:, layer], out.alpha, QUESTIONS)
                        for layer, m in enumerate(targets)]
            with forwards_replaced(targets, forwards):
                return full_logits_loss(model, batch)

        return step
    theirs = authors_hypernet()
    if theirs is None:
        return None
    code = peers.authors_code()

    def step():
        features, _ = source()
        A, B = peers.authors_adapters(theirs, features)
        forwards = [functools.partial(code.lora_forward, self=m, lora_dropout_p=0.0, scaling=hypernet.config.lora_alpha,
                                      n_qs=n_qs, tot_q=VIDEOS * QUESTIONS, A=A[:, layer], B=B[:, layer])
                    for layer, m in enumerate(targets)]
        with forwards_replaced(targets, forwards):
            return full_logits_loss(model, batch)

    return step


FRAMES = 12 if ON_GPU else 1  # frames per video of the from-video step (CONTEXT holds them)


@functools.cache
def video_batch() -> VideoBatch:
    """The videos behind the step: FRAMES random frames each at the 256M's 512 px, in a context of
    CONTEXT tokens (the frames' ``<image>`` tokens in the middle of random text ids)."""
    model = workload()[0]
    per_frame = image_seq_len("256M")
    side = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 1000, (VIDEOS, CONTEXT), generator=gen)
    start = (CONTEXT - FRAMES * per_frame) // 2
    input_ids[:, start:start + FRAMES * per_frame] = model.config.image_token_id
    pixels = torch.randn(VIDEOS, FRAMES, 3, side, side, generator=gen)
    return VideoBatch(input_ids, torch.ones_like(input_ids), pixels,
                      torch.ones(VIDEOS, FRAMES, side, side, dtype=torch.bool))


@functools.cache
def feature_cache() -> tuple[FeatureCache, list[str]]:
    """A feature cache on disk holding the frozen VLM's features of `video_batch` (written once)."""
    features, mask = extract_features(workload()[0], video_batch())
    cache = FeatureCache(tempfile.mkdtemp(prefix="v2l-bench-features-"), "bench")
    keys = [f"video-{v}" for v in range(VIDEOS)]
    for key, f, m in zip(keys, features, mask):
        cache.store(key, f, m)
    return cache, keys


def features_source(provider: str, from_video: bool):
    """``() -> (features, mask)`` at the start of a step.

    Not ``from_video``: the workload's tensors, shared (what the step costs once features exist).
    ``from_video``: what each code does every step — the authors' training re-runs the frozen VLM
    on the step's videos (`extract_features` here, no grad); v2l_fast reads them from its
    `FeatureCache` (``v2l-fast train --feature-cache``), written once before timing.
    """
    if not from_video:
        _, _, features, mask, _ = workload()
        return lambda: (features, mask)
    if provider == "v2l_fast":
        cache, keys = feature_cache()
        return lambda: tuple(t.to(DEVICE) for t in pad_videos([cache.load(key) for key in keys]))

    def run_vlm():
        with torch.no_grad():
            return extract_features(workload()[0], video_batch())

    return run_vlm


@functools.cache
def authors_hypernet():
    return peers.authors_hypernet(workload()[1], DEVICE)


def trained_module(provider: str) -> torch.nn.Module:
    return authors_hypernet() if provider == "authors" else workload()[1]


def train_step(provider: str, from_video: bool = False, bf16: bool = False):
    """``() -> (loss, {name: grad})``: one step's loss and backward into the hypernetwork."""
    loss_of, module = loss_fn(provider, from_video, bf16), trained_module(provider)

    def step():
        module.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}

    return step


def saved_for_backward_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs its forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


PROVIDERS = ("v2l_fast", "authors", "per_row_einsum")


# (loss, gradients) relative-error bounds against v2l_fast's fp32 step. bf16: measured on the CPU
# (2026-12-07) 1e-5 / 3.0e-2 for v2l_fast and 1e-5 / 3.4e-2 for the authors' code (the largest
# over the hypernetwork's parameters), bounded with headroom.
TOLERANCES = {False: (1e-4, 1e-3), True: (1e-3, 6e-2)}


def check_and_time(benchmark, bench_record, providers, *, from_video: bool, op: str, bf16: bool = False,
                   **row) -> None:
    """Check every provider's loss and gradients against v2l_fast's fp32 step, then time them interleaved."""
    steps = {p: train_step(p, from_video, bf16) for p in providers}
    ours_loss, ours_grads = (train_step("v2l_fast", from_video) if bf16 else steps["v2l_fast"])()
    ours_grads = {k: g.clone() for k, g in ours_grads.items()}  # the next step's backward refills .grad
    errors, (loss_bound, grad_bound) = {}, TOLERANCES[bf16]
    for p in providers:
        loss, grads = steps[p]()
        assert grads.keys() == ours_grads.keys(), p
        errors[p] = dict(loss_rel_error=rel_error(loss, ours_loss),
                         grad_rel_error=max(rel_error(grads[k], ours_grads[k]) for k in grads))
        assert errors[p]["loss_rel_error"] <= loss_bound and errors[p]["grad_rel_error"] <= grad_bound, (p, errors[p])
    memory = {p: harness.peak_memory(steps[p]) if ON_GPU else saved_for_backward_bytes(loss_fn(p, from_video, bf16))
              for p in providers}

    def derive(provider, times):
        ours = min(times["v2l_fast"])
        return dict(errors[provider], memory_bytes=memory[provider],
                    memory_kind="peak CUDA" if ON_GPU else "saved for backward",
                    speedup_of_v2l_fast=min(times[provider]) / ours)

    harness.interleaved(benchmark, bench_record, steps, rounds=3, derive=derive, op=op, model="256M",
                        layers=LAYERS, videos=VIDEOS, questions=QUESTIONS, answer_tokens=ANSWER_TOKENS,
                        prompt_tokens=PROMPT_TOKENS, context=CONTEXT, rank=RANK,
                        precision="bf16 weights + bf16 autocast" if bf16 else "fp32", **row)


def test_training_step(benchmark, bench_record):
    providers = [p for p in PROVIDERS if loss_fn(p) is not None]
    if providers:
        check_and_time(benchmark, bench_record, providers, from_video=False, op="train_step")
    for p in PROVIDERS:
        if p not in providers:
            bench_record(None, op="train_step", provider=p, error=peers.NOT_AVAILABLE)
    if not providers:
        pytest.skip("no provider can run")


def test_training_step_bf16(benchmark, bench_record):
    hardware = bf16_matmul_hardware(DEVICE)
    if hardware is None:
        reason = f"bf16 not in hardware here: {bf16_unavailable_reason(DEVICE)}"
        for p in PROVIDERS:
            bench_record(None, op="train_step_bf16", provider=p, error=reason)
        pytest.skip(reason)
    providers = [p for p in PROVIDERS if loss_fn(p) is not None]
    check_and_time(benchmark, bench_record, providers, from_video=False, op="train_step_bf16", bf16=True,
                   bf16_hardware=hardware)
    for p in PROVIDERS:
        if p not in providers:
            bench_record(None, op="train_step_bf16", provider=p, error=peers.NOT_AVAILABLE)


def test_training_step_from_video(benchmark, bench_record):
    """The step as each code trains: the authors re-run the frozen VLM on the step's videos, v2l_fast
    reads the features from its cache (equal features, so equal loss and gradients)."""
    if loss_fn("authors") is None:
        bench_record(None, op="train_step_from_video", provider="authors", error=peers.NOT_AVAILABLE)
        pytest.skip(peers.NOT_AVAILABLE)
    check_and_time(benchmark, bench_record, ["v2l_fast", "authors"], from_video=True, op="train_step_from_video",
                   frames=FRAMES, features="v2l_fast: FeatureCache on disk; authors: frozen VLM forward per step")
