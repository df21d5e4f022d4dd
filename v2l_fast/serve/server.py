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

This module holds the chat request model, the bridge from the engine's threads to the event
loop, SSE and the app's routes; it stands on `limits` (`ServerLimits`, `ApiError`, the
in-flight counters), `uploads` (request bodies and videos read under those limits) and
`internalizer` (`Internalizer`, `unfolded_copy`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from v2l_fast.adapters.core import Adapters
from v2l_fast.adapters.store import AdapterNotFound, check_adapter_id
from v2l_fast.errors import fail
from v2l_fast.serve.engine import Completion, Engine, EngineFull, RequestHandle, StreamEvent
from v2l_fast.serve.internalizer import Internalizer
from v2l_fast.serve.limits import ApiError, Counter, ServerLimits, bad_input
from v2l_fast.serve.sampling import SamplingParams
from v2l_fast.serve.uploads import probe_video, read_json, receive_upload, upload_folder

__all__ = ["DEFAULT_MODEL_NAME", "create_app"]

DEFAULT_MODEL_NAME = "base"
_MAX_STOP = 16


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
    chats = Counter(limits.max_concurrent, "concurrent chat requests", "too_many_requests")
    uploads = Counter(limits.max_internalizations, "adapter uploads in flight", "too_many_uploads")

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
            raise bad_input(err) from None

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
                raise bad_input(err) from None
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
                raise bad_input(err, 404, "model_not_found") from None
            except ValueError as err:
                raise bad_input(err) from None
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
            raise bad_input(err, code="invalid_adapter_id") from None
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
            raise bad_input(err, code="invalid_adapter") from None

    @app.post("/v1/adapters", status_code=201)
    async def upload_video(request: Request):
        """Upload a video (multipart ``file`` or the raw body; ``id``, ``max_frames``, ``overwrite``
        as form fields or query parameters), internalize it and store the adapter under ``id``."""
        uploads.acquire()
        try:
            if internalizer is None:
                raise ApiError(400, "this server internalizes no videos (started without a hypernetwork); upload "
                               "an adapters file to /v1/adapters/{id}", code="internalization_disabled")
            async with upload_folder() as folder:
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
                    raise bad_input(ValueError(str(err).replace(path, "the uploaded video")),
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
            async with upload_folder() as folder:
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
            raise bad_input(err, code="invalid_adapter_id") from None
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
            raise bad_input(err, 404, "adapter_not_found") from None
        except ValueError as err:
            raise bad_input(err, 500, "invalid_adapter") from None
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
