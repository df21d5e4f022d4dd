"""The ``v2l-fast`` command line (also ``python -m v2l_fast``): demo, internalize, ask, info, the
serving commands (serve, export-peft) and the training commands (world, teacher, train, evaluate,
replicate).

One module per command, each adding its subcommand to the parser and running it; `common` holds
what they share. ``demo`` runs the main job on the embedded default that needs no download: the
trained toy SmolVLM2 and its Frames2LoRA shipped in the package (`v2l_fast.data.embedded`) on
sample clips. ``internalize`` and ``ask`` run the same path on real checkpoints; ``world`` writes
the synthetic world (`v2l_fast.data.synthetic`); ``teacher`` writes the training targets of a
manifest (`v2l_fast.train.teacher`); ``train`` trains the hypernetwork on them
(`v2l_fast.train.trainer`); ``evaluate`` scores held-out questions with the video in context, with
the adapter alone and with neither (`v2l_fast.train.evaluate`); ``replicate`` runs the toy
replication end to end (`v2l_fast.train.replicate`). ``serve`` runs the OpenAI-compatible HTTP
server over the continuous-batching engine (`v2l_fast.serve`); ``export-peft`` writes an adapter
as a PEFT LoRA directory, with the bias-folded base model vLLM serves it on
(`v2l_fast.adapters.peft`). Bad input (a missing or corrupt file,
adapters made for another model, a backend that cannot run) ends with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import v2l_fast
from v2l_fast import heap
from v2l_fast.cli import ask, demo, evaluate, export_peft, info, internalize, replicate, serve, teacher, train, world
from v2l_fast.cli.common import EXIT_BAD_INPUT, PROG, Parser, auto_dtype, backend_scope, pick_device

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``v2l-fast`` with its subcommands."""
    parser = Parser(prog=PROG, description="Internalize videos into LoRA adapters of a frozen SmolVLM2 "
                    "(Frames2LoRA), then answer questions with zero visual tokens.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {v2l_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in (demo, internalize, ask, serve, info, export_peft, teacher, world, train, evaluate, replicate):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``v2l-fast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Bad input prints ``v2l-fast COMMAND: error: …`` (one line) to stderr and returns 2. Freed CPU
    memory stays in the process for the command's life (`v2l_fast.heap.retain_freed_memory`).
    """
    args = build_parser().parse_args(argv)
    heap.retain_freed_memory()
    try:
        device = pick_device(getattr(args, "device", None))
        if getattr(args, "dtype", None) == "auto":
            args.dtype = auto_dtype(device)
        with backend_scope(getattr(args, "backend", None), device):
            return args.run(args, device)
    except BrokenPipeError:  # the reader went away (`v2l-fast info | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except (ValueError, OSError) as err:  # every bad-input error of the stack is one of these
        print(f"{PROG} {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
