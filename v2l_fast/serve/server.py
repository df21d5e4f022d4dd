"""The OpenAI-compatible HTTP server around the serving `Engine` (FastAPI, run by uvicorn).

    engine = Engine(vlm, hypernet=hypernet)
    app = create_app(engine, internalizer=Internalizer(twin, hypernet))   # twin: `unfolded_copy(vlm)`
    uvicorn.run(app, host="127.0.0.1", port=8000)                         # or `v2l-fast serve`

Endpoints (docs/serving.md has the details and examples):

* ``POST /v1/chat/completions`` — text-only chat; ``model`` is an adapter id (as vLLM names
  LoRA adapters) or the served base-model name for no adapter; ``stream: true`` answers with
  server-sent ``chat.completion.chunk`` events and ``data: [DONE]``.
* ``GET /v1/models`` (and ``/v1/models/{model}``) — the base model and every stored adapter.
* ``POST /v1/adapters`` — upload a video (multipart field ``file``, or the raw body), internalize
  it into an adapter and store it under ``id`` (given or generated).
* ``POST /v1/adapters/{id}`` / ``PUT /v1/adapters/{id}`` — upload a v2l_fast adapters
  safetensors file (one video) as adapter ``id`` (PUT replaces one that exists).
* ``GET /v1/adapters``, ``GET /v1/adapters/{id}``, ``DELETE /v1/adapters/{id}``.
* ``GET /health``, ``GET /v1/stats``.

The event loop never waits on the model: tokenization, file writes of large uploads, adapter
loads and internalization run in worker threads (one internalization at a time: a lock), and
each request's blocking `RequestHandle` is drained by a small daemon thread that hands its
events to the loop with ``call_soon_threadsafe``. Every refusal is a 4xx with an OpenAI-style
body ``{"error": {"message", "type", "param", "code"}}``; a client that goes away mid-answer
has its request cancelled in the engine, so its KV slot is freed at the next step.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import email.message
import email.utils
import itertools
import json
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from v2l_fast.adapters.core import Adapters
from v2l_fast.adapters.fold import folded_bias_of
from v2l_fast.adapters.store import AdapterNotFound, check_adapter_id
from v2l_fast.errors import fail
from v2l_fast.serve.engine import Completion, Engine, EngineFull, RequestHandle, StreamEvent
from v2l_fast.serve.sampling import SamplingParams
from v2l_fast.vlm.load import VLM

__all__ = ["ApiError", "Internalizer", "ServerLimits", "create_app", "unfolded_copy"]

DEFAULT_MODEL_NAME = "base"
_CHUNK = 1 << 20  # upload bytes written to disk per worker-thread call
_MAX_STOP = 16


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; beyond them it answers 4xx instead of trying.

    Attributes:
        max_upload_bytes: body of an adapter upload (a video or an adapters file): 413 beyond.
        max_request_bytes: body of a JSON request (a chat completion): 413 beyond.
        max_frames: frames sampled from an uploaded video (None: the VLM's preprocessor
            ``max_frames``); a request asking for more is refused.
        max_video_frames: frames the container of an uploaded video may hold (decoding cost).
        max_video_pixels: width × height of an uploaded video's frames.
        max_prompt_tokens: tokens of a chat's prompt after the chat template (the engine's
            ``max_len`` bounds prompt + answer as well).
        max_tokens: tokens one answer may ask for; also the default when a request names none
            (then at most what fits the engine's ``max_len``).
        max_concurrent: chat requests in flight at once (waiting, running or streaming): 429
            beyond, never a wait. The engine's ``max_queue`` bounds its queue (429 as well).
        max_internalizations: adapter uploads in flight at once (uploading, waiting for the
            internalization lock, or internalizing): 429 beyond.
    """

    max_upload_bytes: int = 256 << 20
    max_request_bytes: int = 1 << 20
    max_frames: int | None = None
    max_video_frames: int = 100_000
    max_video_pixels: int = 3840 * 2160
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    max_concurrent: int = 256
    max_internalizations: int = 4

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_request_bytes", "max_video_frames", "max_video_pixels",
                     "max_prompt_tokens", "max_tokens", "max_concurrent", "max_internalizations"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                fail(name, "an int >= 1", repr(value))
        if self.max_frames is not None and (type(self.max_frames) is not int or self.max_frames < 1):
            fail("max_frames", "an int >= 1 or None", repr(self.max_frames))


