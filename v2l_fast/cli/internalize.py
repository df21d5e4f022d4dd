"""``v2l-fast internalize``: videos → one adapters file (one adapter per video, in order).

``--segments N`` (or ``--segment-frames F``) internalizes each video as N consecutive segments in
one batched pass and composes their adapters in rank space (`v2l_fast.long_video`);
``--max-rank K`` re-compresses each video's generated rows to rank K (the bias block kept apart).
"""

from __future__ import annotations

import os

import torch

import v2l_fast
from v2l_fast.cli.common import DTYPES, Stages, add_runtime_options, check_files, format_backends, positive_int, shape
from v2l_fast.errors import fail


def add_parser(commands) -> None:
    """Add the ``internalize`` subcommand to ``commands`` (an argparse subparsers action)."""
    internalize = commands.add_parser("internalize", help="turn videos into one adapters file")
    internalize.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (decoded with PyAV)")
    internalize.add_argument("--vlm", required=True, metavar="HUB_ID_OR_DIR", help="the SmolVLM2")
    internalize.add_argument("--hypernet", required=True, metavar="CKPT",
                             help="Frames2LoRA checkpoint: official .pt, .safetensors or a save_frames2lora directory")
    internalize.add_argument("--out", default="adapters.safetensors", help="adapters file to write "
                             "(default: adapters.safetensors)")
    internalize.add_argument("--batch-size", type=positive_int, help="videos per forward (default: all at once)")
    internalize.add_argument("--max-frames", type=positive_int, help="frames sampled per video, or per segment "
                             "with --segments (default: 12)")
    internalize.add_argument("--segments", type=positive_int, metavar="N",
                             help="long videos: split each video into N consecutive segments, internalize them in "
                             "one batched pass and compose their adapters (rank N·r + r)")
    internalize.add_argument("--segment-frames", type=positive_int, metavar="F",
                             help="long videos: segments of F frames each instead of --segments")
    internalize.add_argument("--max-rank", type=positive_int, metavar="K",
                             help="re-compress each video's generated rows to rank K (the bias block stays apart: "
                             "rank K + r)")
    add_runtime_options(internalize)
    internalize.set_defaults(run=run_internalize)


def run_internalize(args, device: torch.device) -> int:
    """``v2l-fast internalize``: videos → one adapters file (one adapter per video, in order).

``--segments N`` (or ``--segment-frames F``) internalizes each video as N consecutive segments in
one batched pass and composes their adapters in rank space (`v2l_fast.long_video`);
``--max-rank K`` re-compresses each video's generated rows to rank K (the bias block kept apart).
"""
    check_files(args.videos, "video file")
    if args.segments is not None and args.segment_frames is not None:
        fail("--segments", "either --segments or --segment-frames, not both",
             f"--segments {args.segments} and --segment-frames {args.segment_frames}")
    if not os.path.exists(args.hypernet):
        fail("--hypernet", "an existing checkpoint file or directory", repr(args.hypernet))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        fail("--out", "a file path", f"the directory {args.out!r}")
    if not os.path.isdir(out_dir):
        fail("--out", "a file in an existing directory", f"{args.out!r}, whose directory {out_dir!r} does not exist")
    if not os.access(out_dir, os.W_OK):
        fail("--out", "a file in a writable directory", f"{args.out!r}, whose directory {out_dir!r} is not writable")
    stage = Stages(device)
    overrides = {"max_frames": args.max_frames} if args.max_frames else {}
    with stage("load"):
        session = v2l_fast.load(args.vlm, args.hypernet, dtype=DTYPES[args.dtype], device=device, **overrides)
    print(f"loaded {args.vlm} ({args.dtype}, {device}) and {args.hypernet} (rank {session.hypernet.config.rank}) "
          f"in {stage.seconds['load']:.1f} s")
    long = args.segments is not None or args.segment_frames is not None or args.max_rank is not None
    with stage("internalize"):
        if long:
            from v2l_fast.long_video import internalize_long

            adapters = internalize_long(args.videos, vlm=session.vlm, hypernet=session.hypernet,
                                        segments=args.segments, segment_frames=args.segment_frames,
                                        max_rank=args.max_rank, batch_size=args.batch_size)
        else:
            adapters = session.internalize(args.videos, batch_size=args.batch_size)
    adapters.save(args.out)
    how = ""
    if long:
        split = f"{args.segments} segments" if args.segments else \
            f"segments of {args.segment_frames} frames" if args.segment_frames else "1 segment"
        how = f" ({split} each, composed{f', re-compressed to rank {args.max_rank}' if args.max_rank else ''}; " \
              f"bias rank {adapters.bias_rank})"
    print(f"internalized {len(adapters)} videos{how} in {stage.seconds['internalize']:.2f} s → A {shape(adapters.A)}, "
          f"B {shape(adapters.B)}, alpha {adapters.alpha:g} ({format_backends(device)})")
    for index, video in enumerate(args.videos):
        print(f"  adapter {index}: {video}")
    print(f"saved {args.out}")
    return 0
