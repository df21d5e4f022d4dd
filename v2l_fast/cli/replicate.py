"""``v2l-fast replicate``: the toy-scale replication of the paper's claim in one resumable command.

World → toy VLM trained with the video in context → teacher targets → hypernetwork → held-out
table (`v2l_fast.train.replicate`). Run it again after a stop and it goes on where it was.
"""

from __future__ import annotations

import dataclasses

import torch

from v2l_fast.cli.common import PROG, add_settings_flags

HELP = {
    "train_clips": "training clips of the synthetic world",
    "val_clips": "validation clips (the VLM's accuracy, the hypernetwork's best checkpoint)",
    "heldout_clips": "held-out clips of the final table (4 questions each)",
    "seed": "seed of the world, the models and the data order",
    "heldout_seed": "separate seed of the held-out clips (default: --seed)",
    "vlm_size": "toy VLM size (S or M)",
    "vlm_steps": "optimizer steps of the toy VLM",
    "vlm_batch_videos": "videos per toy-VLM step (each with all its rows)",
    "vlm_lr": "toy VLM peak learning rate",
    "tokens_per_frame": "<image> tokens per frame of the toy VLM (4, 16 or 64)",
    "vision_warmup_steps": "steps pretraining the toy VLM's vision tower on the clips' scene labels before it "
                           "learns to answer (0: none)",
    "teacher_clips": "training clips whose questions get teacher targets (the hypernetwork's training set)",
    "teacher_batch": "rows per teacher generate call",
    "teacher_max_new_tokens": "teacher answer length limit",
    "rank": "LoRA rank of the hypernetwork's adapters",
    "latent_size": "Perceiver latent width",
    "num_latent_queries": "Perceiver latent queries",
    "num_blocks": "Perceiver blocks",
    "hypernet_steps": "optimizer steps of the hypernetwork",
    "hypernet_lr": "hypernetwork peak learning rate",
    "videos_per_step": "videos per hypernetwork step (each with its questions)",
    "eval_batch": "videos per internalize forward and questions per generate call in the evaluation",
}


def add_parser(commands) -> None:
    """Add the ``replicate`` subcommand to ``commands`` (an argparse subparsers action)."""
    from v2l_fast.train.replicate import ReplicateSettings

    parser = commands.add_parser(
        "replicate", help="toy replication: world, toy VLM, teacher, hypernetwork, held-out table (resumable)",
        description="Train a tiny SmolVLM2 on synthetic clips with the video in context, freeze it, make teacher "
        "targets, train the Frames2LoRA hypernetwork, and compare on held-out clips (a) the video in context, "
        "(b) the generated adapter with zero visual tokens, (c) neither. The defaults are the recipe sized for "
        "45 minutes on 2 CPU cores (measured end to end: 24-25 min, README). A stopped run resumes when "
        "started again with the same OUT_DIR and settings.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="run folder (world/, vlm/, teacher/, hypernet/, "
                        "report.json)")
    add_settings_flags(parser, ReplicateSettings, HELP)
    parser.add_argument("--quick", action="store_true",
                        help="a few-second run of every stage on a tiny world (checks the pipeline; not a replication)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_replicate)


def run_replicate(args, device: torch.device) -> int:
    """``v2l-fast replicate``: run or resume the five stages; print the held-out table and timings."""
    from v2l_fast.train.evaluate import GOAL_QUESTIONS, EvalReport
    from v2l_fast.train.replicate import QUICK, ReplicateSettings, replicate

    base = QUICK if args.quick else ReplicateSettings()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReplicateSettings)
                 if getattr(args, f.name) is not None}
    settings = dataclasses.replace(base, **overrides)
    report = replicate(args.out_dir, settings, progress=not args.quiet)
    print()
    print(EvalReport.from_json(report).table())
    timings = report["timings"]
    print("\nwall time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items()))
    if report["n"] < GOAL_QUESTIONS:
        print(f"(only {report['n']} held-out questions: the goal needs {GOAL_QUESTIONS})")
    print(f"\nwrote {args.out_dir}/report.json; the models: {args.out_dir}/vlm, {args.out_dir}/hypernet/best/hypernet")
    print(f"try them: {PROG} demo --vlm {args.out_dir}/vlm --hypernet {args.out_dir}/hypernet/best/hypernet")
    return 0
