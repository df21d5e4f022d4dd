"""``v2l-fast train``: train the Frames2LoRA hypernetwork (spec §7) on a manifest with targets.

Settings come from spec §7's defaults, then ``--config FILE`` (JSON, or TOML), then the flags.
The same command runs on one CPU process, on N GPUs (``torchrun --nproc-per-node N -m v2l_fast
train …``) or on N nodes; a run whose ``--out-dir`` holds a checkpoint resumes from it exactly.
"""

from __future__ import annotations

import os
import re

import torch

from v2l_fast.cli.common import PROG, add_runtime_options, add_settings_flags, flag

# One line of help per setting; the default printed after it is TrainConfig's (spec §7's).
HELP = {
    "vlm": "the frozen SmolVLM2 (hub id or directory) whose down_proj the adapters patch (required)",
    "train_manifest": "JSONL manifest of training rows with target_text (v2l-fast teacher / world write "
                      "them; required)",
    "val_manifest": "JSONL manifest of validation rows; its CE picks OUT/best (default: no evaluation)",
    "data_root": "folder relative video paths are resolved against (default: each manifest's folder)",
    "init_hypernet": "(default: a fresh one, seeded) start from this hypernetwork (official .pt, "
                     ".safetensors or save_frames2lora dir); its architecture replaces --rank … "
                     "--num-self-attn-per-block",
    "out_dir": "run folder: checkpoints/, best/, metrics.jsonl; a run resumes from its latest checkpoint",
    "feature_cache": "(default: no cache) cache the frozen VLM's features per video in this folder (keyed "
                     "by a hash of the model and preprocessing) and skip the VLM forward and "
                     "video decode when they are there",
    "rank": "LoRA rank r of a fresh hypernetwork",
    "latent_size": "Perceiver latent width D of a fresh hypernetwork",
    "num_latent_queries": "Perceiver encoder queries Q of a fresh hypernetwork",
    "num_blocks": "Perceiver blocks NB of a fresh hypernetwork",
    "num_self_attn_per_block": "self-attention layers per block NS of a fresh hypernetwork",
    "kl_weight": "weight w of spec §7's optional KL term: loss = CE + w · KL(teacher ‖ student), the teacher "
                 "being the frozen VLM with the video in context (0: off, the CE recipe). Costs one more VLM "
                 "forward over the video per question row, and every video is decoded each step even with "
                 "--feature-cache",
    "kl_temperature": "temperature T > 0 of the KL term: both distributions softened by T, the KL scaled by T²",
    "lr": "AdamW learning rate (peak of the cosine schedule)",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas",
    "eps": "AdamW epsilon",
    "warmup_ratio": "linear warm-up over int(max_steps × ratio) steps, then cosine decay to 0",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "max_steps": "optimizer steps of the run",
    "videos_per_device": "videos per micro-batch on each process",
    "questions_per_video": "rows of one video per item, sharing its adapter (more rows: more items)",
    "grad_accum": "micro-batches accumulated per optimizer step (global batch = videos per device × "
                  "processes × grad_accum)",
    "seed": "seed of the fresh hypernetwork and of the data order",
    "bf16": "bf16 autocast (and the frozen VLM loaded in bf16) where the device multiplies bf16 in "
            "hardware: CUDA, or a CPU with AMX (`v2l-fast info` says); elsewhere fp32",
    "max_frames": "frames sampled per video",
    "instruction": "internalisation text after the video",
    "eval_every": "evaluate the validation CE every N steps (and at the end)",
    "eval_videos": "validation items per evaluation (default: all)",
    "save_every": "write a checkpoint every N steps (and at the end)",
    "keep_last": "step checkpoints kept (OUT/best is kept besides)",
    "num_workers": "DataLoader worker processes decoding videos (0: in the training process)",
    "log_every": "append the step's metrics to metrics.jsonl every N steps",
    "progress": "tqdm progress bar (rank 0)",
}


def add_parser(commands) -> None:
    """Add the ``train`` subcommand to ``commands`` (an argparse subparsers action)."""
    from v2l_fast.train.config import TrainConfig

    train = commands.add_parser(
        "train", help="train the hypernetwork on a manifest (resumable; multi-GPU through torchrun)",
        description="Train the Frames2LoRA hypernetwork with spec §7's teacher-forced CE over answer tokens, "
        "plus an optional KL to the VLM that sees the video (--kl-weight) "
        "(one adapter per video shared by its questions; only the hypernetwork learns). Settings: spec §7's "
        "defaults, then --config, then flags. Distributed: torchrun --nproc-per-node N -m v2l_fast train … "
        "(gloo on CPU, nccl on CUDA; the global batch is videos-per-device × processes × grad-accum); on "
        "several nodes, the same command on each with torchrun's --nnodes M --rdzv-backend c10d --rdzv-endpoint "
        "HOST:PORT, --out-dir on a shared file system. "
        "A run whose --out-dir holds a checkpoint resumes from the latest one exactly.")
    train.add_argument("--config", metavar="FILE", help="JSON (or .toml) file of settings (the names below with "
                       "underscores); flags override it")
    add_settings_flags(train, TrainConfig, HELP)
    add_runtime_options(train, dtype=False)
    train.set_defaults(run=run_train)


def run_train(args, device: torch.device) -> int:
    """``v2l-fast train``: resolve the settings, train (or resume), print the summary (rank 0)."""
    from v2l_fast.train.config import FIELDS, TrainConfig, load_config
    from v2l_fast.train.trainer import train

    config = load_config(args.config) if args.config else TrainConfig()
    overrides = {name: getattr(args, name) for name in FIELDS}
    if overrides["betas"] is not None:
        overrides["betas"] = tuple(overrides["betas"])
    try:
        config = config.replace(**overrides)
    except ValueError as err:  # the file was checked when read: a bad value here is a flag's
        raise ValueError(re.sub(r"^config: (\w+)", lambda m: flag(m[1]), str(err))) from None
    result = train(config, device=device)
    resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
    best = f", best val CE {result.best_val_ce:.4f}" if result.best_val_ce is not None else ""
    loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG} train: step {result.step}/{config.max_steps}{loss}{best}{resumed}; "
              f"checkpoint {result.checkpoint}")
    return 0
