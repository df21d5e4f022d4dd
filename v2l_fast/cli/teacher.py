"""``v2l-fast teacher``: fill a manifest's targets with the frozen VLM's answers (video in context).

Resumable: run the same command again after a kill and it goes on from the last finished batch.
"""

from __future__ import annotations

import torch

from v2l_fast.cli.common import DTYPES, Stages, add_dtype_option, positive_int


def add_parser(commands) -> None:
    """Add the ``teacher`` subcommand to ``commands`` (an argparse subparsers action)."""
    teacher = commands.add_parser("teacher", help="write teacher targets into a new manifest (resumable)")
    teacher.add_argument("manifest_in", metavar="IN", help="JSONL manifest (id, video_path, prompt, …)")
    teacher.add_argument("manifest_out", metavar="OUT", help="JSONL manifest to write, rows in input order")
    teacher.add_argument("--vlm", required=True, metavar="HUB_ID_OR_DIR", help="the teacher SmolVLM2")
    teacher.add_argument("--batch-size", type=positive_int, default=8, help="rows per generate call (default: 8)")
    teacher.add_argument("--max-new-tokens", type=positive_int, default=64, help="answer length limit (default: 64)")
    teacher.add_argument("--max-frames", type=positive_int, default=12, help="frames sampled per video (default: 12)")
    teacher.add_argument("--data-root", metavar="DIR",
                         help="folder relative video paths are resolved against (default: the manifest's folder)")
    teacher.add_argument("--skip-bad-rows", action="store_true",
                         help="leave out bad rows and unreadable videos (listed) instead of stopping")
    teacher.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    teacher.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_dtype_option(teacher)
    teacher.set_defaults(run=run_teacher)


def run_teacher(args, device: torch.device) -> int:
    """``v2l-fast teacher``: answer every row of IN with the video in context; write OUT."""
    from v2l_fast.train.teacher import make_teacher_targets, partial_path
    from v2l_fast.vlm import load_smolvlm

    stage = Stages(device)
    with stage("load"):
        vlm = load_smolvlm(args.vlm, dtype=DTYPES[args.dtype], device=device)
    print(f"loaded {args.vlm} ({args.dtype}, {device}) in {stage.seconds['load']:.1f} s")
    with stage("teacher"):
        report = make_teacher_targets(args.manifest_in, args.manifest_out, vlm=vlm, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens, max_frames=args.max_frames,
                                      data_root=args.data_root, skip_bad_rows=args.skip_bad_rows,
                                      overwrite=args.overwrite, teacher_name=args.vlm)
    resumed = f" ({report.resumed} of them from {partial_path(args.manifest_out)})" if report.resumed else ""
    print(f"wrote {report.written} rows{resumed} to {args.manifest_out} in {stage.seconds['teacher']:.1f} s")
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad rows:")
        for reason in report.skipped:
            print(f"  {reason}")
    return 0
