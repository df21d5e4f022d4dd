"""The OpenAI-compatible server against a real uvicorn on loopback, through the official
``openai`` client and raw HTTP: answers equal `v2l_fast.api.ask`'s, streaming, 200 concurrent
requests, client disconnects, adapter uploads, and every bad request refused with a JSON error.

Tiny random models (a 3-frame, 64-pixel SmolVLM2 and a small Frames2LoRA) keep it quick on a CPU.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import torch
import uvicorn

from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.adapters.store import AdapterStore
from v2l_fast.api import ask, internalize
from v2l_fast.serve import Engine, SamplingParams
from v2l_fast.serve.internalizer import Internalizer, unfolded_copy
from v2l_fast.serve.limits import ServerLimits
from v2l_fast.serve.server import create_app
from v2l_fast.testing import tiny_hypernet, write_test_video
from v2l_fast.vlm.factory import tiny_vlm

PROMPTS = ("What is it?", "Where does it go?", "Which colour?", "How many?", "Is it fast?")
MAX_TOKENS = 8
MAX_BATCH = 32


class LiveServer:
    """A uvicorn server for ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, backlog=1024)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def client(self, **kwargs) -> openai.OpenAI:
        """The official client pointed at this server."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def distinct(adapters: Adapters, scale: float = 5.0) -> Adapters:
    """``adapters`` with their per-video rows redrawn larger: a tiny random model answers most
    questions alike whatever a small adapter says, and a mixed-up answer must show."""
    A, B = adapters.A.clone(), adapters.B.clone()
    rows = slice(0, adapters.rank - adapters.bias_rank)  # the bias block (the last rows) stays
    generator = torch.Generator().manual_seed(1)
    A[:, :, rows] = torch.randn(A[:, :, rows].shape, generator=generator) * A[:, :, rows].std()
    B[:, :, rows] = torch.randn(B[:, :, rows].shape, generator=generator) * scale * B[:, :, rows].std()
    return Adapters(A, B, adapters.alpha, adapters.base, adapters.bias_rank)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models, three clips' adapters, a started engine and a live server (module-wide)."""
    folder = tmp_path_factory.mktemp("serve")
    vlm = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    hypernet = tiny_hypernet(vlm.model).eval()
    twin = unfolded_copy(vlm)  # before the engine folds vlm's down_proj
    videos = []
    for i in range(3):
        videos.append(str(folder / f"clip{i}.mp4"))
        write_test_video(videos[-1], seed=i)
    adapters = distinct(internalize(videos, vlm=twin, hypernet=hypernet))
    store = AdapterStore(folder / "adapters", base=base_fingerprint(twin.model))
    engine = Engine(vlm, hypernet=hypernet, store=store, max_batch=MAX_BATCH, max_len=512)
    for i in range(3):
        engine.add_adapter(f"clip-{i}", adapters[[i]])
    internalizer = Internalizer(twin, hypernet)
    limits = ServerLimits(max_tokens=400, max_upload_bytes=1 << 20)
    server = LiveServer(create_app(engine, internalizer=internalizer, limits=limits))
    world = dict(vlm=vlm, twin=twin, hypernet=hypernet, adapters=adapters, videos=videos, engine=engine,
                 internalizer=internalizer, server=server, client=server.client(), folder=folder, answers={})
    yield world
    server.stop()
    engine.stop()


