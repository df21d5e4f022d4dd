"""Conversation rows from cached per-turn pieces (`ConversationIds`) equal the rendered rows."""

from __future__ import annotations

import random

import pytest

from v2l_fast.data.synthetic import generate_world
from v2l_fast.train.chat_rows import ConversationIds, conversation_ids
from v2l_fast.train.toy_vlm import build_toy_vlm, load_questions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, num_train=6, num_val=0, num_heldout=0, seed=11, progress=False)
    return root


def conversations(vlm, world, count, seed):
    """``count`` (video text, conversation) pairs: the world's videos, their questions in random
    orders and numbers of turns, as a toy-VLM step draws them."""
    questions = load_questions(world / "train.jsonl", vlm)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        video, rows = rng.choice(questions)
        turns = rng.sample([(r.prompt, r.target_text) for r in rows], rng.randint(1, len(rows)))
        out.append((vlm.preprocessor.video_text(video), turns))
    return out


@pytest.mark.parametrize("tokenizer", ["word", "char"])
def test_rows_from_pieces_equal_the_rendered_rows_after_the_check_too(world, tokenizer):
    vlm = build_toy_vlm("S", tokenizer=tokenizer)
    rows = ConversationIds(vlm.tokenizer, check_rows=3)
    cases = conversations(vlm, world, 40, seed=1)
    for video_text, turns in cases:
        assert rows(video_text, turns) == conversation_ids(vlm.tokenizer, video_text, turns)
    assert not rows.exact and rows.check_rows == 0  # 37 rows came from the pieces alone
    assert len(rows._first) + len(rows._later) < 2 * sum(len(turns) for _, turns in cases)


class CountsPositions:
    """A tokenizer whose ids depend on their position (odd positions shifted): a piece cut from
    one row is wrong at an offset of the other parity, so rows cannot be assembled from pieces."""

    def __init__(self, tokenizer):
        self.inner = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, text, **kwargs):
        return {"input_ids": [t + 1000 * (i % 2) for i, t in enumerate(self.inner(text, **kwargs)["input_ids"])]}


def test_a_tokenizer_that_joins_across_turns_is_caught_and_every_row_is_then_rendered(world):
    vlm = build_toy_vlm("S")
    tokenizer = CountsPositions(vlm.tokenizer)
    rows = ConversationIds(tokenizer, check_rows=30)
    for video_text, turns in conversations(vlm, world, 30, seed=2):
        assert rows(video_text, turns) == conversation_ids(tokenizer, video_text, turns)
    assert rows.exact


def test_bad_conversations_fail_as_the_rendered_path_does(world):
    vlm = build_toy_vlm("S")
    rows = ConversationIds(vlm.tokenizer)
    with pytest.raises(ValueError, match=r"^conversations\[2\]: expected at least one \(question, answer\) turn, "
                                         r"got none$"):
        rows("video", [], name="conversations[2]")
    with pytest.raises(ValueError, match=r"^conversation\[1\]: expected a non-empty answer, got ' '$"):
        rows("video", [("What colour is the square?", "red"), ("How many shapes?", " ")])
    with pytest.raises(ValueError, match=r"^check_rows: expected an int >= 0, got -1$"):
        ConversationIds(vlm.tokenizer, check_rows=-1)
