"""The serving engine: one frozen SmolVLM2 answering many requests, each with its own adapter.

    engine = Engine(vlm, hypernet=hypernet)            # folds the hypernetwork's bias block once
    engine.add_adapter("cat-video", adapters)          # an `Adapters` of one video (or a store file)
    handle = engine.submit("What colour is the cat?", adapter="cat-video")
    engine.run_until_done()                            # or engine.start(): a background thread
    handle.result().text

Continuous batching: every `step` admits waiting requests into free KV slots (up to
``max_prefill_tokens`` of prompt per step), then runs ONE packed forward (`PackedDecoder`) over
the new prompts and one token of every running request, whatever adapter each uses, and samples
each request's next token. Requests join and leave between steps; a finished request frees its
KV slot and unpins its adapter at once. Tokens stream to each request's `RequestHandle`.

Adapters: an `AdapterStore` (files and/or in-memory tensors, base fingerprint checked) feeds a
device `AdapterPool` (LRU under a byte budget, per-slot ranks). With a hypernetwork (or an
explicit bias block) the engine folds the shared bias block into ``down_proj`` once
(`v2l_fast.adapters.fold`) and serves only each video's own rows: half the adapter bytes and
LoRA FLOPs of every step at the released rank. A request without an adapter is the base model.

Greedy answers equal `v2l_fast.api.ask`'s for the same adapter and prompt, whatever shares the
batch (tests/test_serve_engine.py): the same weights, the same `lora_sgmv` numerics, argmax.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from v2l_fast.adapters.core import MATCHED_FIELDS, Adapters, base_fingerprint
from v2l_fast.adapters.fold import FoldedBias, bias_digest, fold_bias, folded_bias_of
from v2l_fast.adapters.store import AdapterNotFound, AdapterPool, AdapterStore, PoolExhausted, check_adapter_id
from v2l_fast.api import conversation_ids, question_ids, visual_token_ids
from v2l_fast.compat import check_fits
from v2l_fast.errors import fail
from v2l_fast.serve.decoder import PackedBatch, PackedDecoder
from v2l_fast.serve.sampling import DEFAULT_MAX_TOKENS, SamplingParams, TextTracker, choose_tokens
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.lora_patch import down_proj_targets, is_patched

__all__ = ["Completion", "Engine", "EngineFull", "RequestHandle", "StreamEvent"]


class EngineFull(RuntimeError):
    """The waiting queue is at ``max_queue`` requests (an HTTP server answers 429)."""


@dataclass(frozen=True)
class StreamEvent:
    """A piece of one request's answer: new text, and on the last event the finish reason
    (``"stop"``: end of sequence or a stop string, ``"length"``: max_tokens,
    ``"cancelled"``, ``"error"`` with ``error`` set)."""

    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Completion:
    """A finished request: its text, token ids, finish reason, token counts and timings (s)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    time_to_first_token: float | None = None
    latency: float | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated."""
        return len(self.token_ids)


class RequestHandle:
    """A submitted request: iterate it for `StreamEvent` s as they come, or wait for `result`.

    Thread-safe: the engine thread feeds it; any one consumer thread reads it. `cancel` stops
    the request at the next step (its KV slot and adapter are freed then).
    """

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self._events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The `Completion`, waiting up to ``timeout`` seconds (TimeoutError after)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id}: not finished after {timeout} s")
        return self._completion

    def cancel(self) -> None:
        """Ask the engine to drop this request (e.g. its client went away)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Whether the request has finished (any reason)."""
        return self._done.is_set()

    def _emit(self, event: StreamEvent) -> None:
        self._events.put(event)

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._done.set()


@dataclass
class _Request:
    handle: RequestHandle
    prompt_ids: list[int]
    adapter_id: str | None
    params: SamplingParams
    max_tokens: int
    tracker: TextTracker
    generator: torch.Generator | None
    submitted: float
    kv_slot: int = -1
    pool_slot: int = -1
    first_token: float | None = None
    generated: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Position of the token this request feeds next (its last generated one)."""
        return len(self.prompt_ids) + len(self.generated) - 1


