"""Token ids of video conversations (``[video, q₀] a₀ [q₁] a₁ …``) and where their answers are.

`conversation_ids` renders the video chat template once per prompt and once per answer of the
conversation and tokenizes each rendering: the exact definition, and 8 renderings of a ~300-token
text for a 4-question row (~6 ms; ~45 of a toy-VLM step's ~160 ms on 2 cores, bench/NOTES.md).

`ConversationIds` makes the same ids from pieces. The template renders a conversation turn after
turn — the first user turn (``"<|im_start|>User: "`` + the video + q₀ + the end of the turn), then
``" a₀<end_of_utterance>\\n"``, ``"User: q₁<end_of_utterance>\\nAssistant:"``, … — and the
tokenizer never joins tokens across a turn's end (``<end_of_utterance>`` is a special token,
matched before anything else is split). So a row is the concatenation

    first(video, q₀) · answer(a₀) · user(q₁) · answer(a₁) · …

where each piece is cut from `conversation_ids` of a one- or two-turn conversation and kept by
its text (the synthetic world has a few hundred distinct questions and answers and a few video
texts, so nearly every piece is found). The first ``check_rows`` rows are also made the exact way
and compared; if one differs — a template or tokenizer that joins across turns — every later row
is made the exact way, so the result is always `conversation_ids`'.
"""

from __future__ import annotations

from collections.abc import Sequence

from v2l_fast.errors import check_int, fail
from v2l_fast.vlm.frames import render_video_chat, video_turn

Spans = list[tuple[int, int]]  # (start, end) of each answer's tokens in the row


def conversation_ids(tokenizer, video_text: str, conversation: Sequence[tuple[str, str]], *,
                     name: str = "conversation") -> tuple[list[int], Spans]:
    """(ids of ``conversation`` — ``(question, answer)`` turns, the first with the video — as the
    video chat template renders it, the ``(start, end)`` of each answer's tokens).

    An answer's tokens are those its assistant turn adds to the prompt rendered with the
    generation prompt: ``" red<end_of_utterance>\\n"``.
    """
    if not conversation:
        fail(name, "at least one (question, answer) turn", "none")
    turns, spans, full = [], [], []
    for k, (prompt, target) in enumerate(conversation):
        _check_answer(f"{name}[{k}]", target)
        turns += video_turn(prompt) if k == 0 else [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        prompt_ids = template_ids(tokenizer, turns, video_text, generation_prompt=True)
        turns.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
        full = template_ids(tokenizer, turns, video_text, generation_prompt=False)
        if full[:len(prompt_ids)] != prompt_ids:
            fail(f"{name}[{k}]", "an answer whose templated turn extends the prompt", repr(target[:80]))
        spans.append((len(prompt_ids), len(full)))
    return full, spans


class ConversationIds:
    """`conversation_ids` from per-turn pieces, each rendered and tokenized once (module docstring).

    ``check_rows``: how many first rows are compared with `conversation_ids` (0: none).
    """

    def __init__(self, tokenizer, *, check_rows: int = 64):
        check_int("check_rows", check_rows, 0)
        self.tokenizer, self.check_rows = tokenizer, check_rows
        self.exact = False  # set when a checked row differed: every row is then made the exact way
        self._first: dict[tuple[str, str, str], tuple[list[int], list[int]]] = {}
        self._later: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def __call__(self, video_text: str, conversation: Sequence[tuple[str, str]], *,
                 name: str = "conversation") -> tuple[list[int], Spans]:
        """What `conversation_ids` ``(tokenizer, video_text, conversation)`` returns."""
        if self.exact or not conversation:
            return conversation_ids(self.tokenizer, video_text, conversation, name=name)
        for k, (_, target) in enumerate(conversation):
            _check_answer(f"{name}[{k}]", target)
        (q0, a0), context = conversation[0], conversation[:1]
        prompt, answer = self._piece(self._first, (video_text, q0, a0), video_text, context, name)
        ids, spans = prompt + answer, [(len(prompt), len(prompt) + len(answer))]
        for question, target in conversation[1:]:
            user, answer = self._piece(self._later, (question, target), video_text, [*context, (question, target)],
                                       name)
            ids += user
            spans.append((len(ids), len(ids) + len(answer)))
            ids += answer
        if self.check_rows:
            self.check_rows -= 1
            exact = conversation_ids(self.tokenizer, video_text, conversation, name=name)
            if exact != (ids, spans):
                self.exact = True
                return exact
        return ids, spans

    def _piece(self, store: dict, key: tuple, video_text: str, conversation: Sequence[tuple[str, str]],
               name: str) -> tuple[list[int], list[int]]:
        """(the ids before the last answer of ``conversation`` that follow the previous answer, the
        last answer's ids), kept under ``key``."""
        if key not in store:
            ids, spans = conversation_ids(self.tokenizer, video_text, conversation, name=name)
            before = spans[-2][1] if len(spans) > 1 else 0
            store[key] = (ids[before:spans[-1][0]], ids[spans[-1][0]:spans[-1][1]])
        return store[key]


def _check_answer(name: str, target: str) -> None:
    if not target.strip():
        fail(name, "a non-empty answer", repr(target))


def template_ids(tokenizer, turns: list[dict], video_text: str, *, generation_prompt: bool) -> list[int]:
    """Token ids of `render_video_chat` ``(tokenizer, turns, video_text)`` (no special tokens added)."""
    text = render_video_chat(tokenizer, turns, video_text, generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
