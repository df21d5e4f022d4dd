"""The ``v2l-fast`` command line (also ``python -m v2l_fast``): demo, internalize, ask, info.

``demo`` runs the whole path on an embedded default that needs no download: a tiny random
SmolVLM2, a fresh Frames2LoRA and a synthetic video. ``internalize`` and ``ask`` run the
same path on real checkpoints. Bad input (a missing or corrupt file, adapters made for
another model, a backend that cannot run) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

import v2l_fast
from v2l_fast.ops.backends import BACKENDS, ENV_VAR, resolve, runtime_missing

PROG = "v2l-fast"
EXIT_BAD_INPUT = 2
# The ops the stack calls (hypernetwork: Perceiver, SwiGLU, composition; answers: LoRA).
STACK_OPS = ("perceiver_attention", "swiglu_mlp", "compose_adapters", "lora_sgmv")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEMO_QUESTIONS = ("What is moving in the video?", "What colour is the square?", "Where does the circle go?")
RANDOM_WEIGHTS_WARNING = (
    "WARNING: the demo's weights are RANDOM (a tiny SmolVLM2 and a fresh Frames2LoRA, nothing is "
    "downloaded), so the answers are meaningless text. It shows the path, the shapes, the token "
    "counts and the timings. For real answers pass real weights: "
    f"`{PROG} internalize VIDEO --vlm HUB_ID_OR_DIR --hypernet CKPT`, then `{PROG} ask ...`.")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2, as argparse)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_runtime_options(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                            help="VLM weight dtype (default: bf16, as the official pipeline)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS),
                        help=f"kernel backend for every op (sets ${ENV_VAR}; default: ${ENV_VAR} or auto)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``v2l-fast`` with its four subcommands."""
    parser = _Parser(prog=PROG, description="Internalize videos into LoRA adapters of a frozen SmolVLM2 "
                     "(Frames2LoRA), then answer questions with zero visual tokens.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {v2l_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", help="the whole path on a tiny random model and a synthetic video "
                               "(no downloads; the answers are meaningless)")
    demo.add_argument("--frames", type=_positive_int, default=8, help="frames the model sees (default: 8)")
    demo.add_argument("--questions", nargs="+", default=list(DEMO_QUESTIONS), metavar="Q",
                      help="questions to ask about the video")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=16, help="answer length limit (default: 16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    _add_runtime_options(demo, dtype=False)
    demo.set_defaults(run=run_demo)

    internalize = commands.add_parser("internalize", help="turn videos into one adapters file")
    internalize.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (decoded with PyAV)")
    internalize.add_argument("--vlm", required=True, metavar="HUB_ID_OR_DIR", help="the SmolVLM2")
    internalize.add_argument("--hypernet", required=True, metavar="CKPT",
                             help="Frames2LoRA checkpoint: official .pt, .safetensors or a save_frames2lora directory")
    internalize.add_argument("--out", default="adapters.safetensors", help="adapters file to write "
                             "(default: adapters.safetensors)")
    internalize.add_argument("--batch-size", type=_positive_int, help="videos per forward (default: all at once)")
    internalize.add_argument("--max-frames", type=_positive_int, help="frames sampled per video (default: 12)")
    _add_runtime_options(internalize)
    internalize.set_defaults(run=run_internalize)

    ask = commands.add_parser("ask", help="answer questions with saved adapters, zero visual tokens")
    ask.add_argument("adapters", metavar="ADAPTERS", help="file written by `internalize`")
    ask.add_argument("questions", nargs="+", metavar="QUESTION")
    ask.add_argument("--vlm", required=True, metavar="HUB_ID_OR_DIR", help="the SmolVLM2 the adapters were made for")
    ask.add_argument("--adapter", type=int, nargs="+", metavar="INDEX",
                     help="adapter (video) index: one for every question, or one per question "
                     "(default: 0 when the file holds one adapter)")
    ask.add_argument("--max-new-tokens", type=_positive_int, default=128, help="answer length limit (default: 128)")
    ask.add_argument("--batch-size", type=_positive_int, help="questions per generate call (default: all)")
    _add_runtime_options(ask)
    ask.set_defaults(run=run_ask)

    info = commands.add_parser("info", help="versions, the compiled extension, the backends that run here")
    info.set_defaults(run=run_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``v2l-fast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Bad input prints ``v2l-fast COMMAND: error: …`` (one line) to stderr and returns 2.
    """
    args = build_parser().parse_args(argv)
    try:
        device = _device(getattr(args, "device", None))
        with _backend(getattr(args, "backend", None), device):
            return args.run(args, device)
    except (ValueError, OSError) as err:  # every bad-input error of the stack is one of these
        print(f"{PROG} {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


# --- shared helpers -------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: expected a torch device such as 'cpu' or 'cuda:0', got {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name!r} requested, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name!r} requested, but there are {torch.cuda.device_count()} CUDA devices")
    return device


@contextmanager
def _backend(name: str | None, device: torch.device):
    """Route every op to backend ``name`` (through ``$V2L_BACKEND``) for the block, then restore.

    Triton on CPU tensors runs under the interpreter, so it is switched on for that case; it
    must be on before triton is imported, which is why this wraps every command.
    """
    if name is None:
        yield
        return
    saved = {key: os.environ.get(key) for key in (ENV_VAR, "TRITON_INTERPRET")}
    try:
        os.environ[ENV_VAR] = name
        if name == "triton" and device.type == "cpu" and saved["TRITON_INTERPRET"] in (None, "", "0"):
            if "triton" in sys.modules:
                raise ValueError("--backend triton on the CPU needs the Triton interpreter, which must be on "
                                 "before triton is imported: set TRITON_INTERPRET=1 in the environment")
            os.environ["TRITON_INTERPRET"] = "1"
        missing = None if name == "auto" else runtime_missing(name, device)
        if missing:
            raise ValueError(f"--backend {name}: cannot run here: {missing}")
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def backends_in_use(device: torch.device) -> dict[str, str]:
    """The backend ``auto`` picks for each op of the stack on ``device`` (``$V2L_BACKEND`` included)."""
    import v2l_fast.ops  # noqa: F401  (registers the ops)

    chosen = {}
    for op in STACK_OPS:
        impl = resolve(op, "auto", device)
        for name in BACKENDS:
            try:
                if resolve(op, name, device) is impl:
                    chosen[op] = name
                    break
            except RuntimeError:  # this op has no such backend, or it cannot run here
                continue
    return chosen


def _format_backends(device: torch.device) -> str:
    return ", ".join(f"{op}={name}" for op, name in backends_in_use(device).items())


class _Stages:
    """Wall-clock time of each named stage (the GPU synchronised before the clock is read)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = time.perf_counter() - start


@contextmanager
def _model_inputs(model: torch.nn.Module):
    """Record ``(input_ids, attention_mask, frames)`` of every forward of the VLM body (frames:
    the pixel frames passed in, 0 for none).

    This is what the language model actually receives, so the visual-token counts in the
    reports are measured, not derived from the prompt text.
    """
    from v2l_fast.vlm.features import inner_model

    calls: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []

    def record(module, args, kwargs):
        pixels = kwargs.get("pixel_values")
        frames = 0 if pixels is None else int(pixels.shape[:-3].numel())
        calls.append((kwargs.get("input_ids"), kwargs.get("attention_mask"), frames))

    handle = inner_model(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _context_summary(calls, image_token_id: int) -> tuple[list[int], int, int]:
    """(context tokens per row of the first call, ``<image>`` tokens and pixel frames over all calls)."""
    ids, mask, _ = calls[0]
    lengths = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    visual = sum(int((c[0] == image_token_id).sum()) for c in calls if c[0] is not None)
    return [int(n) for n in lengths], visual, sum(c[2] for c in calls)


def _check_files(paths: Sequence[str], what: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{what} not found: {path!r}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


# --- demo -------------------------------------------------------------------------------------


def write_synthetic_video(path: str | os.PathLike, seconds: int, *, fps: int = 4,
                          size: tuple[int, int] = (96, 128)) -> int:
    """Encode ``seconds`` s of moving coloured shapes (a red square crossing left to right, a
    green disc falling) at ``fps`` with PyAV (mpeg4, yuv420p); return the frames written."""
    from v2l_fast.vlm.video import write_video

    height, width = size
    rows, cols = np.mgrid[:height, :width]
    total = seconds * fps
    frames = np.empty((total, height, width, 3), dtype=np.uint8)
    frames[:] = (30, 30, 70)
    for t, frame in enumerate(frames):
        progress = t / max(total - 1, 1)
        left = int(progress * (width - 24))
        frame[16:40, left:left + 24] = (230, 40, 40)
        centre = (10 + progress * (height - 20), width - 28)
        frame[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 81] = (40, 220, 60)
    write_video(path, frames, fps=fps)
    return total


def demo_session(seed: int, device: torch.device, max_frames: int):
    """A `Session` of a tiny random SmolVLM2 and a small fresh Frames2LoRA, both from ``seed``.

    A fresh hypernetwork's ``scaler_B`` and ``bias_B`` are zero (spec §5), which would make
    every adapter's B zero and the adapters no-ops; they are drawn at random instead so the
    adapters change the answer model.
    """
    from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig
    from v2l_fast.hypernet.model import TARGET_MODULE
    from v2l_fast.vlm.factory import tiny_vlm

    vlm = tiny_vlm(seed, max_frames=max_frames)
    vlm.model.to(device)
    torch.manual_seed(seed)
    config = Frames2LoRAConfig.for_vlm(vlm.model.config, rank=4, latent_size=64, num_latent_queries=8, num_blocks=2)
    hypernet = Frames2LoRA(config)
    with torch.no_grad():
        hypernet.scaler_B[TARGET_MODULE].normal_(0, 0.5)
        hypernet.bias_B[TARGET_MODULE].normal_(0, 0.05)
    return v2l_fast.Session(vlm, hypernet.to(device).eval())


def run_demo(args, device: torch.device) -> int:
    """``v2l-fast demo``: internalize a synthetic video with random weights, ask, save, reload."""
    import v2l_fast.api  # noqa: F401  (imports transformers here, so "build models" times only the build)

    stage = _Stages(device)
    questions = list(args.questions)
    print(f"{PROG} demo: tiny random SmolVLM2 + fresh Frames2LoRA on a synthetic video, device {device}")
    print(RANDOM_WEIGHTS_WARNING + "\n")
    with tempfile.TemporaryDirectory(prefix="v2l-fast-demo-") as workdir:
        with stage("build models"):
            session = demo_session(args.seed, device, args.frames)
        model, hypernet = session.vlm.model, session.hypernet
        text, cfg = model.config.text_config, hypernet.config
        _row("models", f"SmolVLM2 tiny: {text.num_hidden_layers} layers, hidden {text.hidden_size}, down_proj "
             f"{text.intermediate_size}→{text.hidden_size}, {sum(p.numel() for p in model.parameters()):,} params")
        _row("", f"Frames2LoRA: rank {cfg.rank} (adapter rank {cfg.adapter_rank}), "
             f"{sum(p.numel() for p in hypernet.parameters()):,} params, seed {args.seed}")

        video = os.path.join(workdir, "shapes.mp4")
        with stage("write video"):
            written = write_synthetic_video(video, seconds=args.frames)
        _row("video", f"{video} (temporary): {written} frames at 4 fps ({args.frames} s), 96×128, moving shapes")

        image_token = model.config.image_token_id
        with stage("internalize"), _model_inputs(model) as calls:
            adapters = session.internalize([video])
        context, visual, frames = _context_summary(calls, image_token)
        _row("internalize", f"1 video → A {_shape(adapters.A)}, B {_shape(adapters.B)}, alpha {adapters.alpha:g}")
        _row("", f"context: {context[0]} tokens, {visual} of them visual (<image>), from {frames} frames "
             f"× {session.vlm.preprocessor.image_seq_len}")

        with stage("ask"), _model_inputs(model) as calls:
            answers = session.ask(adapters[[0] * len(questions)], questions, max_new_tokens=args.max_new_tokens)
        context, visual, frames = _context_summary(calls, image_token)
        _row("ask", f"{len(questions)} questions with the video's adapter, greedy, ≤ {args.max_new_tokens} new tokens")
        _row("", f"context: {min(context)}–{max(context)} tokens per question, {visual} visual, {frames} frames "
             f"(over {len(calls)} model calls: prefill + decode)")

        saved = os.path.join(workdir, "adapters.safetensors")
        with stage("save adapters"):
            adapters.save(saved)
        with stage("load adapters"):
            loaded = session.load_adapters(saved)
        with stage("ask (loaded)"):
            again = session.ask(loaded[[0] * len(questions)], questions, max_new_tokens=args.max_new_tokens)
        same = again == answers
        _row("save/load", f"{os.path.getsize(saved):,} bytes, base-model fingerprint checked on load; answers "
             f"with the loaded adapters: {'identical' if same else 'DIFFERENT'}")
        backends = _format_backends(device)
        interpreted = device.type == "cpu" and "=triton" in backends
        _row("backend", f"{args.backend or os.environ.get(ENV_VAR) or 'auto'}: {backends}"
             + (" (Triton interpreter on the CPU: slow, a correctness check only)" if interpreted else ""))

    print("\nanswers (meaningless: random weights)")
    for question, answer in zip(questions, answers):
        print(f"  Q: {question}\n  A: {answer!r}")
    print("\ntimings")
    for name, seconds in stage.seconds.items():
        _row(name, f"{seconds * 1e3:9.1f} ms")
    if not same:
        print(f"{PROG} demo: error: the reloaded adapters gave different answers", file=sys.stderr)
        return 1
    return 0


def _row(label: str, text: str) -> None:
    print(f"  {label:<13} {text}")


# --- internalize / ask -------------------------------------------------------------------------


def run_internalize(args, device: torch.device) -> int:
    """``v2l-fast internalize``: videos → one adapters file (one adapter per video, in order)."""
    _check_files(args.videos, "video file")
    if not os.path.exists(args.hypernet):
        raise ValueError(f"--hypernet: no such file or directory: {args.hypernet!r}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise ValueError(f"--out: expected a file path, got the directory {args.out!r}")
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out: the directory {out_dir!r} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out: the directory {out_dir!r} is not writable")
    stage = _Stages(device)
    overrides = {"max_frames": args.max_frames} if args.max_frames else {}
    with stage("load"):
        session = v2l_fast.load(args.vlm, args.hypernet, dtype=DTYPES[args.dtype], device=device, **overrides)
    print(f"loaded {args.vlm} ({args.dtype}, {device}) and {args.hypernet} (rank {session.hypernet.config.rank}) "
          f"in {stage.seconds['load']:.1f} s")
    with stage("internalize"):
        adapters = session.internalize(args.videos, batch_size=args.batch_size)
    adapters.save(args.out)
    print(f"internalized {len(adapters)} videos in {stage.seconds['internalize']:.2f} s → A {_shape(adapters.A)}, "
          f"B {_shape(adapters.B)}, alpha {adapters.alpha:g} ({_format_backends(device)})")
    for index, video in enumerate(args.videos):
        print(f"  adapter {index}: {video}")
    print(f"saved {args.out}")
    return 0


def _adapter_indices(requested: list[int] | None, available: int, questions: int) -> list[int]:
    if requested is None:
        if available != 1:
            raise ValueError(f"--adapter: the file holds {available} adapters; say which one each question uses "
                             "(one INDEX for all, or one per question)")
        requested = [0]
    if len(requested) not in (1, questions):
        raise ValueError(f"--adapter: expected one index or one per question ({questions}), got {len(requested)}")
    for index in requested:
        if not 0 <= index < available:
            raise ValueError(f"--adapter: index {index} is out of range (the file holds {available} adapters)")
    return requested * questions if len(requested) == 1 else requested


def run_ask(args, device: torch.device) -> int:
    """``v2l-fast ask``: answer each question with its video's adapter; no visual tokens."""
    from v2l_fast.adapters import Adapters
    from v2l_fast.api import ask
    from v2l_fast.vlm import load_smolvlm

    _check_files([args.adapters], "adapters file")
    stage = _Stages(device)
    with stage("load"):
        vlm = load_smolvlm(args.vlm, dtype=DTYPES[args.dtype], device=device)
        adapters = Adapters.load(args.adapters, model=vlm.model, device=device)
    indices = _adapter_indices(args.adapter, len(adapters), len(args.questions))
    with stage("ask"):
        answers = ask(adapters[indices], args.questions, vlm=vlm, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
    print(f"loaded {args.vlm} ({args.dtype}, {device}) and {len(adapters)} adapters in {stage.seconds['load']:.1f} s; "
          f"answered in {stage.seconds['ask']:.2f} s ({_format_backends(device)})")
    for index, question, answer in zip(indices, args.questions, answers):
        print(f"\n[adapter {index}] Q: {question}\nA: {answer}")
    return 0


# --- info --------------------------------------------------------------------------------------


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_info(args, device: torch.device) -> int:
    """``v2l-fast info``: versions, how ``v2l_fast._C`` was built, the backends that run here."""
    from v2l_fast.ops import available_backends

    print(f"v2l_fast {v2l_fast.__version__} (python {sys.version.split()[0]})")
    for package in ("torch", "triton", "transformers", "safetensors", "av"):
        print(f"  {package:<13} {_version(package)}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"  {'CUDA device':<13} {cuda}")
    print("build_info")
    for key, value in v2l_fast.build_info().items():
        print(f"  {key:<13} {value}")
    available = available_backends()
    print(f"available backends: {', '.join(available)}")
    for name in BACKENDS:
        if name not in available:
            print(f"  {name}: {runtime_missing(name)}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"auto on {device.type}: {_format_backends(device)}")
    return 0
