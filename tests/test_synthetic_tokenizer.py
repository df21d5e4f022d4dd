"""The synthetic world's word-level tokenizer: coverage, row length, round trips, chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from v2l_fast.data.manifest import read_manifest
from v2l_fast.data.synthetic import ANSWERS, generate_world
from v2l_fast.data.synthetic_tokenizer import world_captions, world_questions, world_tokenizer
from v2l_fast.train.teacher import teacher_prompt
from v2l_fast.train.toy_vlm import build_toy_vlm, in_context_batch, load_questions
from v2l_fast.vlm.factory import TINY_SPECIAL_TOKENS, tiny_smolvlm_tokenizer
from v2l_fast.vlm.frames import VIDEO_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, num_train=12, num_val=4, num_heldout=0, seed=7, progress=False)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


def rows_of(world, vlm, limit):
    questions = load_questions(world / "train.jsonl", vlm, limit=limit)
    rows = [(v, row) for v, (_, group) in enumerate(questions) for row in group]
    return questions, in_context_batch(vlm, [video for video, _ in questions],
                                       [[(r.prompt, r.target_text)] for _, r in rows], [v for v, _ in rows])


def test_a_generated_world_has_no_unknown_token(world, tokenizer):
    unk = tokenizer.unk_token_id
    rows = [row for split in ("train", "val") for row in read_manifest(world / f"{split}.jsonl").rows]
    assert {row.task_type for row in rows} == {"qa", "caption"}
    for row in rows:
        for text in (row.prompt, row.target_text):
            assert unk not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    vlm = build_toy_vlm("S", tokenizer="word")
    _, batch = rows_of(world, vlm, limit=12)
    assert unk not in batch.input_ids[batch.attention_mask.bool()].tolist()


def test_every_question_answer_and_caption_word_has_its_own_token(tokenizer):
    texts = world_questions() + world_captions() + [a for answers in ANSWERS.values() for a in answers]
    assert len(world_questions()) > 60 and len(world_captions()) >= 18
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) <= len(text.split()) + text.count("?") + text.count(".") + text.count(","), text


def test_an_unknown_word_is_one_unknown_token(tokenizer):
    ids = tokenizer("What colour is the zebra?", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["What", " colour", " is", " the", "<unk>", "?"]


def test_decode_inverts_encode_on_world_sentences(world, tokenizer):
    vlm = build_toy_vlm("S", tokenizer="word")
    questions = load_questions(world / "train.jsonl", vlm, limit=3)
    texts = world_questions() + world_captions()
    texts += [teacher_prompt(video, row.prompt, vlm) + f" {row.target_text}<end_of_utterance>\n"
              for video, rows in questions for row in rows]
    for text in texts:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_a_video_question_row_is_over_three_times_shorter_than_with_characters(world):
    # measured with 4 <image> tokens per frame (the text is what the tokenizers change)
    word, char = (build_toy_vlm("S", tokenizer=name, tokens_per_frame=4) for name in ("word", "char"))
    _, word_batch = rows_of(world, word, limit=12)
    _, char_batch = rows_of(world, char, limit=12)
    word_len, char_len = word_batch.attention_mask.sum(1), char_batch.attention_mask.sum(1)
    # measured on this world: ~94 vs ~347 tokens per 8-frame row (3.7x)
    assert int(word_len.max()) <= 100 and int(char_len.min()) >= 330
    assert float(char_len.float().mean() / word_len.float().mean()) >= 3.5
    # the answer turn is 3 tokens: " blue", end of utterance, newline
    labels = word_batch.labels[0][word_batch.labels[0] != -100].tolist()
    assert len(labels) == 3 and labels[1:] == [2, word.tokenizer.convert_tokens_to_ids("\n")]


def test_special_ids_and_chat_template_are_those_of_the_tiny_tokenizer(tokenizer):
    tiny = tiny_smolvlm_tokenizer()
    for token_id, token in TINY_SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id == tiny.convert_tokens_to_ids(token)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    turns = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How many shapes are there?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]
    for template in (None, VIDEO_CHAT_TEMPLATE):
        for generation in (False, True):
            kwargs = dict(chat_template=template, tokenize=False, add_generation_prompt=generation)
            assert tokenizer.apply_chat_template(turns, **kwargs) == tiny.apply_chat_template(turns, **kwargs)
    # contents as the package passes them (transformers 5.17 renders a string content as nothing here)
    turn = {"role": "user", "content": [{"type": "text", "text": "Describe the video."}]}
    text = tokenizer.apply_chat_template([turn], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>User: Describe the video.<end_of_utterance>\nAssistant:"


def test_save_and_load_give_the_same_tokenizer(world, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    vlm = build_toy_vlm("S", tokenizer="word")
    video, rows = load_questions(world / "train.jsonl", vlm, limit=1)[0]
    text = teacher_prompt(video, rows[0].prompt, vlm)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab() and len(loaded) == len(tokenizer)
    assert loaded.chat_template == tokenizer.chat_template


def test_max_frames_outside_the_first_minute_is_refused():
    with pytest.raises(ValueError, match=r"^max_frames: expected an int in \[1, 60\]"):
        world_tokenizer(61)
