"""``v2l-fast serve``: the OpenAI-compatible HTTP server (`v2l_fast.serve.server`) run by uvicorn.

One frozen SmolVLM2 answers chat completions for many videos at once, each request with the
adapter its ``model`` names; videos uploaded to ``POST /v1/adapters`` are internalized by the
server. Without ``--vlm``/``--hypernet`` it serves the embedded default (the trained toy model)
with the shipped sample clips already internalized, so a client can ask at once.
"""

from __future__ import annotations

import os
import socket
import time

import torch

from v2l_fast.cli.common import PROG, Stages, add_runtime_options, format_backends, load_models, positive_int
from v2l_fast.errors import fail

DEFAULT_PORT = 8000


def add_parser(commands) -> None:
    """Add the ``serve`` subcommand to ``commands`` (an argparse subparsers action)."""
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server: chat completions with a video's adapter as the model, video "
        "uploads internalized into adapters (default: the embedded toy model with its sample clips loaded)",
        description="Serve /v1/chat/completions (stream or not), /v1/models and /v1/adapters (upload a video or "
        "an adapters file, list, delete) with continuous batching over many adapters. --dtype applies to --vlm (the "
        "embedded toy model runs in fp32). See docs/serving.md.")
    models = serve.add_argument_group("models")
    models.add_argument("--vlm", metavar="HUB_ID_OR_DIR",
                        help="a SmolVLM2 (hub id or directory), with --hypernet (default: the embedded toy model)")
    models.add_argument("--hypernet", metavar="CKPT", help="its Frames2LoRA checkpoint (with --vlm)")
    models.add_argument("--adapters-dir", metavar="DIR",
                        help="folder of the adapter store: <id>.safetensors files served at start, uploads written "
                        "there (default: none, uploads kept in memory until the server stops)")
    models.add_argument("--served-model-name", default="base", metavar="NAME",
                        help="the `model` of requests without an adapter: the base model (default: base)")
    models.add_argument("--no-preload", action="store_true",
                        help="embedded default: do not internalize the shipped sample clips at start (they are "
                        "served as adapters named after the clips otherwise)")
    models.add_argument("--no-fold", action="store_true",
                        help="keep the hypernetwork's shared bias block in every adapter instead of folding it into "
                        "the base weights once (folding halves the adapter work per step but keeps a second copy "
                        "of the down_proj weights for internalizing uploads)")
    net = serve.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
                     "interface: the server has no authentication)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port, 0 for any free one "
                     f"(default: {DEFAULT_PORT})")
    net.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="uvicorn's log level (default: info)")
    engine = serve.add_argument_group("engine")
    engine.add_argument("--max-batch", type=positive_int, default=32,
                        help="KV-cache slots: requests decoded together at most (default: 32)")
    engine.add_argument("--max-len", type=positive_int,
                        help="tokens per slot, prompt plus answer (default: the model's max_position_embeddings, "
                        "at most 4096)")
    engine.add_argument("--max-queue", type=positive_int, default=1024,
                        help="requests waiting for a slot; beyond, 429 (default: 1024)")
    engine.add_argument("--max-prefill-tokens", type=positive_int, default=4096,
                        help="prompt tokens admitted per engine step: bounds a step's latency (default: 4096)")
    engine.add_argument("--max-rank", type=positive_int, default=64,
                        help="largest adapter rank the device pool holds (default: 64)")
    engine.add_argument("--pool-mb", type=positive_int, default=256,
                        help="device memory of the adapter pool in MiB; the least recently used adapters leave "
                        "it (default: 256)")
    limits = serve.add_argument_group("limits (per request; beyond them the server answers 4xx)")
    limits.add_argument("--max-upload-mb", type=positive_int, default=256,
                        help="size of an uploaded video or adapters file in MiB; 413 beyond (default: 256)")
    limits.add_argument("--max-request-kb", type=positive_int, default=1024,
                        help="size of a chat request's JSON body in KiB; 413 beyond (default: 1024)")
    limits.add_argument("--max-frames", type=positive_int,
                        help="frames an upload may ask to sample from its video (default: the model's own "
                        "max_frames, which is also what an upload gets when it asks nothing)")
    limits.add_argument("--max-video-frames", type=positive_int, default=100_000,
                        help="frames an uploaded video's container may hold (default: 100000)")
    limits.add_argument("--max-prompt-tokens", type=positive_int, default=8192,
                        help="tokens of a chat prompt after the chat template (default: 8192; --max-len bounds "
                        "prompt plus answer too)")
    limits.add_argument("--max-tokens", type=positive_int, default=1024,
                        help="tokens one answer may ask for; also the default of a request that names none "
                        "(default: 1024)")
    limits.add_argument("--max-concurrent", type=positive_int, default=256,
                        help="chat requests in flight at once; 429 beyond, never a wait (default: 256)")
    limits.add_argument("--max-internalizations", type=positive_int, default=4,
                        help="adapter uploads in flight at once (they are internalized one at a time); 429 "
                        "beyond (default: 4)")
    add_runtime_options(serve)
    serve.set_defaults(run=run_serve)


