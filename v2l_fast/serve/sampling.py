"""Sampling parameters, next-token choice and stop conditions of the serving engine.

Greedy (temperature 0) is ``argmax``, the same choice as ``model.generate(do_sample=False)``,
so the engine's greedy answers equal `v2l_fast.api.ask`'s. With temperature > 0 a request draws
from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
probability reaches ``top_p`` (nucleus sampling), with its own seeded generator: the same seed
gives the same answer whatever else shares the batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from v2l_fast.errors import fail

DEFAULT_MAX_TOKENS = 128


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    Attributes:
        max_tokens: most tokens generated (the answer ends with finish reason ``"length"``);
            None: 128, or fewer when the prompt leaves less room in its KV slot.
        temperature: 0 = greedy; > 0 = sampling at this temperature.
        top_p: nucleus mass in (0, 1] (1 = the whole distribution).
        stop: strings that end the answer when generated (not included in it).
        seed: seed of the request's generator (None: drawn from the engine's generator).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens is not None and (type(self.max_tokens) is not int or self.max_tokens < 1):
            fail("max_tokens", "an int >= 1 or None", self.max_tokens)
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            fail("temperature", "a finite number >= 0", self.temperature)
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]", self.top_p)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            fail("stop", "a non-empty string or a list of them", self.stop)
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 2**63):
            fail("seed", "an int in [0, 2**63) or None", self.seed)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[S, vocab]`` logits: the same indices, faster on the CPU.

    On a contiguous CPU tensor whose vocabulary a block size divides (`_argmax_block`), this is
    `argmax_in_blocks`; elsewhere (a GPU's argmax is already a parallel reduction) ``argmax``.
    """
    block = _argmax_block(logits.shape[-1]) if logits.device.type == "cpu" and logits.is_contiguous() else None
    return logits.argmax(dim=-1) if block is None else argmax_in_blocks(logits, block)


def argmax_in_blocks(logits: torch.Tensor, block: int) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of contiguous ``[S, vocab]`` logits, ``block`` dividing vocab.

    ATen's CPU argmax walks a row one element at a time; its max reduction (``amax``) is
    vectorised. So: the maxima of the row's blocks of ``block`` columns (vectorised, one pass),
    the first block holding the row's maximum (an argmax over vocab / block values), then the
    first maximum inside that block (an argmax over ``block`` values). The first block holding
    the maximum holds its first occurrence, so ties resolve to the lowest index as ``argmax``'s
    do; NaN is the maximum of both reductions, so a row with NaNs gives its first NaN, as
    ``argmax`` does.
    """
    rows, vocab = logits.shape
    blocks = logits.view(rows, vocab // block, block)
    first = blocks.amax(dim=-1).argmax(dim=-1)  # [S] the first block holding each row's maximum
    inside = blocks[torch.arange(rows, device=logits.device), first].argmax(dim=-1)
    return first * block + inside


@functools.lru_cache(maxsize=8)
def _argmax_block(vocab: int) -> int | None:
    """The largest divisor of ``vocab`` in [64, 512], or None (no divisor there; or ``vocab`` < 4096,
    too few columns for the blocks' extra passes to pay: unmeasured). SmolVLM2's 49 280 gives 448,
    the fastest of its divisors measured (`bench/bench_sampling.py`, 512 rows, 2-core CPU: 5.7 ms
    fp32 / 6.3 ms bf16 against argmax's 29 / 44 ms; 64-column blocks 6.9 / 9.9 ms, each block's
    own argmax then dominating)."""
    if vocab < 4096:
        return None
    return next((b for b in range(512, 63, -1) if vocab % b == 0), None)


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """The next token of each row of ``logits [S, vocab]`` (the model's dtype) under its request's params.

    Greedy rows are one `greedy_tokens` over the batch, on the logits as the model wrote them: an
    argmax needs no fp32 copy (a bf16 → fp32 cast is exact and keeps the order, ties included);
    512 bf16 rows × 49 280 on the 2-core CPU: 6 ms, against 37 ms for ``.float()`` then ``argmax``
    (`bench/bench_sampling.py`). Sampling rows draw from their own row in fp32 with their own
    generator. Returns host ints (the one device→host copy of the step).
    """
    greedy = greedy_tokens(logits)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return greedy.tolist()
    tokens = greedy.clone()
    for i in sampled:
        probs = torch.softmax(logits[i].float() / params[i].temperature, dim=-1)
        if params[i].top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the tokens whose preceding mass is below top_p (the first one always)
            keep = (sorted_probs.cumsum(0) - sorted_probs) < params[i].top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens.tolist()


class TextTracker:
    """The answer text of one request as its tokens arrive: stop strings and streaming deltas.

    Decoding is incremental, so a token costs the same at the end of a long answer as at its start:
    each new token decodes only the tokens since the last committed text plus the chunk before
    them (their context: byte-level and SentencePiece decoders join a token to what precedes it),
    and the difference of the two decodes is appended once it does not end in U+FFFD (a partial
    UTF-8 sequence that later tokens complete). The text released to the stream also holds back
    any suffix that could still grow into a stop string, so a stop string never reaches a client.
    ``text`` equals the decode of all the tokens (``skip_special_tokens``) once `finish` is called.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False
        self._context = 0  # first token of the decode window (the chunk before the unread tokens)
        self._read = 0  # tokens whose text is in ``text``

    def add(self, token_id: int) -> str:
        """Append a token; return the newly releasable text (sets ``stopped`` on a stop string)."""
        self.token_ids.append(token_id)
        if self._commit(final=False):
            self._cut_at_stop()
        end = len(self.text) if self.stopped else self._safe_end()
        delta = self.text[self.released:end]
        self.released = max(self.released, end)
        return delta

    def finish(self) -> str:
        """The text still held back (and an incomplete last character), released when the request ends."""
        if not self.stopped and self._commit(final=True):
            self._cut_at_stop()
        delta = self.text[self.released:]
        self.released = len(self.text)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _commit(self, *, final: bool) -> bool:
        """Append the text of the unread tokens when it is complete (or ``final``); True if any."""
        if self._read == len(self.token_ids):
            return False
        before = self._decode(self.token_ids[self._context:self._read])
        after = self._decode(self.token_ids[self._context:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return False
        self.text += after[len(before):]
        self._context, self._read = self._read, len(self.token_ids)
        return True

    def _cut_at_stop(self) -> None:
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.released - len(stop)))
            if at >= 0:
                self.stopped = True
                self.text = self.text[:at]

    def _safe_end(self) -> int:
        end = len(self.text)
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end - self.released), 0, -1):
                if self.text[end - n:end] == stop[:n]:
                    end -= n
                    break
        return end
