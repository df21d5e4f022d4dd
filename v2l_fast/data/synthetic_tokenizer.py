"""A word-level tokenizer for the synthetic world: one id per word of its closed vocabulary.

The character-level `tiny_smolvlm_tokenizer` spells the toy VLM's prompt one character at a
time, so the fixed template text (intro sentence, ``Frame from 00:0k:`` lines, chat markers) is
most of every row. `world_tokenizer` keeps that tokenizer's special tokens at the same ids
(`TINY_SPECIAL_TOKENS`: pad 0, ``<|im_start|>`` 1, ``<end_of_utterance>`` 2,
``<fake_token_around_image>`` 3, ``<global-img>`` 4, ``<unk>`` 5, ``<image>`` 150) and its chat
template (SmolVLM2's), and gives every other piece of text one id:

* the video prompt's fixed phrases are one token each (`template_phrases`: the three pieces of
  the intro sentence around its frame count and duration, and each whole
  ``Frame from 00:SS:`` line with its newline, for the first `MAX_FRAMES` seconds), matched
  before the text is cut into pieces, so a frame costs one token besides its image tokens;
* the pre-tokenizer cuts text into `PIECE` pieces — a word, a number or one punctuation mark,
  each with the space before it if there is one (``" red"``), or a lone whitespace character;
* the vocabulary is every piece of `world_texts` (the world's questions, answers, captions and
  caption prompt, generated from `v2l_fast.data.synthetic`'s own lists; the video prompt and
  chat turns; the default internalization instruction), every word with and without its
  leading space, a lone space and newline, and the numbers 0–59 written ``7`` and ``07``
  (durations and timestamps);
* a piece outside it is ``<unk>``; the decoder joins the pieces, so ``decode(encode(text)) ==
  text`` for any text made of known pieces.
"""

from __future__ import annotations

import itertools
import re
from datetime import timedelta

from v2l_fast.data.synthetic import (
    ANSWERS,
    BACKGROUNDS,
    CAPTION_PROMPT,
    COLOURS,
    DIRECTIONS,
    NOISE,
    SHAPES,
    SIDE_WORDS,
    SIZES,
    TEMPLATES,
    Scene,
    SceneObject,
    caption_for,
)
from v2l_fast.errors import fail
from v2l_fast.vlm.factory import TINY_SPECIAL_TOKENS
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION, FRAME_LINE, VIDEO_CHAT_TEMPLATE, VIDEO_INTRO, number_in_words

# A word, a number or a punctuation mark with the space before it, or one whitespace character.
PIECE = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\s"
MAX_FRAMES = 60  # video prompts up to this many frames (and seconds) are in the vocabulary
UNK = "<unk>"


def _fields() -> dict[str, list[str]]:
    """Every value each `TEMPLATES` field takes (object names, colours, directions, sides)."""
    refs = [f"the {shape}" for shape in SHAPES] + [f"the {size} {shape}" for size in SIZES for shape in SHAPES]
    refs += [f"the {colour} shape" for colour in COLOURS]
    return {"ref": refs, "colour": list(COLOURS), "direction": list(DIRECTIONS), "side": list(SIDE_WORDS.values())}


def world_questions() -> list[str]:
    """Every question text `questions_for` can ask (each template with each value of its field)."""
    fields = _fields()
    questions = []
    for template in itertools.chain.from_iterable(TEMPLATES.values()):
        names = re.findall(r"{(\w+)}", template)
        for values in itertools.product(*(fields[name] for name in names)):
            questions.append(template.format(**dict(zip(names, values))))
    return questions


def world_captions() -> list[str]:
    """Captions that use every size, colour, shape, direction, background and noise word,
    with one, two and three objects (`caption_for` on placeholder scenes)."""
    attributes = list(zip(itertools.cycle(SIZES), COLOURS, itertools.cycle(SHAPES), itertools.cycle(DIRECTIONS)))
    attributes += list(zip(SIZES, itertools.cycle(COLOURS), SHAPES, DIRECTIONS))
    objects = [SceneObject(shape, colour, size, direction, (0.5, 0.5), (0.5, 0.5))
               for size, colour, shape, direction in attributes]
    captions = []
    for (background, noise), count in itertools.product(itertools.product(BACKGROUNDS, NOISE), (1, 2, 3)):
        for start in range(0, len(objects), count):
            captions.append(caption_for(Scene(background, noise, 0, tuple(objects[start:start + count]))))
    return captions


