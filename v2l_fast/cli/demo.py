"""``v2l-fast demo``: the whole path on an embedded default that needs no download.

A tiny random SmolVLM2 and a fresh Frames2LoRA (from ``--seed``) internalize a synthetic video
of moving shapes, answer questions with zero visual tokens, save and reload the adapters and
answer again; the report gives the shapes, the visual tokens the model received, the timing
of each stage and the backend of each op. The weights are random: the answers are meaningless.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import torch

import v2l_fast
from v2l_fast.cli.common import PROG, Stages, add_runtime_options, format_backends, positive_int, shape
from v2l_fast.ops.registry import current_backend

DEMO_QUESTIONS = ("What is moving in the video?", "What colour is the square?", "Where does the circle go?")
RANDOM_WEIGHTS_WARNING = (
    "WARNING: the demo's weights are RANDOM (a tiny SmolVLM2 and a fresh Frames2LoRA, nothing is "
    "downloaded), so the answers are meaningless text. It shows the path, the shapes, the token "
    "counts and the timings. For real answers pass real weights: "
    f"`{PROG} internalize VIDEO --vlm HUB_ID_OR_DIR --hypernet CKPT`, then `{PROG} ask ...`.")


def add_parser(commands) -> None:
    """Add the ``demo`` subcommand to ``commands`` (an argparse subparsers action)."""
    demo = commands.add_parser("demo", help="the whole path on a tiny random model and a synthetic video "
                               "(no downloads; the answers are meaningless)")
    demo.add_argument("--frames", type=positive_int, default=8, help="frames the model sees (default: 8)")
    demo.add_argument("--questions", nargs="+", default=list(DEMO_QUESTIONS), metavar="Q",
                      help="questions to ask about the video")
    demo.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer length limit (default: 16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    add_runtime_options(demo, dtype=False)
    demo.set_defaults(run=run_demo)


def write_synthetic_video(path: str | os.PathLike, seconds: int, *, fps: int = 4,
                          size: tuple[int, int] = (96, 128)) -> int:
    """Encode ``seconds`` s of moving coloured shapes (a red square crossing left to right, a
    green disc falling) at ``fps`` with PyAV (mpeg4, yuv420p); return the frames written."""
    from v2l_fast.vlm.video import write_video

    height, width = size
    rows, cols = np.mgrid[:height, :width]
    total = seconds * fps
    frames = np.empty((total, height, width, 3), dtype=np.uint8)
    frames[:] = (30, 30, 70)
    for t, frame in enumerate(frames):
        progress = t / max(total - 1, 1)
        left = int(progress * (width - 24))
        frame[16:40, left:left + 24] = (230, 40, 40)
        centre = (10 + progress * (height - 20), width - 28)
        frame[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 81] = (40, 220, 60)
    write_video(path, frames, fps=fps)
    return total


def demo_session(seed: int, device: torch.device, max_frames: int):
    """A `Session` of a tiny random SmolVLM2 and a small fresh Frames2LoRA, both from ``seed``.

    A fresh hypernetwork's ``scaler_B`` and ``bias_B`` are zero (spec §4), which would make
    every adapter's B zero and the adapters no-ops; they are drawn at random instead so the
    adapters change the answer model.
    """
    from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig
    from v2l_fast.hypernet.model import TARGET_MODULE
    from v2l_fast.vlm.factory import tiny_vlm

    vlm = tiny_vlm(seed, max_frames=max_frames)
    vlm.model.to(device)
    torch.manual_seed(seed)
    config = Frames2LoRAConfig.for_vlm(vlm.model.config, rank=4, latent_size=64, num_latent_queries=8, num_blocks=2)
    hypernet = Frames2LoRA(config)
    with torch.no_grad():
        hypernet.scaler_B[TARGET_MODULE].normal_(0, 0.5)
        hypernet.bias_B[TARGET_MODULE].normal_(0, 0.05)
    return v2l_fast.Session(vlm, hypernet.to(device).eval())


@contextmanager
def _model_inputs(model: torch.nn.Module):
    """Record ``(input_ids, attention_mask, frames)`` of every forward of the VLM body (frames:
    the pixel frames passed in, 0 for none).

    This is what the language model actually receives, so the visual-token counts in the
    reports are measured, not derived from the prompt text.
    """
    from v2l_fast.vlm.features import inner_model

    calls: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []

    def record(module, args, kwargs):
        pixels = kwargs.get("pixel_values")
        frames = 0 if pixels is None else int(pixels.shape[:-3].numel())
        calls.append((kwargs.get("input_ids"), kwargs.get("attention_mask"), frames))

    handle = inner_model(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _context_summary(calls, image_token_id: int) -> tuple[list[int], int, int]:
    """(context tokens per row of the first call, ``<image>`` tokens and pixel frames over all calls)."""
    ids, mask, _ = calls[0]
    lengths = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    visual = sum(int((c[0] == image_token_id).sum()) for c in calls if c[0] is not None)
    return [int(n) for n in lengths], visual, sum(c[2] for c in calls)


def _row(label: str, text: str) -> None:
    print(f"  {label:<13} {text}")


def run_demo(args, device: torch.device) -> int:
    """``v2l-fast demo``: internalize a synthetic video with random weights, ask, save, reload."""
    import v2l_fast.api  # noqa: F401  (imports transformers here, so "build models" times only the build)

    stage = Stages(device)
    questions = list(args.questions)
    print(f"{PROG} demo: tiny random SmolVLM2 + fresh Frames2LoRA on a synthetic video, device {device}")
    print(RANDOM_WEIGHTS_WARNING + "\n")
    with tempfile.TemporaryDirectory(prefix="v2l-fast-demo-") as workdir:
        with stage("build models"):
            session = demo_session(args.seed, device, args.frames)
        model, hypernet = session.vlm.model, session.hypernet
        text, cfg = model.config.text_config, hypernet.config
        _row("models", f"SmolVLM2 tiny: {text.num_hidden_layers} layers, hidden {text.hidden_size}, down_proj "
             f"{text.intermediate_size}→{text.hidden_size}, {sum(p.numel() for p in model.parameters()):,} params")
        _row("", f"Frames2LoRA: rank {cfg.rank} (adapter rank {cfg.adapter_rank}), "
             f"{sum(p.numel() for p in hypernet.parameters()):,} params, seed {args.seed}")

        video = os.path.join(workdir, "shapes.mp4")
        with stage("write video"):
            written = write_synthetic_video(video, seconds=args.frames)
        _row("video", f"{video} (temporary): {written} frames at 4 fps ({args.frames} s), 96×128, moving shapes")

        image_token = model.config.image_token_id
        with stage("internalize"), _model_inputs(model) as calls:
            adapters = session.internalize([video])
        context, visual, frames = _context_summary(calls, image_token)
        _row("internalize", f"1 video → A {shape(adapters.A)}, B {shape(adapters.B)}, alpha {adapters.alpha:g}")
        _row("", f"context: {context[0]} tokens, {visual} of them visual (<image>), from {frames} frames "
             f"× {session.vlm.preprocessor.image_seq_len}")

        with stage("ask"), _model_inputs(model) as calls:
            answers = session.ask(adapters[[0] * len(questions)], questions, max_new_tokens=args.max_new_tokens)
        context, visual, frames = _context_summary(calls, image_token)
        _row("ask", f"{len(questions)} questions with the video's adapter, greedy, ≤ {args.max_new_tokens} new tokens")
        _row("", f"context: {min(context)}–{max(context)} tokens per question, {visual} visual, {frames} frames "
             f"(over {len(calls)} model calls: prefill + decode)")

        saved = os.path.join(workdir, "adapters.safetensors")
        with stage("save adapters"):
            adapters.save(saved)
        with stage("load adapters"):
            loaded = session.load_adapters(saved)
        with stage("ask (loaded)"):
            again = session.ask(loaded[[0] * len(questions)], questions, max_new_tokens=args.max_new_tokens)
        same = again == answers
        _row("save/load", f"{os.path.getsize(saved):,} bytes, base-model fingerprint checked on load; answers "
             f"with the loaded adapters: {'identical' if same else 'DIFFERENT'}")
        backends = format_backends(device)
        interpreted = device.type == "cpu" and "=triton" in backends
        _row("backend", f"{current_backend()}: {backends}"
             + (" (Triton interpreter on the CPU: slow, a correctness check only)" if interpreted else ""))

    print("\nanswers (meaningless: random weights)")
    for question, answer in zip(questions, answers):
        print(f"  Q: {question}\n  A: {answer!r}")
    print("\ntimings")
    for name, seconds in stage.seconds.items():
        _row(name, f"{seconds * 1e3:9.1f} ms")
    if not same:
        print(f"{PROG} demo: error: the reloaded adapters gave different answers", file=sys.stderr)
        return 1
    return 0
