"""``v2l-fast world``: write the synthetic video world (`v2l_fast.data.synthetic`) for offline
training and evaluation: clips of moving shapes, captions and closed-vocabulary questions,
``train`` / ``val`` / ``heldout`` manifests in the authors' row format."""

from __future__ import annotations

import argparse
import time

import torch

from v2l_fast.cli.common import PROG, positive_int


def _count(text: str) -> int:
    """argparse type: an int ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def add_parser(commands) -> None:
    """Add the ``world`` subcommand to ``commands`` (an argparse subparsers action)."""
    world = commands.add_parser("world", help="write the synthetic video world (clips, captions, questions; "
                                "train / val / heldout manifests)")
    world.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (videos/, *.jsonl, world.json)")
    world.add_argument("--train", type=positive_int, default=1000, help="training clips (default: 1000)")
    world.add_argument("--val", type=_count, default=100, help="validation clips (default: 100)")
    world.add_argument("--heldout", type=_count, default=100, help="held-out clips (default: 100)")
    world.add_argument("--seed", type=int, default=0, help="seed of the world (default: 0)")
    world.add_argument("--heldout-seed", type=int, help="separate seed of the held-out clips (default: --seed)")
    world.add_argument("--frames", type=int, default=8, help="frames per clip, written at 1 fps (default: 8)")
    world.add_argument("--size", type=int, default=64, help="frame side in pixels, even, ≥ 32 (default: 64)")
    world.add_argument("--questions", type=positive_int, default=4,
                       help="questions per clip, besides its caption (default: 4)")
    world.add_argument("--quiet", action="store_true", help="no progress bar")
    world.set_defaults(run=run_world)


def run_world(args, device: torch.device) -> int:
    """``v2l-fast world``: write the world, then print each manifest with its clip and row counts."""
    from v2l_fast.data.synthetic import generate_world

    start = time.perf_counter()
    manifests = generate_world(args.out_dir, num_train=args.train, num_val=args.val, num_heldout=args.heldout,
                               seed=args.seed, heldout_seed=args.heldout_seed, frames=args.frames,
                               size=args.size, questions_per_clip=args.questions, progress=not args.quiet)
    seconds = time.perf_counter() - start
    clips = {"train": args.train, "val": args.val, "heldout": args.heldout}
    print(f"{PROG} world: {sum(clips.values())} clips of {args.frames} frames at {args.size}×{args.size} "
          f"in {args.out_dir} ({seconds:.1f} s, seed {args.seed})")
    for split, path in manifests.items():
        with open(path, encoding="utf-8") as f:
            rows = sum(1 for _ in f)
        print(f"  {split:<8} {clips[split]:>6} clips  {rows:>7} rows  {path}")
    return 0