def world_texts(max_frames: int = MAX_FRAMES) -> list[str]:
    """The texts the vocabulary is made of: questions, answers, captions, the caption prompt and
    the internalization instruction in SmolVLM2's chat turns, and the video prompt of 1 to
    ``max_frames`` frames."""
    from v2l_fast.vlm.factory import tiny_smolvlm_tokenizer

    renderer = tiny_smolvlm_tokenizer()
    answers = sorted(set(itertools.chain.from_iterable(ANSWERS.values())))
    prompts = world_questions() + [CAPTION_PROMPT, DEFAULT_INSTRUCTION]
    turns = [{"role": role, "content": [{"type": "video"}, {"type": "text", "text": text}]}
             for role, text in [("system", CAPTION_PROMPT), ("user", prompts[0]), ("assistant", answers[0])]]
    texts = prompts + answers + world_captions()
    texts.append(renderer.apply_chat_template(turns, chat_template=VIDEO_CHAT_TEMPLATE, tokenize=False,
                                              add_generation_prompt=True))
    for count in range(1, max_frames + 1):
        texts.append(VIDEO_INTRO.format(count=number_in_words(count), duration=str(timedelta(seconds=count))))
    texts.append(FRAME_LINE.format(minutes=0, seconds=0) + "\n\n")
    return texts


def template_phrases(max_frames: int = MAX_FRAMES) -> list[str]:
    """The video prompt's fixed phrases, one token each: the text of `VIDEO_INTRO` between its
    fields, and the `FRAME_LINE` of every second below ``max_frames``."""
    intro = [part for part in re.split(r"{\w+}", VIDEO_INTRO) if part]
    return intro + [FRAME_LINE.format(minutes=0, seconds=second) for second in range(max_frames)]


def world_vocabulary(max_frames: int = MAX_FRAMES) -> list[str]:
    """The non-special pieces of `world_tokenizer` (without `template_phrases`), sorted."""
    pieces = set(itertools.chain.from_iterable(re.findall(PIECE, text) for text in world_texts(max_frames)))
    pieces -= set(TINY_SPECIAL_TOKENS.values())
    words = {piece.lstrip(" ") for piece in pieces if piece.strip()}
    numbers = [str(n) for n in range(max_frames)] + [f"{n:02d}" for n in range(max_frames)]
    words.update(numbers)
    pieces |= words | {" " + word for word in words} | {" ", "\n"}
    return sorted(pieces)


def world_tokenizer(max_frames: int = MAX_FRAMES):
    """A word-level ``PreTrainedTokenizerFast`` for the synthetic world (module docstring).

    The special tokens have the ids of `tiny_smolvlm_tokenizer`, so the toy VLM's
    ``image_token_id`` (150) and bos/eos/pad ids hold for both tokenizers; the vocabulary is
    `world_vocabulary`, then `template_phrases`, in the remaining ids, at least 151 in all.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or not 1 <= max_frames <= 60:
        fail("max_frames", "an int in [1, 60] (timestamps are MM:SS within the first minute)", repr(max_frames))
    phrases = template_phrases(max_frames)
    words = world_vocabulary(max_frames) + phrases
    size = max(len(words) + len(TINY_SPECIAL_TOKENS), max(TINY_SPECIAL_TOKENS) + 1)
    free = (i for i in range(size) if i not in TINY_SPECIAL_TOKENS)
    vocab = {token: i for i, token in TINY_SPECIAL_TOKENS.items()}
    vocab.update(zip(words, free))
    vocab.update((f"<unused_{i}>", i) for i in free)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS.values()])
    tok.add_tokens([AddedToken(phrase, special=False, normalized=False) for phrase in phrases])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<pad>", unk_token=UNK, chat_template=DEFAULT_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)
