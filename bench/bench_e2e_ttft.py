"""Time to first token: the LoRA answer (zero visual tokens) against the video in context
(`pytest bench/bench_e2e_ttft.py --benchmark`).

For each SmolVLM2 shape (256M, 500M, 2.2B; random weights, `v2l_fast.vlm.factory.random_smolvlm`)
and each video length (8, 64, 256, 1024 frames of 360×640 RGB, 1 fps), one question is answered
two ways, one new token each (the method of ``v2l-fast demo``: a ``generate`` call of one greedy
token is the prefill plus the first token):

* ``video``: the video in context, `v2l_fast.train.teacher.video_answers`, from decoded uint8
  frames to the first token: the VideoPreprocessor's pixels (resize, stretch, normalise), the
  prompt in the video chat template, the vision encoder and connector, the prefill of every
  visual and text token, the first token.
* ``lora``: `v2l_fast.api.ask` with the video's adapter: the text-only question
  (`question_ids`, chat template), the adapter on every ``down_proj`` through `LoRAPatch`
  (rank 2r = 32, α = 2·r^1.5), the prefill of the question, the first token. The adapter exists
  already: internalization is paid once per video, not per question.
* ``internalize`` (reported beside them, not in the ratio): the one-off cost per video,
  `v2l_fast.api.internalize` with a released-shape Frames2LoRA (r = 16) — the same vision
  encoder and prefill (hidden states kept, no LM head) plus the hypernetwork forward.

Context tokens are those of the prompts the model receives: ``<image>`` tokens (frames × tokens
per frame: 64 for 256M/500M, 81 for 2.2B) plus the text (template, timestamps, frame markers,
question). The real SmolVLM2 tokenizer is not stored here, so text is counted by `bench_tokenizer`,
a stand-in with SmolVLM2's special tokens and ids that cuts text as its BPE pre-tokenizer does
(words with their leading space, single digits, punctuation); the visual counts are exact.

Rounds: a 1-frame warm-up per model, then per point interleaved rounds (one video call, then 5
LoRA calls; the order alternates) and one internalization: 3 rounds on a GPU (bf16), 2 on the CPU
(fp32); ``$V2L_TTFT_VIDEO_ROUNDS`` and ``$V2L_TTFT_INTERNALIZE_ROUNDS`` override them (0
internalizations leaves them out). On a GPU each call also records its torch.cuda peak memory and
NVML power and memory, sampled every 10 ms; on the CPU those fields say "unmeasured".

What does not run: a GPU runs every point (out of memory is a row; out of memory in the
internalization keeps the answers' row). On the CPU a point whose memory estimate is over
``$V2L_TTFT_MEMORY_GB`` (8 GiB) or whose time estimate is over ``$V2L_TTFT_BUDGET_S`` (240 s) is a
row saying so, with the estimated times: video and internalization = FLOPs × the seconds per FLOP
measured on the same model's smaller point (else the last measured point's); LoRA = the same
model's measured time (it does not grow with the video), else the last one scaled by the FLOPs.

Writes ``bench/results/ttft_<device>.json`` after every point (rows of points not run again are kept) and
``ttft_<device>.png`` beside it (`plots.plot_ttft`).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import resource
import statistics
import threading
import time
import types

import numpy as np
import pytest
import torch

import harness
from workloads import D, block_flops, projection_flops

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
MODELS = ("256M", "500M", "2.2B")
FRAMES = (8, 64, 256, 1024)
FRAME_SIZE = (360, 640)  # decoded frames (height, width): a 360p clip, sampled at 1 fps
QUESTION = "What happens in the video?"
RANK = 16  # the released hypernetworks' r; adapters carry 2r rows (generated + bias block)
VIDEO_ROUNDS = int(os.environ.get("V2L_TTFT_VIDEO_ROUNDS", 3 if ON_GPU else 2))
LORA_CALLS_PER_ROUND = 5
INTERNALIZE_ROUNDS = int(os.environ.get("V2L_TTFT_INTERNALIZE_ROUNDS", 1))
TIME_BUDGET_S = float(os.environ.get("V2L_TTFT_BUDGET_S", 240))
MEMORY_BUDGET_BYTES = float(os.environ.get("V2L_TTFT_MEMORY_GB", 8)) * 2**30
UNMEASURED_GPU = "unmeasured: no GPU in this run"

# ---------------------------------------------------------------------------------------------
# Tokens

SPECIAL_TOKENS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<unk>", 49152: "<global-img>",
                  49189: "<fake_token_around_image>", 49190: "<image>", 49279: "<end_of_utterance>"}
# SmolLM2's pre-tokenizer, roughly: a word with its leading space, one digit (the space before it
# a piece of its own), one punctuation mark with its leading space, or a run of whitespace.
PIECE = r" ?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]|\s+"


@functools.cache
def bench_tokenizer():
    """A stand-in SmolVLM2 tokenizer: its special tokens at their ids, SmolVLM2's chat template,
    text cut into `PIECE` pieces (one token each; pieces outside the prompts' words are ``<unk>``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION, FRAME_LINE, VIDEO_CHAT_TEMPLATE, VIDEO_INTRO, number_in_words

    numbers = [number_in_words(n) for n in (*range(20), *range(20, 100, 10), 1100)]
    corpus = " ".join([VIDEO_INTRO, FRAME_LINE, "User: Assistant:", QUESTION, DEFAULT_INSTRUCTION, *numbers,
                       "- [ ] 0 1 2 3 4 5 6 7 8 9"])
    vocab = {token: i for i, token in SPECIAL_TOKENS.items()}
    pieces = re.findall(PIECE, corpus)
    for piece in pieces + [p.lstrip() for p in pieces] + [" " + p for p in pieces] + ["\n", "\n\n"]:
        if piece and piece not in vocab:
            vocab[piece] = 4 + len(vocab) - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", chat_template=VIDEO_CHAT_TEMPLATE)


def synthetic_video(frames: int, size: tuple[int, int] = FRAME_SIZE, seed: int = 0):
    """A `Video` of ``frames`` random uint8 RGB frames of ``size`` at 1 fps."""
    from v2l_fast.vlm.video import Video

    pixels = np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    return Video.from_frames(pixels, fps=1)


def context_tokens(model_size: str, frames: int, tokenizer=None) -> dict[str, dict[str, int]]:
    """Tokens of each prompt: ``{"video": {total, visual, text}, "lora": {...}}`` for one question.

    ``video``: the in-context prompt of `video_answers` (the video chat template, generation
    prompt on); ``lora``: `question_ids`, what `ask` prefills. ``visual`` counts ``<image>``.
    """
    from v2l_fast.api import question_ids
    from v2l_fast.train.teacher import teacher_prompt
    from v2l_fast.vlm.factory import smolvlm_config
    from v2l_fast.vlm.frames import VideoPreprocessor

    tokenizer = tokenizer or bench_tokenizer()
    config = smolvlm_config(model_size)
    vlm = types.SimpleNamespace(tokenizer=tokenizer, preprocessor=VideoPreprocessor.for_model(config))
    video = synthetic_video(frames, size=(2, 2))  # only the count and timestamps matter here
    ids = tokenizer(teacher_prompt(video, QUESTION, vlm), add_special_tokens=False)["input_ids"]
    question = question_ids(tokenizer, QUESTION)

    def counts(row):
        visual = sum(1 for i in row if i == config.image_token_id)
        return {"total": len(row), "visual": visual, "text": len(row) - visual}

    return {"video": counts(ids), "lora": counts(question)}


# ---------------------------------------------------------------------------------------------
# FLOPs, memory and time estimates


def _shapes(model_size: str):
    from v2l_fast.vlm.factory import SMOLVLM2_SHAPES

    shape = SMOLVLM2_SHAPES[model_size]
    return shape["vision"], shape["text"], shape["scale_factor"]


def vision_flops(model_size: str, frames: int) -> int:
    """Forward FLOPs of the SigLIP encoder and the connector over ``frames`` frames."""
    v, t, scale = _shapes(model_size)
    patches = (v["image_size"] // v["patch_size"]) ** 2
    h, i = v["hidden_size"], v["intermediate_size"]
    per_layer = 2 * patches * (4 * h * h + 2 * h * i) + 4 * patches * patches * h
    embed = 2 * patches * 3 * v["patch_size"] ** 2 * h
    connector = 2 * (patches // scale**2) * h * scale**2 * t["hidden_size"]
    return frames * (v["num_hidden_layers"] * per_layer + embed + connector)


def prefill_flops(model_size: str, tokens: int, lm_head: bool = True) -> int:
    """Forward FLOPs of the text decoder's prefill of ``tokens`` tokens (causal attention), plus
    the LM head of the last position when ``lm_head``."""
    _, t, _ = _shapes(model_size)
    H, I, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    heads, kv = t["num_attention_heads"], t["num_key_value_heads"]
    linear = 2 * tokens * (2 * H * heads * hd + 2 * H * kv * hd + 3 * H * I)
    attention = 2 * tokens * tokens * heads * hd  # QKᵀ and PV over the causal half
    return t["num_hidden_layers"] * (linear + attention) + (2 * H * t["vocab_size"] if lm_head else 0)


def hypernet_flops(model_size: str, tokens: int) -> int:
    """Forward FLOPs of the Frames2LoRA forward on one video of ``tokens`` context tokens: the
    modality projection and the Perceiver blocks over the L·S rows (the rest is < 1 %)."""
    _, t, _ = _shapes(model_size)
    L = t["num_hidden_layers"]
    return projection_flops(L * tokens, t["hidden_size"]) + block_flops(L, tokens, absorbed=True)


def path_flops(model_size: str, frames: int, tokens: dict) -> dict[str, int]:
    video = tokens["video"]["total"]
    return {"video": vision_flops(model_size, frames) + prefill_flops(model_size, video),
            "lora": prefill_flops(model_size, tokens["lora"]["total"]),
            "internalize": vision_flops(model_size, frames) + prefill_flops(model_size, video, lm_head=False)
            + hypernet_flops(model_size, video)}


@functools.cache
def parameter_count(model_size: str) -> int:
    """Parameters of the SmolVLM2 shape, counted on the meta device."""
    from transformers import SmolVLMForConditionalGeneration

    from v2l_fast.vlm.factory import smolvlm_config

    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(smolvlm_config(model_size))
    return sum(p.numel() for p in model.parameters())


def memory_estimate(model_size: str, frames: int, tokens: int) -> int:
    """Rough peak bytes of a point: weights, frames and pixels, the vision encoder's largest
    activations over all frames, the internalization's hidden states and projected rows."""
    v, t, _ = _shapes(model_size)
    size = torch.finfo(DTYPE).bits // 8
    patches = (v["image_size"] // v["patch_size"]) ** 2
    weights = parameter_count(model_size) * size
    pixels = frames * (FRAME_SIZE[0] * FRAME_SIZE[1] * 3 + 3 * v["image_size"] ** 2 * (4 + size))
    vision = frames * patches * (v["intermediate_size"] + 4 * v["hidden_size"]) * size
    L, H = t["num_hidden_layers"], t["hidden_size"]
    text = (L + 2) * tokens * H * size + tokens * t["intermediate_size"] * size
    hypernet = L * tokens * (4 * H + D) * 4  # fp32 projection rows of every layer
    return int(weights + pixels + max(vision, text + hypernet))


class Calibration:
    """What the measured points predict for the others.

    The video path and internalization are compute-bound: seconds per FLOP of the same model's
    measured point (a model without one borrows the last measured point's rate). The LoRA path is
    a prefill of a dozen tokens, dominated by per-call overhead, and does not change with the
    video: the same model's measured time, else the last measured one scaled by the FLOPs.
    """

    def __init__(self):
        self.rate: dict[str, float] = {}
        self.lora: dict[str, tuple[float, int]] = {}
        self.last: str | None = None

    def add(self, model_size: str, seconds: float, flops: int, lora_seconds: float, lora_flops: int) -> None:
        self.rate[model_size] = seconds / flops
        self.lora[model_size] = (lora_seconds, lora_flops)
        self.last = model_size

    def seconds(self, model_size: str, flops: int) -> tuple[float | None, str]:
        """Estimated seconds of a compute-bound call of ``flops`` and where the rate comes from."""
        if model_size in self.rate:
            return flops * self.rate[model_size], f"{model_size}'s measured s/FLOP"
        if self.last is not None:
            return flops * self.rate[self.last], f"{self.last}'s measured s/FLOP (the last measured point)"
        return None, "no point measured yet"

    def lora_seconds(self, model_size: str, flops: int) -> float | None:
        """Estimated seconds of the LoRA path of ``model_size`` (``flops``: its prefill FLOPs)."""
        if model_size in self.lora:
            return self.lora[model_size][0]
        if self.last is None:
            return None
        seconds, measured_flops = self.lora[self.last]
        return seconds * max(1.0, flops / measured_flops)


CALIBRATION = Calibration()


def skip_reason(model_size: str, frames: int, estimate: dict, memory: int) -> str | None:
    """Why this point does not run here (memory first, then time), or None. A GPU runs everything."""
    if ON_GPU:
        return None
    reasons = []
    if memory > MEMORY_BUDGET_BYTES:
        reasons.append(f"does not fit in memory: est. {memory / 2**30:.1f} GiB ({DTYPE_NAME}; weights alone "
                       f"{parameter_count(model_size) * torch.finfo(DTYPE).bits / 8 / 2**30:.1f} GiB) > "
                       f"{MEMORY_BUDGET_BYTES / 2**30:.0f} GiB budget")
    if estimate.get("point_s") is not None and estimate["point_s"] > TIME_BUDGET_S:
        reasons.append(f"skipped: est. {estimate['point_s']:.0f} s on {torch.get_num_threads()} CPU cores "
                       f"({VIDEO_ROUNDS} video rounds of {estimate['video_s']:.0f} s + internalization "
                       f"{estimate['internalize_s']:.0f} s) > {TIME_BUDGET_S:.0f} s budget")
    return "; ".join(reasons) or None


DTYPE_NAME = str(DTYPE).removeprefix("torch.")

# ---------------------------------------------------------------------------------------------
# GPU telemetry


@functools.cache
def _nvml_handle():
    """NVML handle of the current CUDA device (NVML initialised once)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())


class NvmlSampler:
    """NVML power and memory of the current GPU, sampled every ``interval`` s while in the block."""

    def __init__(self, interval: float = 0.01):
        import pynvml

        self.nvml, self.interval, self.handle = pynvml, interval, _nvml_handle()
        self.power_w: list[float] = []
        self.memory_used: list[int] = []

    def _sample(self) -> None:
        self.power_w.append(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3)
        self.memory_used.append(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def __enter__(self):
        self._stop = threading.Event()
        self._sample()
        self._start = time.perf_counter()

        def loop():
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._start

    def summary(self) -> dict:
        mean = statistics.fmean(self.power_w)
        return {"power_mean_w": mean, "power_max_w": max(self.power_w), "energy_j": mean * self.seconds,
                "nvml_memory_used_max_bytes": max(self.memory_used), "samples": len(self.power_w)}


def telemetry(fn):
    """``fn()`` with its torch.cuda peak memory and NVML samples: ``(out, dict)``; CPU: ``(out, None)``."""
    if not ON_GPU:
        return fn(), None
    harness.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        sampler = NvmlSampler()
    except Exception as exc:  # the driver's NVML missing or refused: torch.cuda memory only
        sampler, nvml_error = None, f"nvml unavailable: {exc}"
    if sampler is None:
        out = fn()
        harness.synchronize()
        stats = {"nvml": nvml_error}
    else:
        with sampler:
            out = fn()
            harness.synchronize()
        stats = sampler.summary()
    stats.update(torch_peak_bytes=torch.cuda.max_memory_allocated() - before,
                 torch_peak_total_bytes=torch.cuda.max_memory_allocated())
    return out, stats


# ---------------------------------------------------------------------------------------------
# Models


class Models:
    """One model size at a time (a VLM, a Frames2LoRA and an adapter), warmed up once."""

    def __init__(self):
        self.size = None

    def get(self, model_size: str):
        if self.size != model_size:
            self.__dict__.update(size=None, vlm=None, hypernet=None, adapters=None)
            if ON_GPU:
                torch.cuda.empty_cache()
            self._build(model_size)
            self.size = model_size
        return self

    def _build(self, model_size: str) -> None:
        from v2l_fast.adapters import Adapters, base_fingerprint
        from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig
        from v2l_fast.vlm.factory import random_smolvlm
        from v2l_fast.vlm.frames import VideoPreprocessor
        from v2l_fast.vlm.load import VLM
        from v2l_fast.vlm.lora_patch import decoder_layers

        start = time.perf_counter()
        model = random_smolvlm(model_size, dtype=DTYPE, device=DEVICE)
        self.vlm = VLM(model, bench_tokenizer(), VideoPreprocessor.for_model(model.config, max_frames=max(FRAMES)))
        torch.manual_seed(0)
        with torch.device(DEVICE):
            self.hypernet = Frames2LoRA(Frames2LoRAConfig.for_vlm(model.config, rank=RANK)).eval()
        down = decoder_layers(model)[0].mlp.down_proj
        L = len(decoder_layers(model))
        gen = torch.Generator(DEVICE).manual_seed(1)
        A = torch.randn(1, L, 2 * RANK, down.in_features, generator=gen, device=DEVICE) / down.in_features**0.5
        B = torch.randn(1, L, 2 * RANK, down.out_features, generator=gen, device=DEVICE) * 1e-3
        self.adapters = Adapters(A, B, 2.0 * RANK**1.5, base_fingerprint(model), bias_rank=RANK)
        self.build_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = synthetic_video(1)
        self.video_ttft(warm)
        self.lora_ttft()
        self.internalize(warm)
        self.warmup_s = time.perf_counter() - start

    def video_ttft(self, video):
        from v2l_fast.train.teacher import video_answers

        return video_answers([video], [QUESTION], self.vlm, max_new_tokens=1)

    def lora_ttft(self):
        from v2l_fast.api import ask

        return ask(self.adapters, [QUESTION], vlm=self.vlm, max_new_tokens=1)

    def internalize(self, video):
        from v2l_fast.api import internalize

        return internalize([video], vlm=self.vlm, hypernet=self.hypernet)


MODELS_CACHE = Models()


def lora_backend() -> str:
    from v2l_fast import ops

    return ops.resolve("lora_sgmv", "auto", DEVICE).backend


def timed_call(fn) -> tuple[float, dict | None]:
    start = time.perf_counter()
    _, stats = telemetry(harness.timed(fn))
    return time.perf_counter() - start, stats


def summarize(times: list[float], flops: int, stats: list) -> dict:
    out = {"median_s": statistics.median(times), "min_s": min(times), "rounds": len(times), "raw_s": times,
           "flops": flops, "tflop_s": flops / statistics.median(times) / 1e12}
    if not ON_GPU:
        out["gpu"] = UNMEASURED_GPU
        return out
    out["gpu"] = {"torch_peak_bytes_max": max(stat["torch_peak_bytes"] for stat in stats),
                  "torch_peak_total_bytes_max": max(stat["torch_peak_total_bytes"] for stat in stats),
                  "per_call": stats}
    if all("power_mean_w" in stat for stat in stats):
        out["gpu"].update(power_mean_w=statistics.median(stat["power_mean_w"] for stat in stats),
                          power_max_w=max(stat["power_max_w"] for stat in stats),
                          energy_j_median=statistics.median(stat["energy_j"] for stat in stats),
                          nvml_memory_used_max_bytes=max(stat["nvml_memory_used_max_bytes"] for stat in stats))
    return out


def estimate_of(model_size: str, flops: dict) -> dict:
    video, basis = CALIBRATION.seconds(model_size, flops["video"])
    if video is None:
        return {"basis": basis, "video_s": None, "lora_s": None, "internalize_s": None, "point_s": None}
    lora = CALIBRATION.lora_seconds(model_size, flops["lora"])
    internalize, _ = CALIBRATION.seconds(model_size, flops["internalize"])
    return {"basis": basis, "video_s": video, "lora_s": lora, "internalize_s": internalize,
            "ratio": video / lora if lora else None,
            "point_s": VIDEO_ROUNDS * video + INTERNALIZE_ROUNDS * internalize}


# ---------------------------------------------------------------------------------------------
# Results file and plot


def results_slug() -> str:
    """The device part of the results file names, as `harness.ResultLog` makes it ("cpu", "nvidia-h200")."""
    dev = harness.device_name()
    return "".join(c if c.isalnum() else "-" for c in dev.split(" (")[0]).strip("-").lower()


def write_results(rows: list[dict]) -> list:
    """``ttft_<device>.json`` (earlier rows of points not run again kept) and its PNG plot."""
    from plots import plot_ttft

    harness.RESULTS_DIR.mkdir(exist_ok=True)
    path = harness.RESULTS_DIR / f"ttft_{results_slug()}.json"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    done = {(row["model"], row["frames"]) for row in rows}
    kept = []
    if path.is_file():
        earlier = json.loads(path.read_text())
        kept = [dict(row, date=row.get("date", earlier.get("date"))) for row in earlier.get("results", [])
                if (row.get("model"), row.get("frames")) not in done]
    order = {(m, f): i for i, (m, f) in enumerate((m, f) for m in MODELS for f in FRAMES)}
    results = sorted(kept + [dict(row, date=row.get("date", date)) for row in rows],
                     key=lambda row: order.get((row["model"], row["frames"]), len(order)))
    payload = {
        "device": harness.device_name(), "date": date,
        "versions": {p: harness._version(p) for p in ("torch", "transformers", "v2l_fast", "nvidia-ml-py")},
        "python": platform.python_version(), "dtype": DTYPE_NAME, "cpu_threads": torch.get_num_threads(),
        "gpu_telemetry": "torch.cuda peak memory + NVML power/memory per call" if ON_GPU else UNMEASURED_GPU,
        "method": {
            "video": "video_answers(max_new_tokens=1): preprocessing + vision encoder + prefill + first token",
            "lora": "ask(adapter, max_new_tokens=1): text-only question + LoRAPatch + prefill + first token; "
                    "the adapter exists already (internalization is paid once per video, not per question)",
            "internalize": "internalize(): vision encoder + prefill (hidden states) + Frames2LoRA forward, "
                           "once per video",
            "ratio": "video median / lora median, the same run, interleaved",
            "text_tokens": "counted with a stand-in tokenizer (SmolVLM2 special tokens, BPE-like pieces); visual exact",
            "frames": f"{FRAME_SIZE[0]}x{FRAME_SIZE[1]} uint8 RGB at 1 fps, random pixels",
            "budgets": {"time_s_per_point": TIME_BUDGET_S, "memory_gib": MEMORY_BUDGET_BYTES / 2**30},
        },
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    png = path.with_suffix(".png")
    plot_ttft(payload, png)
    return [path, png]


class _Rows(list):
    """The sweep's rows, written out (JSON and plot) after every point: a run stopped part-way
    (the GPU runbook's per-stage `timeout`) keeps the points it measured."""

    def append(self, row: dict) -> None:
        super().append(row)
        self.paths = write_results(self)


@pytest.fixture(scope="module")
def ttft_rows():
    rows = _Rows()
    yield rows
    for path in getattr(rows, "paths", []):
        print(f"\nbench results: {path}")


# ---------------------------------------------------------------------------------------------
# The sweep


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("model_size", MODELS)
def test_ttft(benchmark, ttft_rows, model_size, frames):
    """TTFT and context tokens of the LoRA answer vs the video in context, one row per point."""
    tokens = context_tokens(model_size, frames)
    flops = path_flops(model_size, frames, tokens)
    memory = memory_estimate(model_size, frames, tokens["video"]["total"])
    estimate = estimate_of(model_size, flops)
    row = {"op": "ttft", "model": model_size, "frames": frames, "dtype": DTYPE_NAME,
           "frame_size": list(FRAME_SIZE), "question": QUESTION, "tokens": tokens,
           "context_ratio": tokens["video"]["total"] / tokens["lora"]["total"],
           "params": parameter_count(model_size), "flops": flops, "memory_estimate_bytes": memory,
           "estimate": estimate}
    reason = skip_reason(model_size, frames, estimate, memory)
    if reason:
        ttft_rows.append(dict(row, status=reason))
        pytest.skip(reason)
    try:
        models = MODELS_CACHE.get(model_size)
        video = synthetic_video(frames)
        times = {"video": [], "lora": [], "internalize": []}
        stats = {"video": [], "lora": [], "internalize": []}
        not_run = [f"not run (V2L_TTFT_INTERNALIZE_ROUNDS={INTERNALIZE_ROUNDS})"]

        steps = {"video": [functools.partial(models.video_ttft, video)],
                 "lora": [models.lora_ttft] * LORA_CALLS_PER_ROUND}

        def run_all():
            for k in range(VIDEO_ROUNDS):  # one video call and the LoRA calls, in turn, each round
                for path in ("video", "lora") if k % 2 == 0 else ("lora", "video"):
                    for step in steps[path]:
                        seconds, stat = timed_call(step)
                        times[path].append(seconds)
                        stats[path].append(stat)
            try:
                for _ in range(INTERNALIZE_ROUNDS):
                    seconds, stat = timed_call(functools.partial(models.internalize, video))
                    times["internalize"].append(seconds)
                    stats["internalize"].append(stat)
            except torch.cuda.OutOfMemoryError:  # the answers were measured: keep them
                times["internalize"].clear()
                not_run.append("out of memory")
                torch.cuda.empty_cache()

        benchmark.pedantic(run_all, rounds=1, iterations=1)
        preprocess_s, _ = timed_call(functools.partial(models.vlm.preprocessor.pixel_values, video))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        ttft_rows.append(dict(row, status="out of memory"))
        pytest.skip(f"out of memory: {model_size} at {frames} frames")
    result = {path: summarize(times[path], flops[path], stats[path]) for path in times if times[path]}
    result.setdefault("internalize", not_run[-1])
    result["video"]["preprocess_s"] = preprocess_s
    internalized = isinstance(result["internalize"], dict)
    CALIBRATION.add(model_size, result["video"]["median_s"], flops["video"], result["lora"]["median_s"], flops["lora"])
    row.update(result, status="measured", lora_backend=lora_backend(),
               ratio_median=result["video"]["median_s"] / result["lora"]["median_s"],
               ratio_min=result["video"]["min_s"] / result["lora"]["min_s"],
               internalize_over_video=result["internalize"]["median_s"] / result["video"]["median_s"]
               if internalized else None,
               model_build_s=models.build_s, model_warmup_s=models.warmup_s,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               peak_rss_note="process peak RSS so far (monotonic over the run)")
    ttft_rows.append(row)

