"""``v2l-fast internalize``: videos → one adapters file (one adapter per video, in order)."""

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
    internalize.add_argument("--max-frames", type=positive_int, help="frames sampled per video (default: 12)")
    add_runtime_options(internalize)
    internalize.set_defaults(run=run_internalize)


def run_internalize(args, device: torch.device) -> int:
    """``v2l-fast internalize``: videos → one adapters file (one adapter per video, in order)."""
    check_files(args.videos, "video file")
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
    with stage("internalize"):
        adapters = session.internalize(args.videos, batch_size=args.batch_size)
    adapters.save(args.out)
    print(f"internalized {len(adapters)} videos in {stage.seconds['internalize']:.2f} s → A {shape(adapters.A)}, "
          f"B {shape(adapters.B)}, alpha {adapters.alpha:g} ({format_backends(device)})")
    for index, video in enumerate(args.videos):
        print(f"  adapter {index}: {video}")
    print(f"saved {args.out}")
    return 0