class ApiError(Exception):
    """A refused request: HTTP ``status`` and the OpenAI-style error body's fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        if status == 429 and type is None:
            self.type = "rate_limit_error"

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]-]*): expected ")


def _bad_input(err: Exception, status: int = 400, code: str | None = None) -> ApiError:
    """An `ApiError` of a ValueError of the stack (``name: expected …, got …``), one line, its
    argument as ``param``."""
    message = " ".join(str(err).split()) or type(err).__name__
    match = _PARAM.match(message)
    return ApiError(status, message, param=match.group(1) if match else None, code=code)


# --- internalization ------------------------------------------------------------------------

def unfolded_copy(vlm: VLM) -> VLM:
    """A twin of ``vlm`` for internalization beside a folding `Engine`: every parameter and
    buffer is shared except the ``down_proj`` weights, which are copied.

    The engine folds the hypernetwork's bias block into ``down_proj`` in place, but the
    hypernetwork reads the layer states of the model it was trained on, the unfolded one. Make
    the twin BEFORE building the engine; it costs one copy of the ``down_proj`` weights.
    """
    from v2l_fast.vlm.lora_patch import down_proj_targets

    model = vlm.model
    if folded_bias_of(model) is not None:
        fail("vlm", "an unfolded model (make the twin before the Engine folds it)", "a folded model")
    copied = {id(module.weight) for module in down_proj_targets(model)}
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in copied}
    return VLM(copy.deepcopy(model, memo), vlm.tokenizer, vlm.preprocessor)


class Internalizer:
    """Video files → one adapter each, for the server: an unfolded VLM and its hypernetwork.

    Calls are serialised by a lock (one model forward at a time); the server runs them in
    worker threads. ``vlm`` must not be the model a folding engine serves (see `unfolded_copy`).
    """

    def __init__(self, vlm: VLM, hypernet):
        if not isinstance(vlm, VLM):
            fail("vlm", "a VLM", type(vlm).__name__)
        self.vlm, self.hypernet = vlm, hypernet
        self.lock = threading.Lock()

    @property
    def max_frames(self) -> int:
        """Frames the VLM's preprocessor samples from a video by default."""
        return self.vlm.preprocessor.max_frames

    def __call__(self, path: str, max_frames: int | None = None) -> tuple[Adapters, int]:
        """Internalize the video file ``path`` (``max_frames`` sampled frames; None: the
        preprocessor's); return its adapter and the frames used. Bad videos raise ValueError."""
        from v2l_fast.api import internalize
        from v2l_fast.vlm.video import read_video

        with self.lock:
            if folded_bias_of(self.vlm.model) is not None:
                raise RuntimeError("the internalizer's VLM holds a folded bias block: give the server an "
                                   "unfolded twin (v2l_fast.serve.server.unfolded_copy) made before the Engine")
            video = read_video(path, max_frames=max_frames or self.max_frames, target_fps=self.vlm.preprocessor.fps)
            adapters = internalize([video], vlm=self.vlm, hypernet=self.hypernet)
        return adapters, len(video.timestamps)


def probe_video(path: str, limits: ServerLimits) -> None:
    """Refuse (`ApiError` 400) a file that is no video PyAV can open, or whose container states
    more frames or pixels than ``limits`` allow, before anything is decoded."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ApiError(400, "file: expected a video, got a file without a video stream", param="file",
                               code="invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
            frames = stream.frames
            if not frames and container.duration and stream.average_rate:
                frames = int(container.duration / 1e6 * float(stream.average_rate)) + 1
    except av.error.FFmpegError as err:
        raise ApiError(400, f"file: expected a video PyAV can read, got one it cannot: {err}", param="file",
                       code="invalid_video") from None
    if width * height > limits.max_video_pixels:
        raise ApiError(400, f"file: expected frames of at most {limits.max_video_pixels} pixels, got "
                       f"{width}x{height}", param="file", code="video_too_large")
    if frames > limits.max_video_frames:
        raise ApiError(400, f"file: expected a video of at most {limits.max_video_frames} frames, got about {frames}",
                       param="file", code="video_too_long")


# --- request bodies -------------------------------------------------------------------------

def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"{what}: expected at most {limit} bytes, got more", code="request_too_large")


def _declared_length(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise ApiError(400, f"content-length: expected a number of bytes, got {declared[:40]!r}")
    if int(declared) > limit:
        raise ApiError(413, f"{what}: expected at most {limit} bytes, got {declared}", code="request_too_large")


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object of the request body, reading no more than ``limit`` bytes (413 beyond)."""
    _declared_length(request, limit, "request body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit, "request body")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"body: expected JSON, got text that does not parse: {err}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(value).__name__}", code="invalid_json")
    return value


