"""``v2l-fast evaluate``: held-out accuracy of the VLM with the video in context, with only the
generated adapter (zero visual tokens), and with neither; the table on stdout, JSON on request."""

from __future__ import annotations

import json
import os

import torch

import v2l_fast
from v2l_fast.cli.common import DTYPES, Stages, add_runtime_options, check_files, format_backends, positive_int
from v2l_fast.errors import fail


def add_parser(commands) -> None:
    """Add the ``evaluate`` subcommand to ``commands`` (an argparse subparsers action)."""
    evaluate = commands.add_parser("evaluate", help="held-out accuracy: video in context vs adapter vs neither")
    evaluate.add_argument("manifest", metavar="MANIFEST",
                          help="JSONL manifest with target_text (question rows: task_type qa; others are left out)")
    evaluate.add_argument("--vlm", required=True, metavar="HUB_ID_OR_DIR", help="the frozen SmolVLM2")
    evaluate.add_argument("--hypernet", required=True, metavar="CKPT",
                          help="Frames2LoRA checkpoint: official .pt, .safetensors or a save_frames2lora directory")
    evaluate.add_argument("--out", metavar="JSON", help="write the report (with every answer) as JSON here")
    evaluate.add_argument("--limit", type=positive_int, help="evaluate only the first N questions (default: all)")
    evaluate.add_argument("--batch-size", type=positive_int, default=8,
                          help="videos per internalize forward and questions per generate call (default: 8)")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=8, help="answer length limit (default: 8)")
    evaluate.add_argument("--data-root", metavar="DIR",
                          help="folder relative video paths are resolved against (default: the manifest's folder)")
    add_runtime_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args, device: torch.device) -> int:
    """``v2l-fast evaluate``: answer MANIFEST's questions in the three modes; print the table."""
    from v2l_fast.train.evaluate import evaluate

    check_files([args.manifest], "manifest")
    if not os.path.exists(args.hypernet):
        fail("--hypernet", "an existing checkpoint file or directory", repr(args.hypernet))
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail("--out", "a file in an existing directory", repr(args.out))
    stage = Stages(device)
    with stage("load"):
        session = v2l_fast.load(args.vlm, args.hypernet, dtype=DTYPES[args.dtype], device=device)
    print(f"loaded {args.vlm} ({args.dtype}, {device}) and {args.hypernet} in {stage.seconds['load']:.1f} s")
    with stage("evaluate"):
        report = evaluate(args.manifest, vlm=session.vlm, hypernet=session.hypernet, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, limit=args.limit, data_root=args.data_root)
    print(f"evaluated {report.n} questions in {stage.seconds['evaluate']:.1f} s ({format_backends(device)})\n")
    print(report.table())
    if args.out is not None:
        report.settings.update(vlm=args.vlm, hypernet=args.hypernet, dtype=args.dtype)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report.to_json(), handle, indent=1, ensure_ascii=False)
            handle.write("\n")
        print(f"\nwrote {args.out}")
    return 0
