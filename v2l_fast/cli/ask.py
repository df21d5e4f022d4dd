"""``v2l-fast ask``: answer questions with saved adapters, zero visual tokens in the context."""

from __future__ import annotations

import torch

from v2l_fast.cli.common import DTYPES, Stages, add_runtime_options, check_files, format_backends, positive_int
from v2l_fast.errors import fail


def add_parser(commands) -> None:
    """Add the ``ask`` subcommand to ``commands`` (an argparse subparsers action)."""
    ask = commands.add_parser("ask", help="answer questions with saved adapters, zero visual tokens")
    ask.add_argument("adapters", metavar="ADAPTERS", help="file written by `internalize`")
    ask.add_argument("questions", nargs="+", metavar="QUESTION")
    ask.add_argument("--vlm", required=True, metavar="HUB_ID_OR_DIR", help="the SmolVLM2 the adapters were made for")
    ask.add_argument("--adapter", type=int, nargs="+", metavar="INDEX",
                     help="adapter (video) index: one for every question, or one per question "
                     "(default: 0 when the file holds one adapter)")
    ask.add_argument("--max-new-tokens", type=positive_int, default=128, help="answer length limit (default: 128)")
    ask.add_argument("--batch-size", type=positive_int, help="questions per generate call (default: all)")
    add_runtime_options(ask)
    ask.set_defaults(run=run_ask)


def _adapter_indices(requested: list[int] | None, available: int, questions: int) -> list[int]:
    if requested is None:
        if available != 1:
            fail("--adapter", "the adapter each question uses (one INDEX for all, or one per question)",
                 f"none, and the file holds {available} adapters")
        requested = [0]
    if len(requested) not in (1, questions):
        fail("--adapter", f"one index or one per question ({questions})", f"{len(requested)} indices")
    for index in requested:
        if not 0 <= index < available:
            fail("--adapter", f"indices below {available}",
                 f"{index}, out of range (the file holds {available} adapters)")
    return requested * questions if len(requested) == 1 else requested


def run_ask(args, device: torch.device) -> int:
    """``v2l-fast ask``: answer each question with its video's adapter; no visual tokens."""
    from v2l_fast.adapters import Adapters
    from v2l_fast.api import ask
    from v2l_fast.vlm import load_smolvlm

    check_files([args.adapters], "adapters file")
    stage = Stages(device)
    with stage("load"):
        vlm = load_smolvlm(args.vlm, dtype=DTYPES[args.dtype], device=device)
        adapters = Adapters.load(args.adapters, model=vlm.model, device=device)
    indices = _adapter_indices(args.adapter, len(adapters), len(args.questions))
    with stage("ask"):
        answers = ask(adapters[indices], args.questions, vlm=vlm, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
    print(f"loaded {args.vlm} ({args.dtype}, {device}) and {len(adapters)} adapters in {stage.seconds['load']:.1f} s; "
          f"answered in {stage.seconds['ask']:.2f} s ({format_backends(device)})")
    for index, question, answer in zip(indices, args.questions, answers):
        print(f"\n[adapter {index}] Q: {question}\nA: {answer}")
    return 0