async def spool_body(request: Request, path: str, limit: int) -> int:
    """Stream the request body into the file ``path``; stop reading past ``limit`` bytes (413).
    Returns the bytes written; an empty body is refused (400)."""
    _declared_length(request, limit, "upload")
    size, pending = 0, bytearray()
    with open(path, "wb") as handle:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, "upload")
            pending += chunk
            if len(pending) >= _CHUNK:
                await anyio.to_thread.run_sync(handle.write, bytes(pending))
                pending.clear()
        handle.write(pending)
    if size == 0:
        raise ApiError(400, "body: expected the uploaded file, got an empty body", param="file")
    return size


def _header_param(value: str, header: str, name: str) -> str | None:
    message = email.message.Message()
    message[header] = value
    found = message.get_param(name, header=header)
    return email.utils.collapse_rfc2231_value(found) if found is not None else None


def split_multipart(path: str, boundary: str, folder: str) -> tuple[dict[str, str], dict[str, str]]:
    """Parse the ``multipart/form-data`` body in file ``path``: returns (text fields, file fields
    as paths of their bytes copied into ``folder``). Malformed bodies raise `ApiError` 400."""
    def malformed(why: str) -> ApiError:
        return ApiError(400, f"body: expected multipart/form-data, got a body that {why}", code="invalid_multipart")

    fields, files = {}, {}
    delimiter = b"--" + boundary.encode("latin-1")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.find(delimiter)
        if at < 0:
            raise malformed("lacks the boundary")
        while True:
            at += len(delimiter)
            if data[at:at + 2] == b"--":
                break
            if data[at:at + 2] != b"\r\n":
                raise malformed("has a boundary line not ended by CRLF")
            head_end = data.find(b"\r\n\r\n", at + 2, at + 2 + 16384)
            if head_end < 0:
                raise malformed("has a part without headers ending in 16 KiB")
            headers = {}
            for line in data[at + 2:head_end].decode("utf-8", "replace").split("\r\n"):
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            start = head_end + 4
            end = data.find(b"\r\n" + delimiter, start)
            if end < 0:
                raise malformed("has a part without its closing boundary")
            disposition = headers.get("content-disposition", "")
            name = _header_param(disposition, "content-disposition", "name")
            if name is None:
                raise malformed("has a part without a name")
            if _header_param(disposition, "content-disposition", "filename") is not None:
                target = os.path.join(folder, f"part-{len(files)}")
                with open(target, "wb") as out:
                    for offset in range(start, end, _CHUNK):
                        out.write(data[offset:min(offset + _CHUNK, end)])
                files[name] = target
            else:
                if end - start > 4096:
                    raise malformed(f"has a text field {name!r} over 4096 bytes")
                fields[name] = data[start:end].decode("utf-8", "replace")
            at = end + 2
    return fields, files


@asynccontextmanager
async def _upload_folder():
    folder = tempfile.mkdtemp(prefix="v2l-fast-upload-")
    try:
        yield folder
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, folder, True)


async def receive_upload(request: Request, folder: str, limit: int) -> tuple[dict[str, str], str]:
    """The uploaded file (a path in ``folder``) and the text fields: a ``multipart/form-data``
    body with a ``file`` part (text parts are fields), or else the raw body as the file;
    query parameters are fields too (form fields win)."""
    body = os.path.join(folder, "body")
    await spool_body(request, body, limit)
    fields = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/"):
        return fields, body
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary:
        raise ApiError(400, "content-type: expected multipart/form-data with a boundary, got none",
                       code="invalid_multipart")
    form, files = await anyio.to_thread.run_sync(split_multipart, body, boundary, folder)
    fields.update(form)
    path = files.get("file", files.get("video"))
    if path is None:
        raise ApiError(400, f"file: expected a file part named 'file', got parts {sorted(form) + sorted(files)}",
                       param="file")
    return fields, path


