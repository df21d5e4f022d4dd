"""``v2l-fast demo``: the main job on the embedded default, offline.

By default the trained toy model shipped in the package (`v2l_fast.data.embedded`: a tiny
SmolVLM2 trained on the synthetic world and its Frames2LoRA) internalizes each sample clip once,
then answers the clip's questions with only the adapter — zero visual tokens — and, for
comparison, with the video in its context; each answer is printed beside the other and the
ground truth, with the tokens in each context and the time to first token of both ways.
``--video PATH`` runs it on your own clip (of the same synthetic world for the toy model),
``--vlm/--hypernet`` on real SmolVLM2 + Frames2LoRA weights, and ``--random`` on a tiny random
SmolVLM2 and a fresh Frames2LoRA (the answers are then meaningless; it shows the path only).
Every run also saves the adapters, reloads them and checks that the answers do not change.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

import v2l_fast
from v2l_fast.cli.common import PROG, Stages, add_runtime_options, format_backends, load_models, positive_int, shape
from v2l_fast.errors import fail
from v2l_fast.ops.registry import current_backend

DEMO_QUESTIONS = ("How many shapes are there?", "What colour is the circle?", "Which way does the red shape move?")
RANDOM_WEIGHTS_WARNING = (
    "WARNING: --random: the weights are RANDOM (a tiny SmolVLM2 and a fresh Frames2LoRA), so the "
    "answers are meaningless text. It shows the path, the shapes, the token counts and the timings. "
    "Without --random the demo runs the trained embedded default; --vlm HUB_ID_OR_DIR --hypernet CKPT "
    "runs real weights.")


def add_parser(commands) -> None:
    """Add the ``demo`` subcommand to ``commands`` (an argparse subparsers action)."""
    demo = commands.add_parser("demo", help="internalize sample clips with the trained embedded toy model and "
                               "answer with zero visual tokens, beside the video-in-context answer and the truth")
    demo.add_argument("--video", nargs="+", metavar="PATH",
                      help="your own clip(s) instead of the sample clips (for the toy model: clips of the "
                      "synthetic world, `v2l-fast world`)")
    demo.add_argument("--questions", nargs="+", metavar="Q",
                      help="questions to ask about every clip (default: each sample clip's own questions; "
                      f"for --video or --random: {' / '.join(DEMO_QUESTIONS)})")
    demo.add_argument("--vlm", metavar="HUB_ID_OR_DIR", help="a real SmolVLM2 instead of the toy (with --hypernet)")
    demo.add_argument("--hypernet", metavar="CKPT", help="its Frames2LoRA checkpoint (with --vlm)")
    demo.add_argument("--random", action="store_true",
                      help="a tiny RANDOM SmolVLM2 and a fresh Frames2LoRA on a synthetic video: the path, "
                      "shapes and timings only (meaningless answers)")
    demo.add_argument("--frames", type=positive_int, default=8,
                      help="--random: seconds of the synthetic video, 1 frame each (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="--random: seed of the random weights (default: 0)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer length limit (default: 16)")
    add_runtime_options(demo)
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
    """Record ``(input_ids, attention_mask, frames)`` of every context the VLM reads (frames: the
    pixel frames passed in, 0 for none): each ``generate`` call's prompt, and each forward of the
    VLM body outside ``generate`` (internalization's feature pass).

    These are the ids the language model actually receives, so the visual-token counts in the
    reports are measured, not derived from the prompt text. A prompt's ``<image>`` positions
    carry the video's tokens whether ``generate`` gets pixels or, as `video_answers` passes them
    (made once per video), input embeddings; so ``generate``'s own arguments are recorded, not
    its first forward's (which then receives the embeddings alone).
    """
    from v2l_fast.vlm.features import inner_model

    calls: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
    generating = False

    def record(kwargs) -> None:
        pixels = kwargs.get("pixel_values")
        frames = 0 if pixels is None else int(pixels.shape[:-3].numel())
        calls.append((kwargs.get("input_ids"), kwargs.get("attention_mask"), frames))

    def record_forward(module, args, kwargs):
        if not generating:
            record(kwargs)

    def recorded_generate(**kwargs):
        nonlocal generating
        record(kwargs)
        generating = True
        try:
            return generate(**kwargs)
        finally:
            generating = False

    generate, own = model.generate, model.__dict__.get("generate")
    handle = inner_model(model).register_forward_pre_hook(record_forward, with_kwargs=True)
    model.generate = recorded_generate
    try:
        yield calls
    finally:
        handle.remove()
        if own is None:
            del model.generate  # back to the class's generate
        else:
            model.generate = own


def _context_summary(calls, image_token_id: int) -> tuple[list[int], int, int]:
    """(context tokens per row of the first call, ``<image>`` tokens and pixel frames over all calls)."""
    ids, mask, _ = calls[0]
    lengths = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    visual = sum(int((c[0] == image_token_id).sum()) for c in calls if c[0] is not None)
    return [int(n) for n in lengths], visual, sum(c[2] for c in calls)


def _row(label: str, text: str) -> None:
    print(f"  {label:<13} {text}")


@dataclass
class DemoClip:
    """A clip of the demo: its file, what it is, the questions and (when known) the true answers."""

    path: str
    label: str
    questions: list[str]
    truths: list[str] | None


def _demo_inputs(args, device: torch.device, workdir: str, stage: Stages):
    """(session, clips, what the models are) for the mode the flags ask for."""
    from v2l_fast.data.embedded import embedded_default

    if args.random and (args.vlm or args.hypernet):
        fail("--random", "no --vlm/--hypernet with it (random weights replace them)", "both")
    with stage("load models"):
        if args.random:
            session, embedded = demo_session(args.seed, device, args.frames), None
            what = f"tiny RANDOM SmolVLM2 + fresh Frames2LoRA (seed {args.seed})"
        else:
            session, what, embedded = load_models(args, device)
    default_questions = list(args.questions or DEMO_QUESTIONS)
    if args.video:
        clips = [DemoClip(path, path, default_questions, None) for path in args.video]
    elif args.random:
        path = os.path.join(workdir, "shapes.mp4")
        with stage("write video"):
            written = write_synthetic_video(path, seconds=args.frames, fps=1)
        clips = [DemoClip(path, f"synthetic video (temporary): {written} frames at 1 fps, 96×128, moving shapes",
                          default_questions, None)]
    else:
        samples = embedded if embedded is not None else embedded_default()  # --vlm without --video
        clips = [DemoClip(path, f"sample clip {os.path.basename(path)}",
                          list(args.questions or [row.prompt for row in rows]),
                          None if args.questions else [row.target_text for row in rows])
                 for path, rows in samples.clips]
    return session, clips, what, embedded


def _first_token_ms(fn, *args, **kwargs) -> float:
    """Milliseconds of ``fn(*args, **kwargs)``, a generate call of one new token (prefill + the first token)."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - start) * 1e3


def run_demo(args, device: torch.device) -> int:
    """``v2l-fast demo``: internalize each clip, answer with the adapter and with the video, compare."""
    import v2l_fast.api  # noqa: F401  (imports transformers here, so "load models" times only the load)
    from v2l_fast.train.evaluate import is_correct
    from v2l_fast.train.teacher import video_answers
    from v2l_fast.vlm.video import read_video

    stage = Stages(device)
    with tempfile.TemporaryDirectory(prefix="v2l-fast-demo-") as workdir:
        session, clips, what, embedded = _demo_inputs(args, device, workdir, stage)
        print(f"{PROG} demo: {what}, device {device}")
        if args.random:
            print(RANDOM_WEIGHTS_WARNING)
        elif embedded is not None:
            table = embedded.report.get("accuracy", {})
            if table:
                print("  held-out accuracy of this model (report.json, {} questions): video in context {:.0%}, "
                      "adapter only {:.0%}, neither {:.0%}".format(embedded.report["n"], table["video"]["all"],
                                                                    table["adapter"]["all"], table["none"]["all"]))
        model, hypernet, pre = session.vlm.model, session.hypernet, session.vlm.preprocessor
        text, cfg = model.config.text_config, hypernet.config
        _row("models", f"SmolVLM2: {text.num_hidden_layers} layers, hidden {text.hidden_size}, down_proj "
             f"{text.intermediate_size}→{text.hidden_size}, {sum(p.numel() for p in model.parameters()):,} params")
        _row("", f"Frames2LoRA: rank {cfg.rank} (adapter rank {cfg.adapter_rank}), "
             f"{sum(p.numel() for p in hypernet.parameters()):,} params")
        image_token = model.config.image_token_id
        right = {"adapter": 0, "video": 0}
        scored, same = 0, True
        for n, clip in enumerate(clips, 1):
            print(f"\nclip {n}/{len(clips)}: {clip.label}")
            video = read_video(clip.path, max_frames=pre.max_frames, target_fps=pre.fps)
            with stage("internalize"), _model_inputs(model) as calls:
                adapters = session.internalize([video])
            context, visual, frames = _context_summary(calls, image_token)
            _row("internalize", f"once: {context[0]} context tokens, {visual} visual (<image>) from {frames} "
                 f"frames → A {shape(adapters.A)}, B {shape(adapters.B)}, {stage.seconds['internalize'] * 1e3:.0f} ms")
            questions = clip.questions
            with stage("ask (adapter)"), _model_inputs(model) as calls:
                answers = session.ask(adapters[[0] * len(questions)], questions, max_new_tokens=args.max_new_tokens)
            adapter_context, adapter_visual, _ = _context_summary(calls, image_token)
            with stage("ask (video in context)"), _model_inputs(model) as calls:
                in_context = video_answers([video] * len(questions), questions, session.vlm,
                                           max_new_tokens=args.max_new_tokens)
            video_context, video_visual, _ = _context_summary(calls, image_token)
            ttft_adapter = _first_token_ms(session.ask, adapters[[0]], questions[:1], max_new_tokens=1)
            ttft_video = _first_token_ms(video_answers, [video], questions[:1], session.vlm, max_new_tokens=1)
            _print_answers(questions, answers, in_context, clip.truths)
            if clip.truths is not None:
                scored += len(questions)
                right["adapter"] += sum(map(is_correct, answers, clip.truths))
                right["video"] += sum(map(is_correct, in_context, clip.truths))
            _row("context", f"per question: adapter {min(adapter_context)}–{max(adapter_context)} tokens, "
                 f"{adapter_visual // len(questions)} visual; video in context {min(video_context)}–"
                 f"{max(video_context)} tokens, {video_visual // len(questions)} visual")
            _row("first token", f"adapter {ttft_adapter:.1f} ms vs video in context {ttft_video:.1f} ms "
                 f"({ttft_video / ttft_adapter:.1f}×; one question, the adapter already made)")
            if n == len(clips):
                saved = os.path.join(workdir, "adapters.safetensors")
                adapters.save(saved)
                again = session.ask(session.load_adapters(saved)[[0] * len(questions)], questions,
                                    max_new_tokens=args.max_new_tokens)
                same = again == answers
                _row("save/load", f"{os.path.getsize(saved):,} bytes, base-model fingerprint checked on load; "
                     f"answers with the reloaded adapter: {'identical' if same else 'DIFFERENT'}")
        backends = format_backends(device)
        interpreted = device.type == "cpu" and "=triton" in backends
        print()
        _row("backend", f"{current_backend()}: {backends}"
             + (" (Triton interpreter on the CPU: slow, a correctness check only)" if interpreted else ""))
    if scored:
        print(f"\ncorrect: adapter only (0 visual tokens) {right['adapter']}/{scored}, "
              f"video in context {right['video']}/{scored}")
    print("\ntimings (the last clip)")
    width = max(map(len, stage.seconds))
    for name, seconds in stage.seconds.items():
        print(f"  {name:<{width}}  {seconds * 1e3:9.1f} ms")
    if not same:
        print(f"{PROG} demo: error: the reloaded adapters gave different answers", file=sys.stderr)
        return 1
    return 0


def _print_answers(questions, answers, in_context, truths) -> None:
    """One line per question: the adapter's answer, the in-context answer, the truth (if known)."""
    columns = [("question", questions), ("adapter (0 visual)", answers), ("video in context", in_context)]
    if truths is not None:
        columns.append(("truth", truths))
    widths = [max(len(title), *(len(repr(v) if i else v) for v in values)) for i, (title, values) in enumerate(columns)]
    print("    " + "  ".join(title.ljust(w) for (title, _), w in zip(columns, widths)))
    for k in range(len(questions)):
        cells = [values[k] if i == 0 else repr(values[k]) for i, (_, values) in enumerate(columns)]
        print("    " + "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip())
