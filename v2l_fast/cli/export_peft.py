"""``v2l-fast export-peft``: one adapter of an adapters file → a PEFT LoRA directory for peft and vLLM,
optionally with the bias block folded into a saved copy of the base model (docs/peft_vllm.md)."""

from __future__ import annotations

import json
import os

import torch

from v2l_fast.adapters import Adapters
from v2l_fast.adapters.fold import read_folded_bias
from v2l_fast.adapters.peft import CONFIG_FILE, VLLM_LORA_RANKS, export_folded_base, export_peft
from v2l_fast.cli.common import DTYPES, check_files
from v2l_fast.errors import fail


def _rank(text: str) -> int:
    """argparse type of ``--max-rank``: one of vLLM's ranks."""
    import argparse

    if text.isdigit() and int(text) in VLLM_LORA_RANKS:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected one of vLLM's ranks {list(VLLM_LORA_RANKS)}, got {text!r}")


def add_parser(commands) -> None:
    """Add the ``export-peft`` subcommand to ``commands`` (an argparse subparsers action)."""
    export = commands.add_parser(
        "export-peft", help="write one adapter as a PEFT LoRA directory (for peft and vLLM)",
        description="Write adapter I (--index) of ADAPTERS_FILE as a PEFT LoRA directory OUT_DIR "
        "(adapter_config.json + adapter_model.safetensors, target down_proj, lora_alpha = r with alpha folded "
        "into lora_B). The rank is padded with zero rows to the next rank vLLM accepts. With --folded-base-out, "
        "the hypernetwork's shared bias block is folded into a copy of the base model written there, and OUT_DIR "
        "holds the per-video rows only, for that base; with --folded-base, for a folded base written before. "
        "See docs/peft_vllm.md.")
    export.add_argument("adapters_file", metavar="ADAPTERS_FILE",
                        help="adapters file written by `v2l-fast internalize`")
    export.add_argument("out_dir", metavar="OUT_DIR", help="PEFT adapter directory to create (must not exist)")
    export.add_argument("--index", type=int, default=0, metavar="I",
                        help="which adapter (video) of the file, 0-based (default: 0)")
    export.add_argument("--max-rank", type=_rank, metavar="K",
                        help=f"largest rank of the export, one of {list(VLLM_LORA_RANKS)} (vLLM's --max-lora-rank); "
                        "a higher-rank adapter is re-compressed to its best rank-K approximation (default: only "
                        "pad the rank)")
    export.add_argument("--base-name", metavar="NAME",
                        help="base_model_name_or_path written to adapter_config.json (default: the name the adapters "
                        "record, or the folded base directory)")
    export.add_argument("--folded-base-out", metavar="DIR",
                        help="also fold the bias block into the base model and save it to DIR (must not exist); "
                        "OUT_DIR then holds the per-video rows only, to be served on DIR. Needs --vlm")
    export.add_argument("--folded-base", metavar="DIR",
                        help="a folded base written before by --folded-base-out: export the per-video rows only, "
                        "for it (its bias block is checked to be the adapters')")
    export.add_argument("--vlm", metavar="HUB_ID_OR_DIR",
                        help="the SmolVLM2 the adapters were made for (with --folded-base-out); its processor files "
                        "are copied to DIR")
    export.add_argument("--hypernet", metavar="CKPT",
                        help="the Frames2LoRA checkpoint that made the adapters (with --folded-base-out): its bias "
                        "block is folded, after checking that the adapters carry the same one (default: the bias "
                        "block the adapters carry)")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weight dtype of the folded base model (default: bf16, as the official pipeline)")
    export.add_argument("--device", help="torch device of the fold (default: cuda when available, else cpu)")
    export.set_defaults(run=run_export_peft)