# --- chat completions -----------------------------------------------------------------------

class ChatRequest(BaseModel):
    """The fields of an OpenAI chat completion request that this server reads (others are ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: dict | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)


def _refuse_unsupported(chat: ChatRequest) -> None:
    if chat.n not in (None, 1):
        raise ApiError(400, f"n: expected 1 (one choice per request), got {chat.n}", param="n")
    if chat.logprobs or chat.top_logprobs:
        raise ApiError(400, "logprobs: expected false (log probabilities are not served)", param="logprobs")
    if chat.tools:
        raise ApiError(400, "tools: expected none (tool calls are not served)", param="tools")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(chat, name):
            raise ApiError(400, f"{name}: expected 0 (penalties are not served), got {getattr(chat, name)}",
                           param=name)


def _messages(chat: ChatRequest) -> list[dict]:
    """The messages as the engine takes them (OpenAI's ``developer`` role is a system message)."""
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in chat.messages]


class _Events:
    """A `RequestHandle`'s events, delivered into the event loop by a daemon thread; when the
    last one (with a finish reason) arrives, ``completion`` is already set."""

    def __init__(self, handle: RequestHandle, loop: asyncio.AbstractEventLoop):
        self.handle = handle
        self.completion: Completion | None = None
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        threading.Thread(target=self._pump, args=(loop,), name=f"v2l-fast-{handle.request_id}", daemon=True).start()

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        for event in self.handle:
            if event.finish_reason is not None:
                # the engine emits the last event just before it records the completion: wait here
                self.completion = self.handle.result(60)
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody will read the rest
                self.handle.cancel()
                return

    async def next(self) -> StreamEvent:
        """The next event (the last one has a ``finish_reason``)."""
        return await self.queue.get()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _finish_error(event: StreamEvent) -> ApiError:
    if event.finish_reason == "cancelled":
        return ApiError(503, "the engine stopped before the answer was complete", code="engine_stopped")
    message = event.error or "the engine failed"
    if "no such adapter" in message:  # deleted between the check and the engine's admission
        return ApiError(404, message, param="model", code="model_not_found")
    return ApiError(500, message, code="engine_error")