def reference(world, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """The answer of `v2l_fast.api.ask` alone, with the adapter ``model`` names (cached)."""
    key = (model, prompt, max_tokens)
    if key not in world["answers"]:
        adapters = None if model == "base" else world["adapters"][[int(model.split("-")[1])]]
        with world["internalizer"].lock:  # the twin is shared with the server's internalizations
            world["answers"][key] = ask(adapters, [prompt], vlm=world["twin"], max_new_tokens=max_tokens)[0]
    return world["answers"][key]


def alone(world, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """The engine's greedy answer to this request alone (call while nothing else runs; cached)."""
    key = ("engine", model, prompt, max_tokens)
    if key not in world["answers"]:
        params = SamplingParams(max_tokens=max_tokens)
        handle = world["engine"].submit(prompt, adapter=None if model == "base" else model, params=params)
        world["answers"][key] = handle.result(60).text
    return world["answers"][key]


def chat(client, model: str, prompt: str, **kwargs):
    """One greedy chat completion."""
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kwargs)


def wait_idle(engine, slots: int = MAX_BATCH, timeout: float = 30) -> dict:
    """The engine's stats once nothing waits or runs and all ``slots`` KV slots are free (fails
    after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["waiting"] == 0 and stats["running"] == 0 and stats["free_kv_slots"] == slots:
            return stats
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """``response`` is ``status`` with an OpenAI-style error body; returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def alive(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def capture_handles(engine, monkeypatch) -> list:
    """Record the `RequestHandle` of every request the engine takes from now on."""
    handles, submit = [], engine.submit

    def recording(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", recording)
    return handles


# --- answers ------------------------------------------------------------------------------

def test_chat_with_each_adapter_equals_ask(world):
    client = world["client"]
    answers = set()
    for model in ("clip-0", "clip-1", "clip-2", "base"):
        out = chat(client, model, PROMPTS[0])
        assert out.object == "chat.completion" and out.model == model and len(out.choices) == 1
        choice = out.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content.strip() == reference(world, model, PROMPTS[0])
        assert choice.finish_reason in ("stop", "length")
        assert out.usage.completion_tokens <= MAX_TOKENS and out.usage.prompt_tokens > 0
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        answers.add(choice.message.content)
    assert len(answers) > 1, "the adapters should change the answer"
    # the engine's own greedy answer is the same text
    completion = world["engine"].submit(PROMPTS[0], adapter="clip-1").result(60)
    assert completion.text == chat(client, "clip-1", PROMPTS[0], max_tokens=128).choices[0].message.content


def test_stream_concatenates_to_the_answer(world):
    client = world["client"]
    for model in ("clip-2", "base"):
        stream = chat(client, model, PROMPTS[1], stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= MAX_TOKENS
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat(client, model, PROMPTS[1]).choices[0].message.content
        assert text.strip() == reference(world, model, PROMPTS[1])


def test_raw_sse_format(world):
    body = {"model": "clip-0", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{world['server'].url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


def test_models_list_base_and_adapters(world):
    models = world["client"].models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == "base" and {"clip-0", "clip-1", "clip-2"} <= set(ids)
    assert all(m.object == "model" for m in models.data)
    assert world["client"].models.retrieve("clip-1").parent == "base"
    assert world["client"].models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError):
        world["client"].models.retrieve("nothing-here")
    listed = httpx.get(f"{world['server'].url}/v1/adapters", timeout=30).json()
    assert {"clip-0", "clip-1", "clip-2"} <= {a["id"] for a in listed["data"]}


def test_chat_messages_and_sampling(world):
    client = world["client"]
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": PROMPTS[3]}]}]
    out = client.chat.completions.create(model="clip-0", messages=messages, max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens <= 3
    seeded = [client.chat.completions.create(model="clip-1", messages=messages, max_tokens=8, temperature=1.5,
                                             top_p=0.9, seed=123).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    full = chat(client, "clip-0", PROMPTS[0], max_tokens=8).choices[0].message.content
    if len(full) > 2:
        stopped = chat(client, "clip-0", PROMPTS[0], max_tokens=8, stop=[full[2:4]]).choices[0]
        assert stopped.message.content == full[:full.index(full[2:4])] and stopped.finish_reason == "stop"


# --- load -------------------------------------------------------------------------------------

def test_200_concurrent_requests_no_lost_or_mixed_answers(world):
    models = ("clip-0", "clip-1", "clip-2", "base")
    jobs = [(models[i % 4], PROMPTS[(i // 4) % len(PROMPTS)], (4, 8)[(i // 20) % 2], i % 3 == 0) for i in range(200)]
    expected = {job[:3]: alone(world, *job[:3]) for job in jobs}
    for model, prompt, max_tokens in expected:
        if max_tokens == MAX_TOKENS:
            assert expected[model, prompt, max_tokens].strip() == reference(world, model, prompt)
    assert len(set(expected.values())) >= 8, set(expected.values())
    client = world["server"].client()
    start = threading.Barrier(len(jobs))

    def run(job):
        model, prompt, max_tokens, stream = job
        start.wait()
        if not stream:
            return chat(client, model, prompt, max_tokens=max_tokens).choices[0].message.content
        chunks = chat(client, model, prompt, max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    began = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    seconds = time.perf_counter() - began
    print(f"\n200 concurrent requests (1/3 streamed, 4 or 8 tokens each): {seconds:.1f} s")
    wrong = [(job, got, expected[job[:3]]) for job, got in zip(jobs, answers) if got != expected[job[:3]]]
    assert not wrong, wrong[:5]
    wait_idle(world["engine"])


# --- disconnects ------------------------------------------------------------------------------

def test_client_disconnect_mid_stream_frees_the_slot(world, monkeypatch):
    engine, server = world["engine"], world["server"]
    wait_idle(engine)
    handles = capture_handles(engine, monkeypatch)
    body = {"model": "clip-0", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        content = 0
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                content += 1
                if content == 2:
                    break
    # closed early: the engine cancels the request and frees its slot
    completion = handles[0].result(30)
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 400
    wait_idle(engine)
    alive(server)
    assert chat(world["client"], "clip-0", PROMPTS[0]).choices[0].message.content.strip() == \
        reference(world, "clip-0", PROMPTS[0])


def test_client_disconnect_while_waiting_non_stream(world, monkeypatch):
    engine, server = world["engine"], world["server"]
    handles = capture_handles(engine, monkeypatch)
    body = {"model": "clip-1", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400,
            "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.5)
    completion = handles[0].result(30)
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 400
    wait_idle(engine)
    alive(server)


# --- adapters ---------------------------------------------------------------------------------

def test_upload_video_then_ask_then_delete(world):
    server, client, twin = world["server"], world["client"], world["twin"]
    video = str(world["folder"] / "upload.mp4")
    write_test_video(video, num_frames=16, seed=11)  # 4 s at 4 fps: 3 frames at 1 fps
    with open(video, "rb") as f:
        response = httpx.post(f"{server.url}/v1/adapters", files={"file": ("upload.mp4", f, "video/mp4")},
                              data={"id": "uploaded"}, timeout=120)
    assert response.status_code == 201, response.text
    card = response.json()
    assert card["id"] == "uploaded" and card["frames"] == 3 and card["object"] == "adapter"
    with world["internalizer"].lock:
        expected = ask(internalize([video], vlm=twin, hypernet=world["hypernet"]), [PROMPTS[0]], vlm=twin,
                       max_new_tokens=MAX_TOKENS)[0]
    assert chat(client, "uploaded", PROMPTS[0]).choices[0].message.content.strip() == expected
    assert "uploaded" in [m.id for m in client.models.list().data]
    assert (world["folder"] / "adapters" / "uploaded.safetensors").is_file()  # persisted
    # the raw body works too, with a generated id
    with open(video, "rb") as f:
        raw = httpx.post(f"{server.url}/v1/adapters", content=f.read(), headers={"content-type": "video/mp4"},
                         timeout=120)
    assert raw.status_code == 201, raw.text
    generated = raw.json()["id"]
    assert generated.startswith("video-")
    assert chat(client, generated, PROMPTS[0]).choices[0].message.content.strip() == expected
    # an existing id is refused unless overwritten
    with open(video, "rb") as f:
        assert_error(httpx.post(f"{server.url}/v1/adapters", files={"file": ("v.mp4", f)}, data={"id": "uploaded"},
                                timeout=120), 409, "adapter_exists")
    for adapter_id in ("uploaded", generated):
        deleted = httpx.delete(f"{server.url}/v1/adapters/{adapter_id}", timeout=30)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert "uploaded" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        chat(client, "uploaded", PROMPTS[0])
    assert_error(httpx.delete(f"{server.url}/v1/adapters/uploaded", timeout=30), 404, "adapter_not_found")


def test_upload_adapters_file(world):
    server, client = world["server"], world["client"]
    path = world["folder"] / "one.safetensors"
    world["adapters"][[2]].save(path)
    response = httpx.post(f"{server.url}/v1/adapters/from-file", content=path.read_bytes(), timeout=60)
    assert response.status_code == 201, response.text
    assert response.json()["rank"] == world["adapters"].rank
    assert chat(client, "from-file", PROMPTS[2]).choices[0].message.content.strip() == \
        reference(world, "clip-2", PROMPTS[2])
    assert_error(httpx.post(f"{server.url}/v1/adapters/from-file", content=path.read_bytes(), timeout=60), 409)
    world["adapters"][[0]].save(path)
    with open(path, "rb") as f:
        replaced = httpx.put(f"{server.url}/v1/adapters/from-file", files={"file": ("a.safetensors", f)}, timeout=60)
    assert replaced.status_code == 200, replaced.text
    assert chat(client, "from-file", PROMPTS[2]).choices[0].message.content.strip() == \
        reference(world, "clip-0", PROMPTS[2])
    assert httpx.get(f"{server.url}/v1/adapters/from-file", timeout=30).json()["layers"] == \
        world["adapters"].A.shape[1]
    # two videos in one file, a file of another format, garbage
    world["adapters"][[0, 1]].save(path)
    assert_error(httpx.put(f"{server.url}/v1/adapters/from-file", content=path.read_bytes(), timeout=60), 400)
    assert_error(httpx.put(f"{server.url}/v1/adapters/from-file", content=b"not safetensors", timeout=60), 400,
                 "invalid_adapter")
    httpx.delete(f"{server.url}/v1/adapters/from-file", timeout=30)


# --- bad requests -----------------------------------------------------------------------------

def test_bad_requests_get_json_errors(world):
    server, client = world["server"], world["client"]
    url = f"{server.url}/v1/chat/completions"
    good = {"model": "clip-0", "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 2}
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "no-such-adapter", PROMPTS[0])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "clip-0", PROMPTS[0], n=2)
    assert err.value.body["param"] == "n"
    cases = [
        ({**good, "model": "../x"}, 404, "model_not_found"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, None),
        ({**good, "messages": []}, 400, None),
        ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400, None),
        ({**good, "max_tokens": 100_000}, 400, None),
        ({**good, "max_tokens": 0}, 400, None),
        ({**good, "temperature": -1}, 400, None),
        ({**good, "top_p": 0}, 400, None),
        ({**good, "seed": -5}, 400, None),
        ({**good, "stop": ""}, 400, None),
        ({**good, "logprobs": True}, 400, None),
        ({**good, "max_tokens": "many"}, 400, None),
        ({"messages": good["messages"]}, 400, None),
        ({**good, "messages": [{"role": "user", "content": "x" * 9000}]}, 400, "context_length_exceeded"),
    ]
    for body, status, code in cases:
        assert_error(httpx.post(url, json=body, timeout=30), status, code)
    assert_error(httpx.post(url, content=b"{not json", timeout=30), 400, "invalid_json")
    assert_error(httpx.post(url, content=b"[1, 2]", timeout=30), 400, "invalid_json")
    assert_error(httpx.post(url, content=b"x" * (2 << 20), timeout=30), 413, "request_too_large")
    assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(url, timeout=30), 405)
    # adapter ids
    video = world["videos"][0]
    with open(video, "rb") as f:
        error = assert_error(httpx.post(f"{server.url}/v1/adapters", files={"file": ("v.mp4", f)},
                                        data={"id": "../x"}, timeout=60), 400, "invalid_adapter_id")
    assert error["param"] == "adapter_id"
    for bad in ("..x", ".hidden", "a" * 200):
        assert_error(httpx.delete(f"{server.url}/v1/adapters/{bad}", timeout=30), 400, "invalid_adapter_id")
        assert_error(httpx.post(f"{server.url}/v1/adapters/{bad}", content=b"x", timeout=30), 400)
    with open(video, "rb") as f:
        assert_error(httpx.post(f"{server.url}/v1/adapters?id=base", content=f.read(), timeout=60), 400)
    # not a video, a multipart body without its file, too many frames
    assert_error(httpx.post(f"{server.url}/v1/adapters", content=b"\x00" * 1000, timeout=60), 400, "invalid_video")
    assert_error(httpx.post(f"{server.url}/v1/adapters", files={"other": ("v.mp4", b"x")}, timeout=60), 400)
    with open(video, "rb") as f:
        assert_error(httpx.post(f"{server.url}/v1/adapters", files={"file": ("v.mp4", f)}, data={"max_frames": "99"},
                                timeout=60), 400)
    assert_error(httpx.post(f"{server.url}/v1/adapters", content=b"x" * ((1 << 20) + 1), timeout=60), 413)
    assert "../x" not in httpx.get(f"{server.url}/v1/adapters", timeout=30).text
    alive(server)
    wait_idle(world["engine"])
    assert chat(client, "clip-0", PROMPTS[0]).choices[0].message.content.strip() == \
        reference(world, "clip-0", PROMPTS[0])


def test_limits_429_and_413_on_a_tiny_server(world):
    """A second app with tiny limits over an engine that is not running yet: requests stay put."""
    engine = Engine(world["vlm"], hypernet=world["hypernet"], store=AdapterStore(), max_batch=2, max_len=128,
                    max_queue=1)
    engine.add_adapter("clip-0", world["adapters"][[0]])
    limits = ServerLimits(max_upload_bytes=2000, max_request_bytes=4096, max_concurrent=1, max_internalizations=1,
                          max_tokens=8)
    server = LiveServer(create_app(engine, limits=limits, start_engine=False))
    url = f"{server.url}/v1/chat/completions"
    body = {"model": "clip-0", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4,
            "temperature": 0}
    try:
        assert_error(httpx.post(f"{server.url}/v1/adapters/x", content=b"x" * 5000, timeout=30), 413)
        chunks = (b"x" * 1000 for _ in range(5))  # no content-length: counted while read
        assert_error(httpx.post(f"{server.url}/v1/adapters/x", content=chunks, timeout=30), 413)
        assert_error(httpx.post(url, content=json.dumps({**body, "pad": "x" * 5000}), timeout=30), 413)
        assert_error(httpx.post(f"{server.url}/v1/adapters", content=b"x", timeout=30), 400,
                     "internalization_disabled")
        assert_error(httpx.post(url, json={**body, "max_tokens": 9}, timeout=30), 400)
        # one request in flight (queued: the engine is not running) → the next is refused
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as held:
            assert held.status_code == 200
            assert_error(httpx.post(url, json=body, timeout=30), 429, "too_many_requests")
            with pytest.raises(openai.RateLimitError):
                server.client().chat.completions.create(model="base", messages=body["messages"], max_tokens=2)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/v1/stats", timeout=30).json()["chat_requests_in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # its cancelled request still fills the engine's one-request queue → 429 queue_full
        assert_error(httpx.post(url, json=body, timeout=30), 429, "queue_full")
        # an upload in flight (its body arriving slowly) → a second upload is refused
        release = threading.Event()

        def slow_body():
            yield b"x" * 100
            release.wait(30)
            yield b"x" * 100

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{server.url}/v1/adapters/slow", content=slow_body(), timeout=30)
            deadline = time.monotonic() + 10
            while httpx.get(f"{server.url}/v1/stats", timeout=30).json()["uploads_in_flight"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert_error(httpx.post(f"{server.url}/v1/adapters/other", content=b"x", timeout=30), 429,
                         "too_many_uploads")
            release.set()
            assert_error(first.result(), 400, "invalid_adapter")
        # clients that go away in the middle of their body free their places
        port = int(server.url.rsplit(":", 1)[1])
        for path in ("/v1/adapters/gone", "/v1/chat/completions"):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"x" * 10)
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while True:
            stats = httpx.get(f"{server.url}/v1/stats", timeout=30).json()
            if stats["uploads_in_flight"] == 0 and stats["chat_requests_in_flight"] == 0:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.02)
        # the engine starts: the cancelled request leaves, and the server answers
        engine.start()
        wait_idle(engine, slots=2)
        out = server.client().chat.completions.create(model="clip-0", messages=body["messages"], max_tokens=4,
                                                      temperature=0)
        assert out.choices[0].message.content.strip() == reference(world, "clip-0", PROMPTS[0], 4)
    finally:
        server.stop()
        engine.stop()


def test_unfolded_copy_shares_all_but_down_proj(world):
    from v2l_fast.vlm.lora_patch import down_proj_targets

    vlm, twin = world["vlm"], world["twin"]
    shared = {p.data_ptr() for p in vlm.model.parameters()} & {p.data_ptr() for p in twin.model.parameters()}
    down = {m.weight.data_ptr() for m in down_proj_targets(twin.model)}
    assert not shared & down
    assert len(shared) == len(list(vlm.model.parameters())) - len(down)
    assert not any(torch.equal(a.weight, b.weight) for a, b in zip(down_proj_targets(vlm.model),
                                                                   down_proj_targets(twin.model)))
    with pytest.raises(ValueError, match="folded"):
        unfolded_copy(vlm)


def test_cli_serve_embedded_default(tmp_path):
    """``v2l-fast serve`` on the embedded default: the sample clips are adapters at once, and their
    answers are `ask`'s; Ctrl-C stops it cleanly."""
    import v2l_fast
    from v2l_fast.data.embedded import embedded_default

    command = [sys.executable, "-m", "v2l_fast", "serve", "--port", "0", "--device", "cpu", "--log-level", "warning",
               "--adapters-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        seen = []
        while not any("base_url" in line for line in seen):
            seen.append(lines.get(timeout=120))
        base_url = re.search(r"base_url (\S+)", seen[-1]).group(1)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base_url.replace("/v1", "/health"), timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, seen
                time.sleep(0.1)
        embedded = embedded_default()
        clip, rows = embedded.clips[0]
        clip_id = os.path.splitext(os.path.basename(clip))[0]
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
        assert clip_id in [m.id for m in client.models.list().data]
        question = rows[0].prompt
        answer = client.chat.completions.create(model=clip_id, messages=[{"role": "user", "content": question}],
                                                max_tokens=16).choices[0].message.content
        session = v2l_fast.load(embedded.vlm, embedded.hypernet, dtype=torch.float32, device="cpu")
        assert answer.strip() == session.ask(session.internalize([clip]), [question], max_new_tokens=16)[0]
        assert not list(tmp_path.iterdir())  # the samples are in memory, not in the adapters folder
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    assert code == 0, "".join(seen)


def test_cli_serve_refuses_bad_options(capsys):
    from v2l_fast.cli import main

    assert main(["serve", "--vlm", "x"]) == 2
    assert "--vlm/--hypernet" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1]), "--device", "cpu"]) == 2
    assert "free to listen on" in capsys.readouterr().err