def run_export_peft(args, device: torch.device) -> int:
    """``v2l-fast export-peft``: write the PEFT directory (and the folded base); report what was written."""
    check_files([args.adapters_file], "ADAPTERS_FILE")
    outs = [("OUT_DIR", args.out_dir)] + ([("--folded-base-out", args.folded_base_out)] if args.folded_base_out else [])
    for name, path in outs:
        if os.path.lexists(path):
            fail(name, "a path that does not exist yet (an export never overwrites)", repr(path))
    if args.folded_base_out and args.folded_base:
        fail("--folded-base", "either --folded-base (an existing folded base) or --folded-base-out (a new one)",
             "both")
    if args.folded_base_out:
        if os.path.abspath(args.folded_base_out) == os.path.abspath(args.out_dir):
            fail("--folded-base-out", "a directory other than OUT_DIR", repr(args.folded_base_out))
        if not args.vlm:
            fail("--vlm", "the base model (hub id or directory) to fold, with --folded-base-out", "none")
    elif args.vlm or args.hypernet:
        fail("--vlm/--hypernet", "only with --folded-base-out (they name the base model to fold)",
             f"--vlm {args.vlm!r}, --hypernet {args.hypernet!r}")
    adapters = Adapters.load(args.adapters_file)
    if not 0 <= args.index < len(adapters):
        fail("--index", f"an int in [0, {len(adapters)}) (the file holds {len(adapters)} adapters)", args.index)
    folded, folded_dir = None, args.folded_base_out or args.folded_base
    if args.folded_base_out:
        folded = _fold(args, adapters, device)
    elif args.folded_base:
        folded = read_folded_bias(args.folded_base)
    name = args.base_name or (os.path.abspath(folded_dir) if folded_dir else None)
    export_peft(adapters, args.out_dir, index=args.index, base_model_name_or_path=name, max_rank=args.max_rank,
                folded=folded)
    with open(os.path.join(args.out_dir, CONFIG_FILE), encoding="utf-8") as handle:
        rank = json.load(handle)["r"]
    rows = adapters.rank - (adapters.bias_rank if folded is not None else 0)
    how = f"re-compressed to {rank}" if rank < rows else f"+ {rank - rows} zero rows" if rank > rows else "as is"
    print(f"wrote {args.out_dir}: adapter {args.index} of {args.adapters_file}, rank {rank} = lora_alpha "
          f"({rows} adapter rows {how}), target down_proj")
    base = folded_dir or args.vlm or adapters.base.get("name") or "BASE_MODEL"
    print(f"serve: vllm serve {base} --enable-lora --max-lora-rank {rank} "
          f"--lora-modules video{args.index}={args.out_dir}")
    return 0


def _fold(args, adapters: Adapters, device: torch.device):
    """Load the VLM, fold the bias block (the hypernetwork's or the adapters'), save it to --folded-base-out."""
    from v2l_fast.vlm import load_smolvlm

    bias_A, bias_B = adapters.bias_block()
    alpha = adapters.alpha
    vlm = load_smolvlm(args.vlm, dtype=DTYPES[args.dtype], device=device)
    adapters.check_base(vlm.model, name=f"adapters in {args.adapters_file!r}")
    if args.hypernet:
        from v2l_fast.hypernet import load_frames2lora

        hypernet = load_frames2lora(args.hypernet, expect=vlm.model.config)
        theirs = hypernet.bias_A["down_proj"].detach(), hypernet.bias_B["down_proj"].detach()
        if not (torch.equal(theirs[0], bias_A) and torch.equal(theirs[1], bias_B)
                and hypernet.config.lora_alpha == alpha):
            fail("--hypernet", "the hypernetwork that made the adapters (the same bias block and alpha)",
                 f"{args.hypernet!r}, whose bias block or alpha differs from the adapters'")
        bias_A, bias_B = theirs
    folded = export_folded_base(vlm, bias_A, bias_B, alpha, args.folded_base_out, source=args.vlm)
    print(f"wrote {args.folded_base_out}: {args.vlm} ({args.dtype}) with the bias block folded into down_proj "
          f"(rank {folded.rank}, alpha {folded.alpha:g}, digest {folded.digest[:12]})")
    return folded