class _EngineStream(StreamingResponse):
    """A server-sent events response whose end (finished, failed or the client gone) always
    cancels the engine request if still running and runs ``on_close`` once."""

    def __init__(self, content: AsyncIterator[str], handle: RequestHandle, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle, self.on_close = handle, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.handle.done:
                self.handle.cancel()
            self.on_close()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# --- the app --------------------------------------------------------------------------------

class _Counter:
    """In-flight requests of one kind, bounded; touched from the event loop only."""

    def __init__(self, limit: int, what: str, code: str):
        self.limit, self.what, self.code, self.value = limit, what, code, 0

    def acquire(self) -> None:
        if self.value >= self.limit:
            raise ApiError(429, f"{self.what}: at most {self.limit} at once; retry later", code=self.code)
        self.value += 1

    def release(self) -> None:
        self.value -= 1


def create_app(engine: Engine, *, internalizer: Internalizer | None = None, limits: ServerLimits | None = None,
               served_model_name: str = DEFAULT_MODEL_NAME, default_temperature: float = 0.0,
               start_engine: bool = True) -> FastAPI:
    """The OpenAI-compatible FastAPI app serving ``engine`` (see the module docstring).

    Args:
        engine: the `Engine`; its `AdapterStore` holds the adapters (files when it has a root:
            uploads are then persisted).
        internalizer: turns uploaded videos into adapters (None: video uploads are refused).
        limits: `ServerLimits` (default: its defaults).
        served_model_name: the ``model`` that means the base model, without an adapter.
        default_temperature: the temperature of a request that names none (default 0: greedy,
            the answers of `v2l_fast.api.ask`; OpenAI's API defaults to 1).
        start_engine: start the engine's background thread when the app starts (idempotent);
            the app never stops it.
    """
    limits = ServerLimits() if limits is None else limits
    if not isinstance(limits, ServerLimits):
        fail("limits", "a ServerLimits", type(limits).__name__)
    check_adapter_id(served_model_name)
    created = int(time.time())
    chats = _Counter(limits.max_concurrent, "concurrent chat requests", "too_many_requests")
    uploads = _Counter(limits.max_internalizations, "adapter uploads in flight", "too_many_uploads")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield

    app = FastAPI(title="v2l-fast", summary="Frames2LoRA adapters of videos, served OpenAI-style", lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.chats, app.state.uploads = engine, limits, chats, uploads

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        error = ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, err: ClientDisconnect):
        return Response(status_code=499)  # no one reads it; the request's slots are already released

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        message = f"{type(err).__name__}: {' '.join(str(err).split())}"
        return JSONResponse(ApiError(500, message, code="internal_error").body(), status_code=500)

    def adapter_of(model: str) -> str | None:
        if model == served_model_name:
            return None
        if model not in engine.store:
            raise ApiError(404, f"model: expected {served_model_name!r} or the id of a stored adapter (GET "
                           f"/v1/models), got {model[:140]!r}", param="model", code="model_not_found")
        return model

    def sampling(chat: ChatRequest, prompt_tokens: int) -> SamplingParams:
        asked = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
        name = "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"
        if asked is None:
            asked = min(limits.max_tokens, engine.max_len - prompt_tokens)
            if asked < 1:
                raise ApiError(400, f"messages: expected a prompt of fewer than {engine.max_len} tokens (the "
                               f"engine's max_len), got {prompt_tokens}", param="messages",
                               code="context_length_exceeded")
        elif asked > limits.max_tokens:
            raise ApiError(400, f"{name}: expected at most {limits.max_tokens}, got {asked}", param=name)
        stop = chat.stop
        if isinstance(stop, list) and len(stop) > _MAX_STOP:
            raise ApiError(400, f"stop: expected at most {_MAX_STOP} strings, got {len(stop)}", param="stop")
        try:
            temperature = default_temperature if chat.temperature is None else chat.temperature
            return SamplingParams(max_tokens=asked, temperature=temperature,
                                  top_p=1.0 if chat.top_p is None else chat.top_p,
                                  stop=() if stop is None else stop, seed=chat.seed)
        except ValueError as err:
            raise _bad_input(err) from None

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI chat completion: ``model`` = adapter id (or the base-model name), text-only messages."""
        chats.acquire()
        handed_off = False
        try:
            try:
                chat = ChatRequest.model_validate(await read_json(request, limits.max_request_bytes))
            except ValidationError as err:
                raise _validation_error(err) from None
            _refuse_unsupported(chat)
            adapter = adapter_of(chat.model)
            try:
                ids = await anyio.to_thread.run_sync(engine.prompt_ids, _messages(chat))
            except ValueError as err:
                raise _bad_input(err) from None
            if len(ids) > limits.max_prompt_tokens:
                raise ApiError(400, f"messages: expected at most {limits.max_prompt_tokens} prompt tokens, got "
                               f"{len(ids)}", param="messages", code="context_length_exceeded")
            params = sampling(chat, len(ids))
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            try:
                handle = engine.submit(prompt_ids=ids, adapter=adapter, params=params, request_id=request_id)
            except EngineFull as err:
                raise ApiError(429, f"the engine's queue is full ({err}); retry later", code="queue_full") from None
            except AdapterNotFound as err:
                raise _bad_input(err, 404, "model_not_found") from None
            except ValueError as err:
                raise _bad_input(err) from None
            events = _Events(handle, asyncio.get_running_loop())
            head = {"id": request_id, "created": int(time.time()), "model": chat.model, "system_fingerprint": None}
            if chat.stream:
                include_usage = bool((chat.stream_options or {}).get("include_usage"))
                response = _EngineStream(_stream(events, head, include_usage), handle, chats.release)
                handed_off = True
                return response
            return await _complete(request, events, head)
        finally:
            if not handed_off:
                chats.release()

    async def _complete(request: Request, events: _Events, head: dict) -> dict:
        watcher = asyncio.ensure_future(_disconnected(request))
        text = []
        try:
            while True:
                waiter = asyncio.ensure_future(events.next())
                await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():  # the client went away: free its slot, answer no one
                    waiter.cancel()
                    events.handle.cancel()
                    raise ApiError(499, "client closed the request", code="client_closed")
                event = waiter.result()
                text.append(event.text)
                if event.finish_reason is not None:
                    break
        finally:
            watcher.cancel()
            if not events.handle.done:
                events.handle.cancel()
        if event.finish_reason not in ("stop", "length"):
            raise _finish_error(event)
        done = events.completion
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": event.finish_reason, "logprobs": None}],
                "usage": usage(done.prompt_tokens, done.completion_tokens)}

    async def _stream(events: _Events, head: dict, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.next()
            if event.text:
                yield chunk({"content": event.text})
            if event.finish_reason is not None:
                break
        if event.finish_reason in ("stop", "length"):
            yield chunk({}, event.finish_reason)
            if include_usage:
                done = events.completion
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                            "usage": usage(done.prompt_tokens, done.completion_tokens)})
        else:
            yield _sse(_finish_error(event).body())
        yield _sse("[DONE]")

    # --- models and adapters ----------------------------------------------------------------

    def model_card(model_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "v2l-fast",
                "root": model_id, "parent": parent}

    @app.get("/v1/models")
    async def models():
        """The base model and every stored adapter (``parent``: the base model), OpenAI's list format."""
        ids = await anyio.to_thread.run_sync(engine.store.ids)
        return {"object": "list", "data": [model_card(served_model_name, None)]
                + [model_card(i, served_model_name) for i in ids if i != served_model_name]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        """One model card: the base model or a stored adapter (404 otherwise)."""
        adapter = adapter_of(model)
        return model_card(model, None if adapter is None else served_model_name)

    def adapter_card(adapter_id: str, adapters: Adapters | None = None, **extra) -> dict:
        card = {"id": adapter_id, "object": "adapter", "model": served_model_name}
        if adapters is not None:
            card.update(rank=adapters.rank, layers=int(adapters.A.shape[1]), alpha=adapters.alpha,
                        bias_rank=adapters.bias_rank)
        return {**card, **extra}

    def check_new_id(adapter_id: str, overwrite: bool) -> str:
        try:
            check_adapter_id(adapter_id)
        except ValueError as err:
            raise _bad_input(err, code="invalid_adapter_id") from None
        if adapter_id == served_model_name:
            raise ApiError(400, f"id: expected an adapter id other than the base model's name "
                           f"{served_model_name!r}", param="id", code="invalid_adapter_id")
        if not overwrite and adapter_id in engine.store:
            raise ApiError(409, f"id: expected a new adapter id, got {adapter_id!r}, which exists (PUT, or "
                           "overwrite=true, replaces it)", param="id", code="adapter_exists")
        return adapter_id

    def flag(fields: dict, name: str) -> bool:
        value = fields.get(name, "false").lower()
        if value not in ("true", "false", "1", "0"):
            raise ApiError(400, f"{name}: expected true or false, got {value[:20]!r}", param=name)
        return value in ("true", "1")

    async def store(adapter_id: str, adapters: Adapters) -> None:
        try:
            await anyio.to_thread.run_sync(lambda: engine.add_adapter(adapter_id, adapters, persist=True))
        except ValueError as err:
            raise _bad_input(err, code="invalid_adapter") from None

    @app.post("/v1/adapters", status_code=201)
    async def upload_video(request: Request):
        """Upload a video (multipart ``file`` or the raw body; ``id``, ``max_frames``, ``overwrite``
        as form fields or query parameters), internalize it and store the adapter under ``id``."""
        uploads.acquire()
        try:
            if internalizer is None:
                raise ApiError(400, "this server internalizes no videos (started without a hypernetwork); upload "
                               "an adapters file to /v1/adapters/{id}", code="internalization_disabled")
            async with _upload_folder() as folder:
                fields, path = await receive_upload(request, folder, limits.max_upload_bytes)
                overwrite = flag(fields, "overwrite")
                adapter_id = check_new_id(fields.get("id") or f"video-{uuid.uuid4().hex[:12]}", overwrite)
                cap = limits.max_frames or internalizer.max_frames
                max_frames = fields.get("max_frames", str(min(cap, internalizer.max_frames)))
                if not max_frames.isdigit() or not 1 <= int(max_frames) <= cap:
                    raise ApiError(400, f"max_frames: expected an int in [1, {cap}], got {max_frames[:20]!r}",
                                   param="max_frames")
                await anyio.to_thread.run_sync(probe_video, path, limits)
                start = time.perf_counter()
                try:
                    adapters, frames = await anyio.to_thread.run_sync(internalizer, path, int(max_frames))
                except ValueError as err:
                    raise _bad_input(ValueError(str(err).replace(path, "the uploaded video")),
                                     code="invalid_video") from None
                seconds = time.perf_counter() - start
            check_new_id(adapter_id, overwrite)  # taken while internalizing?
            await store(adapter_id, adapters)
            return adapter_card(adapter_id, adapters, frames=frames, internalize_seconds=round(seconds, 3))
        finally:
            uploads.release()

    async def upload_adapters(adapter_id: str, request: Request, overwrite: bool) -> dict:
        uploads.acquire()
        try:
            check_new_id(adapter_id, overwrite or flag(dict(request.query_params), "overwrite"))
            async with _upload_folder() as folder:
                _, path = await receive_upload(request, folder, limits.max_upload_bytes)
                try:
                    adapters = await anyio.to_thread.run_sync(Adapters.load, path)
                except (ValueError, KeyError, TypeError) as err:
                    message = str(err).replace(repr(path), "the uploaded file").replace(path, "the uploaded file")
                    raise ApiError(400, "file: expected a v2l_fast adapters file (Adapters.save), got one that "
                                   f"does not load: {' '.join(message.split())}", param="file",
                                   code="invalid_adapter") from None
            await store(adapter_id, adapters)
            return adapter_card(adapter_id, adapters)
        finally:
            uploads.release()

    @app.post("/v1/adapters/{adapter_id}", status_code=201)
    async def create_adapter(adapter_id: str, request: Request):
        """Upload an adapters safetensors file (one video) as adapter ``adapter_id`` (409 if it exists)."""
        return await upload_adapters(adapter_id, request, overwrite=False)

    @app.put("/v1/adapters/{adapter_id}")
    async def replace_adapter(adapter_id: str, request: Request):
        """Upload an adapters safetensors file as adapter ``adapter_id``, replacing one that exists."""
        return await upload_adapters(adapter_id, request, overwrite=True)

    @app.get("/v1/adapters")
    async def list_adapters():
        """Every stored adapter id."""
        ids = await anyio.to_thread.run_sync(engine.store.ids)
        return {"object": "list", "data": [adapter_card(i) for i in ids]}

    def known(adapter_id: str) -> str:
        try:
            check_adapter_id(adapter_id)
        except ValueError as err:
            raise _bad_input(err, code="invalid_adapter_id") from None
        if adapter_id not in engine.store:
            raise ApiError(404, f"adapter_id: expected the id of a stored adapter, got {adapter_id!r}",
                           param="adapter_id", code="adapter_not_found")
        return adapter_id

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str):
        """One adapter's rank, layers and scale."""
        try:
            adapters = await anyio.to_thread.run_sync(engine.store.get, known(adapter_id))
        except AdapterNotFound as err:
            raise _bad_input(err, 404, "adapter_not_found") from None
        except ValueError as err:
            raise _bad_input(err, 500, "invalid_adapter") from None
        return adapter_card(adapter_id, adapters)

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str):
        """Forget an adapter (its file too); requests already running with it finish."""
        if not await anyio.to_thread.run_sync(engine.delete_adapter, known(adapter_id)):
            raise ApiError(404, f"adapter_id: expected the id of a stored adapter, got {adapter_id!r}",
                           param="adapter_id", code="adapter_not_found")
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    @app.get("/health")
    async def health():
        """``{"status": "ok"}`` while the server runs."""
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats():
        """The engine's counters (`Engine.stats`) and the server's requests in flight."""
        return {"engine": engine.stats(), "chat_requests_in_flight": chats.value, "uploads_in_flight": uploads.value,
                "limits": dataclasses.asdict(limits)}

    return app
