"""What the ``v2l-fast`` commands share: the parser class and options, the device and backend
set-up, stage timings and the report helpers."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch

from v2l_fast.errors import fail
from v2l_fast.ops.registry import BACKENDS, ENV_VAR, resolve, runtime_missing, use_backend
from v2l_fast.precision import bf16_matmul_hardware

PROG = "v2l-fast"
EXIT_BAD_INPUT = 2
# The ops the stack calls (hypernetwork: Perceiver, SwiGLU, composition; answers: LoRA).
STACK_OPS = ("perceiver_attention", "swiglu_mlp", "compose_adapters", "lora_sgmv")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2, as argparse)."""

    def error(self, message: str):
        """Print ``message`` as one line and exit with `EXIT_BAD_INPUT`."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag(name: str) -> str:
    """The command-line flag of settings field ``name`` (``grad_accum`` → ``--grad-accum``)."""
    return "--" + name.replace("_", "-")


_FLAG_TYPES = {int: int, float: float, str: str}


def add_settings_flags(parser: argparse.ArgumentParser, settings: type, helps: Mapping[str, str]) -> None:
    """One flag per field of the dataclass ``settings`` (default None: unset keeps the settings'
    value), typed by the field: bools as ``--x/--no-x``, pairs as two numbers, ``X | None`` as X;
    the help is ``helps[name]`` and the default when there is one."""
    defaults = settings()
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next(a for a in args if a is not type(None)) if type(None) in args else hint
        default = getattr(defaults, field.name)
        text = helps[field.name] if default is None else f"{helps[field.name]} (default: {default})"
        if base is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag(field.name), type=float, nargs=2, metavar=("B1", "B2"), default=None,
                                help=text)
        else:
            parser.add_argument(flag(field.name), type=_FLAG_TYPES[base], default=None,
                                metavar=field.name.upper(), help=text)


def positive_int(text: str) -> int:
    """argparse type: an int ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_runtime_options(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """``--device``, ``--backend`` and (with ``dtype``) ``--dtype``."""
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    if dtype:
        add_dtype_option(parser)
    parser.add_argument("--backend", choices=("auto", *BACKENDS),
                        help=f"kernel backend for every op that has it (default: ${ENV_VAR}, else auto)")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype auto|bf16|fp32`` of the VLM's weights (``auto``: `auto_dtype`, resolved by `main`)."""
    parser.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto",
                        help="VLM weight dtype (default: auto = bf16 where the device multiplies bf16 in hardware — "
                        "CUDA, a CPU with AMX: see v2l-fast info — else fp32, as bf16 emulated is slower than fp32)")


def auto_dtype(device: torch.device) -> str:
    """``--dtype auto`` on ``device``: "bf16" where it multiplies bf16 in hardware
    (`v2l_fast.precision.bf16_matmul_hardware`: CUDA, a CPU with AMX), else "fp32"."""
    return "bf16" if bf16_matmul_hardware(device) is not None else "fp32"


def pick_device(name: str | None) -> torch.device:
    """The ``--device`` (default: CUDA when available, else the CPU), refused if absent here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail("--device", "a torch device such as 'cpu' or 'cuda:0'", repr(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail("--device", "a device of this machine", f"{name!r}, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail("--device", f"one of the {torch.cuda.device_count()} CUDA devices", repr(name))
    return device


@contextmanager
def backend_scope(name: str | None, device: torch.device):
    """Run the block with backend ``name`` for every op (`use_backend`; None: ``$V2L_BACKEND``
    or auto), refused up front when it cannot run on ``device``.

    Triton on CPU tensors runs under the interpreter, so it is switched on for that case (and
    switched back after); it must be on before triton is imported, which is why this wraps
    every command.
    """
    if name is None:
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        if name == "triton" and device.type == "cpu" and saved in (None, "", "0"):
            if "triton" in sys.modules:
                fail("--backend triton", "TRITON_INTERPRET=1 in the environment to run on the CPU (the Triton "
                     "interpreter must be on before triton is imported)", "triton imported without it")
            os.environ["TRITON_INTERPRET"] = "1"
        missing = None if name == "auto" else runtime_missing(name, device)
        if missing:
            fail(f"--backend {name}", "a backend that can run here", f"one that cannot run here: {missing}")
        with use_backend(name):
            yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def backends_in_use(device: torch.device) -> dict[str, str]:
    """The backend each op of the stack runs on ``device`` under the setting in force (the
    ``--backend`` scope, else ``$V2L_BACKEND``, else auto's choice)."""
    import v2l_fast.ops  # noqa: F401  (defines the ops)

    return {op: resolve(op, "auto", device).backend for op in STACK_OPS}


def format_backends(device: torch.device) -> str:
    """``op=backend, …`` of `backends_in_use`, for the reports."""
    return ", ".join(f"{op}={name}" for op, name in backends_in_use(device).items())


class Stages:
    """Wall-clock time of each named stage (the GPU synchronised before the clock is read)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str):
        """Time the block as stage ``name``."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = time.perf_counter() - start


def check_files(paths: Sequence[str], what: str) -> None:
    """Refuse a path in ``paths`` that is not an existing file (``what`` names them)."""
    for path in paths:
        if not os.path.isfile(path):
            fail(what, "an existing file", f"{path!r}, which was not found")


def shape(t: torch.Tensor) -> str:
    """``[d0, d1, …]`` of a tensor, for the reports."""
    return "[" + ", ".join(map(str, t.shape)) + "]"


EMBEDDED_DEFAULT = "the embedded default (toy SmolVLM2 trained on the synthetic world + its Frames2LoRA, fp32)"


def load_models(args, device: torch.device):
    """``(session, what, embedded)``: ``--vlm`` + ``--hypernet`` (both or neither; ``--dtype``)
    loaded as a `v2l_fast.Session`, or else the embedded default (`v2l_fast.data.embedded`, fp32,
    returned as ``embedded`` for its sample clips); ``what`` names them for the console."""
    import v2l_fast
    from v2l_fast.data.embedded import embedded_default

    if (args.vlm is None) != (args.hypernet is None):
        fail("--vlm/--hypernet", "both (a SmolVLM2 and its Frames2LoRA) or neither", "only one")
    if args.vlm:
        session = v2l_fast.load(args.vlm, args.hypernet, dtype=DTYPES[args.dtype], device=device)
        return session, f"{args.vlm} + {args.hypernet} ({args.dtype})", None
    embedded = embedded_default()
    session = v2l_fast.load(embedded.vlm, embedded.hypernet, dtype=torch.float32, device=device)
    return session, EMBEDDED_DEFAULT, embedded