def _limits(args):
    from v2l_fast.serve.limits import ServerLimits

    return ServerLimits(max_upload_bytes=args.max_upload_mb << 20, max_request_bytes=args.max_request_kb << 10,
                        max_frames=args.max_frames, max_video_frames=args.max_video_frames,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                        max_concurrent=args.max_concurrent, max_internalizations=args.max_internalizations)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (a clear one-line error when the port is taken)."""
    if not 0 <= port <= 65535:
        fail("--port", "a TCP port in [0, 65535]", port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        fail("--host", "an address of this machine", f"{host!r} ({err})")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        fail("--host/--port", "an address and port free to listen on", f"{host}:{port} ({err.strerror})")
    return sock


def _preload(engine, internalizer, embedded, stage: Stages) -> list[tuple[str, list[str]]]:
    """Internalize the embedded default's sample clips into adapters named after the clips (kept
    in memory; an id already in the store is left as it is). Returns (id, questions) pairs."""
    loaded = []
    with stage("preload"):
        for path, rows in embedded.clips:
            adapter_id = os.path.splitext(os.path.basename(path))[0]
            if adapter_id not in engine.store:
                adapters, _ = internalizer(path)
                engine.add_adapter(adapter_id, adapters, persist=False)
            loaded.append((adapter_id, [row.prompt for row in rows]))
    return loaded


def run_serve(args, device: torch.device) -> int:
    """``v2l-fast serve``: load the models, build the engine and the app, serve until interrupted."""
    try:
        import uvicorn

        from v2l_fast.serve.internalizer import Internalizer, unfolded_copy
        from v2l_fast.serve.server import create_app
    except ImportError as err:
        fail("serve", "fastapi and uvicorn installed (pip install 'v2l_fast[serve]')", f"ImportError: {err}")
    from v2l_fast.adapters import base_fingerprint
    from v2l_fast.adapters.store import AdapterStore
    from v2l_fast.serve import Engine

    limits = _limits(args)
    sock = _listen(args.host, args.port)  # before the models load: a taken port fails at once
    stage = Stages(device)
    with stage("load models"):
        session, what, embedded = load_models(args, device)
    vlm, hypernet = session.vlm, session.hypernet
    twin = vlm if args.no_fold else unfolded_copy(vlm)  # internalization needs the unfolded weights
    store = AdapterStore(args.adapters_dir, base=base_fingerprint(vlm.model))
    with stage("build engine"):
        engine = Engine(vlm, hypernet=hypernet, store=store, fold=not args.no_fold, max_batch=args.max_batch,
                        max_len=args.max_len, max_rank=args.max_rank, pool_bytes=args.pool_mb << 20,
                        max_prefill_tokens=args.max_prefill_tokens, max_queue=args.max_queue)
    internalizer = Internalizer(twin, hypernet)
    samples = [] if embedded is None or args.no_preload else _preload(engine, internalizer, embedded, stage)
    app = create_app(engine, internalizer=internalizer, limits=limits, served_model_name=args.served_model_name)
    host, port = sock.getsockname()[:2]
    base_url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
    print(f"{PROG} serve: {what}, device {device}, {format_backends(device)}")
    print(f"  loaded in {sum(stage.seconds.values()):.1f} s; engine: {args.max_batch} slots of "
          f"{engine.max_len} tokens, bias block {'kept in the adapters' if args.no_fold else 'folded'}; adapters: "
          f"{len(store)} ({args.adapters_dir or 'in memory'})")
    for adapter_id, questions in samples:
        print(f"  adapter {adapter_id!r}: a sample clip; try: {' / '.join(questions[:3])}")
    example = samples[0] if samples else (args.served_model_name, ["What happens in the video?"])
    print(f"  OpenAI base_url {base_url}  (model = an adapter id, or {args.served_model_name!r} for none)")
    print(f"  e.g. curl {base_url}/chat/completions -H 'Content-Type: application/json' -d "
          f"'{{\"model\": \"{example[0]}\", \"messages\": [{{\"role\": \"user\", \"content\": "
          f"\"{example[1][0]}\"}}], \"max_tokens\": 32}}'")
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    started = time.perf_counter()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    finally:
        engine.stop()
        sock.close()
    print(f"{PROG} serve: stopped after {time.perf_counter() - started:.0f} s")
    return 0