class Engine:
    """Continuous-batching generation over many adapters with one frozen SmolVLM2.

    Args:
        vlm: the `VLM` (its model must carry no `LoRAPatch`).
        hypernet: optional Frames2LoRA: its bias block is folded into ``down_proj`` (see
            ``fold``) and its alpha is the pool's LoRA scale.
        store: where adapters come from (default: an in-memory `AdapterStore` for this model).
        fold: fold the hypernetwork's bias block into the base weights (default True when a
            hypernetwork is given); adapters must then carry that exact block, which is
            stripped. A model folded before (`folded_bias_of`) is served folded as it is.
        max_batch: KV-cache slots, the most requests in flight at once.
        max_len: tokens per slot, prompt plus answer (default: the model's
            ``max_position_embeddings``, at most 4096).
        max_rank: largest adapter rank the pool holds (after the bias is stripped).
        pool_bytes: device memory of the adapter pool (its slot count follows).
        max_prefill_tokens: prompt tokens admitted per step (bounds one step's latency).
        max_queue: waiting requests beyond which `submit` raises `EngineFull`.
        backend: `lora_sgmv` backend (``"auto"``: the setting in force).
    """

    def __init__(self, vlm: VLM, *, hypernet=None, store: AdapterStore | None = None, fold: bool | None = None,
                 max_batch: int = 32, max_len: int | None = None, max_rank: int = 64,
                 pool_bytes: int = 256 << 20, max_prefill_tokens: int = 4096, max_queue: int = 1024,
                 backend: str = "auto"):
        model = vlm.model
        if is_patched(model):
            fail("vlm", "a model without a LoRA patch (the engine applies adapters itself)", "a patched model")
        for name, value in (("max_batch", max_batch), ("max_rank", max_rank),
                            ("max_prefill_tokens", max_prefill_tokens), ("max_queue", max_queue)):
            if type(value) is not int or value < 1:
                fail(name, "an int >= 1", value)
        config = getattr(model.config, "text_config", model.config)
        max_len = min(getattr(config, "max_position_embeddings", 4096), 4096) if max_len is None else max_len
        if type(max_len) is not int or max_len < 2:
            fail("max_len", "an int >= 2", max_len)
        self.vlm, self.tokenizer = vlm, vlm.tokenizer
        folded_before = folded_bias_of(model)
        base = folded_before.base if folded_before is not None else base_fingerprint(model)  # the unfolded model's
        if store is not None and store.base is not None:
            check_fits("store", "an adapter store", store.base, {key: base[key] for key in MATCHED_FIELDS},
                       names=(store.base.get("name"), base.get("name")))
        self.store = store if store is not None else AdapterStore(base=base)
        targets = down_proj_targets(model)
        alpha = hypernet.config.lora_alpha if hypernet is not None else None
        self.pool = AdapterPool(num_layers=len(targets), in_features=targets[0].in_features,
                                out_features=targets[0].out_features, max_rank=max_rank, budget_bytes=pool_bytes,
                                device=targets[0].weight.device, scaling=alpha)
        self.decoder = PackedDecoder(model, num_slots=max_batch, max_len=max_len, backend=backend)
        # Last: everything that can refuse the arguments has run, so a refusal leaves the model unfolded.
        self.folded = folded_before or self._fold(model, hypernet, fold)
        self._base_slot = self._pin_unfold(hypernet)
        self._A_layers, self._B_layers = self.pool.A.unbind(1), self.pool.B.unbind(1)
        self.max_len, self.max_prefill_tokens, self.max_queue = max_len, max_prefill_tokens, max_queue
        self.eos_ids = self._eos_ids()
        self._visual_ids = visual_token_ids(vlm)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(0)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # --- set-up -----------------------------------------------------------------------------

    @staticmethod
    def _fold(model, hypernet, fold: bool | None) -> FoldedBias | None:
        if fold is None:
            fold = hypernet is not None
        if not fold:
            return None
        if hypernet is None:
            fail("fold", "False without a hypernet (the bias block to fold comes from it)", True)
        return fold_bias(model, hypernet.bias_A["down_proj"], hypernet.bias_B["down_proj"], hypernet.config.lora_alpha)

    def _pin_unfold(self, hypernet) -> int:
        """Pool slot of the base model's adapter: −1 unfolded; folded, the bias block negated
        (``A = bias_A``, ``B = −bias_B``), pinned for good, so that a request without an adapter
        still answers from the base model. None when the block is unknown (a model folded
        before, no hypernetwork): such requests are then refused."""
        if self.folded is None:
            return -1
        if hypernet is None:
            return None
        bias_A, bias_B = hypernet.bias_A["down_proj"].detach(), hypernet.bias_B["down_proj"].detach()
        if bias_digest(bias_A, bias_B) != self.folded.digest:
            fail("hypernet", f"the hypernetwork whose bias block the model holds (digest {self.folded.digest[:12]}…)",
                 "another bias block")
        unfold = Adapters(bias_A[None].float(), -bias_B[None].float(), self.folded.alpha, self.folded.folded_base)
        return self.pool.acquire(("base model",), lambda: unfold)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation = getattr(self.vlm.model, "generation_config", None)
        extra = getattr(generation, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return {i for i in ids if i is not None}

    # --- adapters ---------------------------------------------------------------------------

    def add_adapter(self, adapter_id: str, adapters: Adapters, *, persist: bool = False) -> None:
        """Register one video's adapter under ``adapter_id`` (in memory; ``persist`` writes it to
        the store's folder). Checked now: base model, and the bias block when folded."""
        if self.folded is not None:
            self.folded.check(adapters, name=f"adapter {adapter_id!r}")
        replaced = self.store.version(adapter_id) if adapter_id in self.store else None
        self.store.put(adapter_id, adapters, persist=persist)
        if replaced is not None:
            self.pool.discard((adapter_id, replaced))

    def delete_adapter(self, adapter_id: str) -> bool:
        """Forget an adapter (file included); requests already running with it finish."""
        version = self.store.version(adapter_id) if adapter_id in self.store else None
        deleted = self.store.delete(adapter_id)
        if version is not None:
            self.pool.discard((adapter_id, version))
        return deleted

    def _servable(self, adapter_id: str) -> Adapters:
        adapters = self.store.get(adapter_id)
        return self.folded.strip(adapters, name=f"adapter {adapter_id!r}") if self.folded else adapters

    # --- requests ---------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | Sequence[dict]) -> list[int]:
        """Token ids of a text-only prompt: a question (str) or a chat (OpenAI-style messages with
        string or ``[{"type": "text", "text": …}]`` contents), through the chat template."""
        if isinstance(prompt, str):
            return question_ids(self.tokenizer, prompt)
        if not isinstance(prompt, Sequence) or not prompt:
            fail("prompt", "a str or a non-empty list of chat messages", type(prompt).__name__)
        conversation = []
        for i, message in enumerate(prompt):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                fail(f"messages[{i}]", "a dict with role system, user or assistant", repr(message)[:80])
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list) or not all(
                    isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    for part in content):
                fail(f"messages[{i}].content", "a string or a list of text parts (no images: the video is in the "
                     "adapter)", repr(content)[:80])
            conversation.append({"role": message["role"], "content": content})
        return conversation_ids(self.tokenizer, conversation)

    def submit(self, prompt: str | Sequence[dict] | None = None, *, adapter: str | None = None,
               params: SamplingParams | None = None, prompt_ids: Sequence[int] | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request; returns its `RequestHandle` at once (the engine answers in `step`).

        Args:
            prompt: a question or chat messages (see `prompt_ids`), or None with ``prompt_ids``.
            adapter: the id of a stored adapter, or None for the base model.
            params: `SamplingParams` (default: greedy, up to 128 tokens).
            prompt_ids: the context's token ids, as they are.
            request_id: a name for the request (default: a counter).

        Raises ValueError for bad input (unknown adapter: `AdapterNotFound`; a prompt that does
        not fit ``max_len`` with its max_tokens; visual tokens) and `EngineFull` when the queue
        is full: nothing is queued then.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            fail("params", "a SamplingParams", type(params).__name__)
        if (prompt is None) == (prompt_ids is None):
            fail("prompt", "exactly one of prompt and prompt_ids", "both" if prompt is not None else "neither")
        ids = self.prompt_ids(prompt) if prompt is not None else list(prompt_ids)
        if not ids or not all(type(t) is int and 0 <= t < self.decoder.embed.num_embeddings for t in ids):
            fail("prompt_ids", f"a non-empty list of token ids in [0, {self.decoder.embed.num_embeddings})",
                 repr(ids[:8])[:80])
        if self._visual_ids.intersection(ids):
            fail("prompt", "text without image tokens (the answer model sees no visual tokens)", "image tokens")
        room = self.max_len - len(ids)
        limit = min(DEFAULT_MAX_TOKENS, room) if params.max_tokens is None else params.max_tokens
        if room < max(limit, 1):
            fail("prompt", f"at most {self.max_len - max(limit, 1)} tokens with max_tokens {max(limit, 1)} "
                 f"(max_len {self.max_len})", f"{len(ids)} tokens")
        if adapter is not None:
            check_adapter_id(adapter)
            if adapter not in self.store:
                raise AdapterNotFound(adapter)
        elif self._base_slot is None:
            fail("adapter", "an adapter id (the base model cannot be served: its down_proj holds a folded bias "
                 "block and no hypernetwork was given to unfold it)", None)
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
            generator = torch.Generator(self.decoder.device).manual_seed(seed)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"queue: expected fewer than {self.max_queue} waiting requests, got "
                                 f"{len(self._waiting)}")
            handle = RequestHandle(request_id or f"req-{next(self._ids)}", len(ids))
            tracker = TextTracker(self.tokenizer, params.stop)
            self._waiting.append(_Request(handle, ids, adapter, params, limit, tracker, generator, time.perf_counter()))
            self._wake.notify()
        return handle

    # --- the loop ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self._running)

    def step(self) -> int:
        """One engine iteration: admit, one packed forward, one token per request. Returns how
        many requests took part (0: nothing to do)."""
        self._drop_cancelled()
        prefills = sorted(self._admit(), key=lambda r: len(r.prompt_ids))  # equal lengths share attention
        decodes = list(self._running)
        if not decodes and not prefills:
            return 0
        sequences = [([r.generated[-1]], r.position, r.kv_slot, r.pool_slot) for r in decodes]
        sequences += [(r.prompt_ids, 0, r.kv_slot, r.pool_slot) for r in prefills]
        requests = decodes + prefills
        self._running = list(requests)  # before the forward: a failing step finishes the prefills too
        batch = PackedBatch.build(sequences, len(decodes), self.decoder.device)
        logits = self.decoder.forward(batch, self._A_layers, self._B_layers, self.pool.ranks, self.pool.scaling or 1.0)
        tokens = choose_tokens(logits, [r.params for r in requests], [r.generator for r in requests])
        now = time.perf_counter()
        for request, token in zip(requests, tokens):
            self._advance(request, token, now)
        self.steps += 1
        return len(requests)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [r for r in self._waiting if r.handle.cancelled]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled + [r for r in self._running if r.handle.cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> list[_Request]:
        admitted, budget = [], self.max_prefill_tokens
        while self._free_slots:
            with self._lock:
                if not self._waiting or (admitted and len(self._waiting[0].prompt_ids) > budget):
                    break
                request = self._waiting.popleft()
            if request.adapter_id is not None:
                try:
                    key = (request.adapter_id, self.store.version(request.adapter_id))
                    request.pool_slot = self.pool.acquire(key, lambda r=request: self._servable(r.adapter_id))
                except PoolExhausted:
                    with self._lock:
                        self._waiting.appendleft(request)
                    break
                except ValueError as err:  # deleted since submit, or refused on load
                    self._finish(request, "error", error=" ".join(str(err).split()))
                    continue
            else:
                request.pool_slot = self._base_slot
            request.kv_slot = self._free_slots.pop()
            budget -= len(request.prompt_ids)
            admitted.append(request)
        return admitted

    def _advance(self, request: _Request, token: int, now: float) -> None:
        if request.first_token is None:
            request.first_token = now
        request.generated.append(token)
        if token in self.eos_ids:
            self._finish(request, "stop", drop_last=True)
            return
        delta = request.tracker.add(token)
        if request.tracker.stopped:
            self._finish(request, "stop", text=delta)
        elif len(request.generated) >= request.max_tokens:
            self._finish(request, "length", text=delta)
        elif delta:
            request.handle._emit(StreamEvent(delta))

    def _finish(self, request: _Request, reason: str, *, text: str = "", drop_last: bool = False,
                error: str | None = None) -> None:
        if drop_last:
            request.generated.pop()
        text += request.tracker.finish()
        if request in self._running:
            self._running.remove(request)
        if request.kv_slot >= 0:
            self._free_slots.append(request.kv_slot)
        if request.pool_slot >= 0 and request.adapter_id is not None:
            self.pool.release(request.pool_slot)
        request.kv_slot = request.pool_slot = -1
        handle, end = request.handle, time.perf_counter()
        handle._finish(Completion(  # before the last event: its reader may ask for the result at once
            handle.request_id, request.tracker.text, list(request.generated), reason, len(request.prompt_ids), error,
            None if request.first_token is None else request.first_token - request.submitted, end - request.submitted))
        handle._emit(StreamEvent(text, reason, error))

    def run_until_done(self) -> None:
        """Step until no request is waiting or running (the synchronous way to drive the engine)."""
        if self._thread is not None:
            fail("engine", "an engine without a background thread (run_until_done drives it itself)", "started")
        while self.has_work:
            if not self.step() and self._waiting:
                self._fail_stuck()

    def _fail_stuck(self) -> None:
        """Nothing ran although requests wait and none runs: the head request's adapter cannot get
        a pool slot with no request holding one (the pool's only slot is the base model's), so it
        never will; fail it rather than spin."""
        with self._lock:
            request = self._waiting.popleft()
        self._finish(request, "error", error=f"adapter {request.adapter_id!r}: the adapter pool has no free slot")

    def generate(self, prompts: Sequence, adapters: Sequence[str | None] | None = None,
                 params: SamplingParams | None = None) -> list[Completion]:
        """Answer ``prompts`` (adapter i for prompt i; None: base model) and return the completions."""
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        if len(adapters) != len(prompts):
            fail("adapters", f"one per prompt ({len(prompts)})", len(adapters))
        handles = [self.submit(p, adapter=a, params=params) for p, a in zip(prompts, adapters)]
        if self._thread is None:
            self.run_until_done()
        return [h.result() for h in handles]

    # --- background thread ------------------------------------------------------------------

    def start(self) -> Engine:
        """Run the loop in a daemon thread until `stop`; `submit` from any thread meanwhile."""
        if self._thread is not None:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="v2l-fast-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread (if started) after its current step; requests still running or
        queued are cancelled."""
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._wake.notify()
            self._thread.join(timeout)
            self._thread = None
        for request in list(self._running) + list(self._waiting):
            self._finish(request, "cancelled")
        self._waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                if not self.step() and self._waiting:
                    self._fail_stuck()
            except Exception as err:  # a broken step fails its requests, the engine goes on
                message = f"{type(err).__name__}: {' '.join(str(err).split())}"
                for request in list(self._running):
                    self._finish(request, "error", error=message)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        """Queue, running requests, free KV slots, steps and the adapter pool's counters."""
        return {"waiting": len(self._waiting), "running": len(self._running), "free_kv_slots": len(self._free_slots),
                "steps": self.steps, "pool": self.pool.stats}
