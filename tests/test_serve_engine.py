"""The serving engine on tiny random SmolVLM2 models: answers equal `ask`'s, batching, streaming,
stop conditions, sampling, adapters in the pool, bad input."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

import v2l_fast
from v2l_fast.adapters.store import AdapterNotFound, AdapterStore
from v2l_fast.serve import Engine, EngineFull, SamplingParams
from v2l_fast.serve.decoder import PackedBatch, PackedDecoder
from v2l_fast.serve.sampling import TextTracker
from v2l_fast.testing import tiny_hypernet
from v2l_fast.vlm.factory import random_smolvlm, tiny_vlm

PROMPTS = ["What colour is the ball?", "Which way does it move?", "How many squares?", "Describe the clip.",
           "Is the circle big?"]
MAX_TOKENS = 10


def _trained_like(hypernet):
    """A random hypernetwork whose adapters change answers (a fresh one's B factors are zero)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hypernet


@pytest.fixture(scope="module")
def models():
    vlm = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    hypernet = _trained_like(tiny_hypernet(vlm.model))
    videos = [np.random.default_rng(i).integers(0, 256, (2, 24, 36, 3), dtype=np.uint8) for i in range(3)]
    adapters = v2l_fast.internalize(videos, vlm=vlm, hypernet=hypernet)
    return vlm, hypernet, adapters


@pytest.fixture(scope="module")
def expected(models):
    """Greedy answers of `ask`, one prompt at a time: ``expected[(prompt index, video or None)]``."""
    vlm, _, adapters = models
    answers = {}
    for p, prompt in enumerate(PROMPTS):
        for video in (0, 1, 2, None):
            chosen = adapters[video] if video is not None else None
            answers[p, video] = v2l_fast.ask(chosen, [prompt], vlm=vlm, max_new_tokens=MAX_TOKENS)[0]
    return answers


def _engine(models, **kwargs) -> Engine:
    """An engine on a fresh copy of the tiny VLM (the engine folds the bias into its weights)."""
    vlm, hypernet, adapters = models
    copy = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    engine = Engine(copy, hypernet=hypernet, **kwargs)
    for i in range(len(adapters)):
        engine.add_adapter(f"video-{i}", adapters[i])
    return engine


def _adapter_id(video):
    return None if video is None else f"video-{video}"


def test_packed_decoder_logits_equal_the_model_forward_for_prefill_and_decode():
    model = random_smolvlm("tiny", seed=1).eval()
    decoder = PackedDecoder(model, num_slots=4, max_len=32)
    first, second, third = [5, 9, 22, 31, 7], [3, 4, 8], [6, 6, 17]  # second and third share one attention call
    none = [torch.zeros(1, 1, 128)] * 4, [torch.zeros(1, 1, 64)] * 4, torch.zeros(1, dtype=torch.int64)
    batch = PackedBatch.build([(first, 0, 0, -1), (second, 0, 2, -1), (third, 0, 3, -1)], 0, "cpu")
    assert batch.prefill_groups == [(0, 1, 5), (5, 2, 3)]
    prefill = decoder.forward(batch, *none, 1.0)
    decode = decoder.forward(PackedBatch.build([([11], 5, 0, -1), ([12], 3, 2, -1)], 2, "cpu"), *none, 1.0)
    with torch.no_grad():
        for got, ids in ((prefill[0], first), (prefill[1], second), (prefill[2], third), (decode[0], first + [11]),
                         (decode[1], second + [12])):
            want = model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_answers_equal_ask_whatever_shares_the_batch(models, expected):
    engine = _engine(models, max_batch=8)
    cases = [(p, v) for p in range(len(PROMPTS)) for v in (0, 1, 2, None)]
    mixed = engine.generate([PROMPTS[p] for p, _ in cases], [_adapter_id(v) for _, v in cases],
                            SamplingParams(max_tokens=MAX_TOKENS))
    for (p, v), completion in zip(cases, mixed):
        assert completion.text.strip() == expected[p, v], (PROMPTS[p], v)
        assert completion.prompt_tokens > 0 and 0 < completion.completion_tokens <= MAX_TOKENS
    # the adapters matter: some prompt answers differently with different videos
    assert any(len({expected[p, v] for v in (0, 1, 2, None)}) > 1 for p in range(len(PROMPTS)))


def test_requests_join_and_leave_between_steps(models, expected):
    engine = _engine(models, max_batch=2)
    short = engine.submit(PROMPTS[0], adapter="video-0", params=SamplingParams(max_tokens=2))
    long = engine.submit(PROMPTS[1], adapter="video-1", params=SamplingParams(max_tokens=MAX_TOKENS))
    waiting = engine.submit(PROMPTS[2], adapter="video-2", params=SamplingParams(max_tokens=MAX_TOKENS))
    assert engine.step() == 2 and engine.stats()["waiting"] == 1  # two KV slots, two prefills
    engine.step()  # the short request's second token: it leaves
    assert short.done and not long.done and engine.stats()["free_kv_slots"] == 1
    late = engine.submit(PROMPTS[3], params=SamplingParams(max_tokens=MAX_TOKENS))
    assert engine.step() == 2  # the waiting request joins the running one (prefill + decode in one step)
    engine.run_until_done()
    assert long.result().text.strip() == expected[1, 1]
    assert waiting.result().text.strip() == expected[2, 2]
    assert late.result().text.strip() == expected[3, None]
    assert engine.stats()["free_kv_slots"] == 2 and engine.stats()["pool"]["pinned"] == 1  # the base-model slot


def test_stream_events_add_up_to_the_answer(models, expected):
    engine = _engine(models).start()
    try:
        handle = engine.submit(PROMPTS[4], adapter="video-2", params=SamplingParams(max_tokens=MAX_TOKENS))
        events = list(handle)
    finally:
        engine.stop()
        assert handle.done  # the result is there as soon as the last event is
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == handle.result().text
    assert handle.result().text.strip() == expected[4, 2]


def test_stop_string_ends_the_answer_and_never_reaches_the_stream(models, expected):
    engine = _engine(models)
    answer = engine.generate([PROMPTS[0]], ["video-0"], SamplingParams(max_tokens=MAX_TOKENS))[0].text
    assert answer.strip() == expected[0, 0]
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    handle = engine.submit(PROMPTS[0], adapter="video-0", params=SamplingParams(max_tokens=MAX_TOKENS, stop=[stop]))
    engine.run_until_done()
    completion = handle.result()
    streamed = "".join(event.text for event in handle)
    assert completion.finish_reason == "stop"
    assert completion.text == streamed == answer[:answer.find(stop)]


def test_end_of_sequence_stops_without_its_token(models, expected):
    engine = _engine(models)
    first = engine.generate([PROMPTS[1]], ["video-1"], SamplingParams(max_tokens=1))[0].token_ids[0]
    engine.eos_ids = {first}
    completion = engine.generate([PROMPTS[1]], ["video-1"], SamplingParams(max_tokens=MAX_TOKENS))[0]
    assert completion.finish_reason == "stop" and completion.token_ids == [] and completion.text == ""


def test_seeded_sampling_repeats_whatever_shares_the_batch(models):
    engine = _engine(models, max_batch=8)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9, seed=1234)
    alone = engine.generate([PROMPTS[2]], ["video-0"], params)[0]
    crowd = engine.generate(PROMPTS, ["video-0", "video-1", "video-2", None, "video-0"], params)
    other_seed = engine.generate([PROMPTS[2]] * 4, ["video-0"] * 4,
                                 SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9))
    assert crowd[2].token_ids == alone.token_ids
    assert any(c.token_ids != alone.token_ids for c in other_seed)  # unseeded draws differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49280, 4099, 300])  # SmolVLM2's (blocks of 448); a prime; a tiny one
def test_greedy_tokens_are_argmax_ties_nans_and_all(vocab, dtype):
    from v2l_fast.serve.sampling import greedy_tokens

    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    top = logits.max() + 1
    logits[1, [7, vocab - 5]] = top  # a tie across blocks: the first wins
    logits[2, [vocab - 3, vocab - 2]] = top  # a tie inside the last block
    logits[3, vocab - 1] = top  # the last column
    logits[4, [40, 9]] = float("nan")  # NaN is argmax's maximum: its first one
    logits[5] = float("-inf")
    logits[6, [0, vocab // 2]] = float("inf")
    want = logits.argmax(dim=-1)
    assert want[1] == 7 and want[4] == 9 and want[5] == 0  # the rules the blocks must keep
    torch.testing.assert_close(greedy_tokens(logits), want, rtol=0, atol=0)
    torch.testing.assert_close(greedy_tokens(logits.t().contiguous().t()), want, rtol=0, atol=0)  # strided rows


def test_top_p_keeps_only_the_nucleus():
    from v2l_fast.serve.sampling import choose_tokens

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    params = [SamplingParams(temperature=1.0, top_p=0.5)]
    drawn = {choose_tokens(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(50)}
    assert drawn == {0}
    params = [SamplingParams(temperature=1.0, top_p=0.8)]
    drawn = {choose_tokens(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(200)}
    assert drawn == {0, 1}


def test_adapters_rotate_through_a_small_pool(models, expected):
    vlm, _, adapters = models
    slot_bytes = 4 * 64 * (128 + 64) * 4  # L · max_rank · (I + H) · fp32
    engine = _engine(models, max_batch=1, max_rank=64, pool_bytes=2 * slot_bytes)  # base slot + one more
    order = [0, 1, 0, 2, 1]
    answers = engine.generate([PROMPTS[0]] * len(order), [f"video-{v}" for v in order],
                              SamplingParams(max_tokens=MAX_TOKENS))
    assert [a.text.strip() for a in answers] == [expected[0, v] for v in order]
    assert engine.stats()["pool"]["evictions"] == len(order) - 1


def test_a_folded_model_is_refused_for_internalization(models):
    vlm, hypernet, _ = models
    engine = _engine(models)
    frames = np.zeros((2, 24, 36, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="vlm: expected a model whose down_proj holds no folded bias block"):
        v2l_fast.internalize([frames], vlm=engine.vlm, hypernet=hypernet)


def test_unfolded_engine_gives_the_same_answers(models, expected):
    vlm, hypernet, adapters = models
    engine = Engine(tiny_vlm(seed=7, longest_edge=64, max_frames=3), fold=False)
    engine.add_adapter("v", adapters[1])
    assert engine.folded is None and engine.pool.stats["resident"] == 0
    assert [c.text.strip() for c in engine.generate(PROMPTS[:2], ["v", None], SamplingParams(max_tokens=MAX_TOKENS))] \
        == [expected[0, 1], expected[1, None]]


def test_adapters_from_a_store_folder_and_replacement(models, expected, tmp_path):
    vlm, hypernet, adapters = models
    store = AdapterStore(tmp_path, base=adapters.base)
    store.put("clip", adapters[0])
    engine = Engine(tiny_vlm(seed=7, longest_edge=64, max_frames=3), hypernet=hypernet, store=store)
    assert engine.generate([PROMPTS[3]], ["clip"], SamplingParams(max_tokens=MAX_TOKENS))[0].text.strip() \
        == expected[3, 0]
    engine.add_adapter("clip", adapters[2], persist=True)  # replaced: the pool must not serve the old one
    assert engine.generate([PROMPTS[3]], ["clip"], SamplingParams(max_tokens=MAX_TOKENS))[0].text.strip() \
        == expected[3, 2]
    assert engine.delete_adapter("clip") and "clip" not in engine.store
    with pytest.raises(AdapterNotFound):
        engine.submit(PROMPTS[3], adapter="clip")


def test_background_thread_serves_many_threads(models, expected):
    engine = _engine(models, max_batch=4)
    cases = [(i % len(PROMPTS), (None, 0, 1, 2)[i % 4]) for i in range(24)]
    results = [None] * len(cases)

    def ask(i):
        p, v = cases[i]
        handle = engine.submit(PROMPTS[p], adapter=_adapter_id(v), params=SamplingParams(max_tokens=MAX_TOKENS))
        results[i] = handle.result(timeout=120).text.strip()

    with engine:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [expected[c] for c in cases]


def test_cancelled_requests_free_their_slot(models):
    engine = _engine(models, max_batch=1)
    running = engine.submit(PROMPTS[0], adapter="video-0", params=SamplingParams(max_tokens=MAX_TOKENS))
    queued = engine.submit(PROMPTS[1], adapter="video-1")
    engine.step()
    running.cancel()
    queued.cancel()
    engine.run_until_done()
    assert running.result().finish_reason == queued.result().finish_reason == "cancelled"
    assert engine.stats()["free_kv_slots"] == 1 and engine.stats()["pool"]["pinned"] == 1
    never_run = engine.submit(PROMPTS[2])
    engine.stop()  # no thread was started: what is queued is cancelled, nobody waits forever
    assert never_run.result(timeout=1).finish_reason == "cancelled"


def test_bad_requests_are_refused_up_front(models):
    engine = _engine(models, max_len=48, max_queue=2)
    with pytest.raises(AdapterNotFound, match="no-such"):
        engine.submit("Hi", adapter="no-such")
    with pytest.raises(ValueError, match=r"adapter_id: expected .*, got '\.\./x'"):
        engine.submit("Hi", adapter="../x")
    with pytest.raises(ValueError, match=r"prompt: expected at most 38 tokens with max_tokens 10 \(max_len 48\), got"):
        engine.submit("word " * 20, params=SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"prompt: expected at most 47 tokens with max_tokens 1 \(max_len 48\), got"):
        engine.submit("word " * 60)  # max_tokens None: whatever room is left, here none
    image = engine.vlm.model.config.image_token_id
    with pytest.raises(ValueError, match="prompt: expected text without image tokens"):
        engine.submit(prompt_ids=[1, image, 2])
    with pytest.raises(ValueError, match=r"messages\[0\].content: expected a string or a list of text parts"):
        engine.submit([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="prompt: expected exactly one of prompt and prompt_ids, got both"):
        engine.submit("Hi", prompt_ids=[1])
    engine.submit("Hi")
    engine.submit("Hi")
    with pytest.raises(EngineFull, match="queue: expected fewer than 2 waiting requests, got 2"):
        engine.submit("Hi")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens: expected an int >= 1 or None, got 0"),
    ({"temperature": -1.0}, "temperature: expected a finite number >= 0, got -1.0"),
    ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\], got 0.0"),
    ({"stop": [""]}, "stop: expected a non-empty string or a list of them"),
    ({"seed": -3}, r"seed: expected an int in \[0, 2\*\*63\) or None, got -3"),
])
def test_sampling_params_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


class _CharTokenizer:
    """One character per token id (id = code point)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("text, stop, streamed, final", [
    ("hello world", ("lo w",), ["h", "e", "", "l", "", "", ""], "hel"),  # stop split across tokens
    ("abcab", ("abd",), ["", "", "abc", "", ""], "abcab"),  # a false start is released at the end
    ("no stop here", ("zz",), list("no stop here"), "no stop here"),
])
def test_text_tracker_holds_back_what_may_become_a_stop_string(text, stop, streamed, final):
    tracker = TextTracker(_CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(tracker.add(ord(ch)))
        if tracker.stopped:
            break
    assert deltas == streamed[:len(deltas)]
    assert "".join(deltas) + tracker.finish() == final


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A byte-level BPE tokenizer (SmolLM2's kind) trained in-process on text with multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(["the naïve red circle moves left — café 漢字 🎥", "a small blue square moves up"] * 20,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_text_tracker_streams_the_full_decode_of_any_token_sequence(byte_level_tokenizer):
    """Incremental decoding gives the text of one full decode, whatever the tokens: multi-byte
    characters split over tokens, invalid byte runs, special tokens; a stream of a valid text
    never shows half a character."""
    tok = byte_level_tokenizer
    rng = np.random.default_rng(0)
    sentence = tok("the naïve café: 漢字 🎥 moves left", add_special_tokens=False)["input_ids"]
    cases = [sentence] + [rng.integers(0, len(tok), 40).tolist() for _ in range(50)]
    for ids in cases:
        tracker = TextTracker(tok, ())
        deltas = [tracker.add(i) for i in ids]
        assert "".join(deltas) + tracker.finish() == tok.decode(ids, skip_special_tokens=True) == tracker.text
    streamed = TextTracker(tok, ())
    assert not any("\ufffd" in streamed.add(i) for i in sentence)


def test_text_tracker_decodes_a_short_window_per_token_however_long_the_answer(byte_level_tokenizer):
    windows = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return byte_level_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = byte_level_tokenizer("a small blue square moves up " * 100, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(Counting(), ("zz",))
    for i in ids:
        tracker.add(i)
    assert len(ids) > 300 and max(windows) <= 4, max(windows)
    assert tracker.finish() == "" and tracker.text == "a small blue square moves up " * 100


def test_composed_long_video_adapters_are_served_like_any_other(models):
    from v2l_fast.long_video import internalize_long

    vlm, hypernet, _ = models
    long_clip = np.random.default_rng(9).integers(0, 256, (6, 24, 36, 3), dtype=np.uint8)
    composed = internalize_long(long_clip, vlm=vlm, hypernet=hypernet, segments=3)
    recompressed = internalize_long(long_clip, vlm=vlm, hypernet=hypernet, segments=3, max_rank=2)
    r = hypernet.config.rank
    assert composed.rank == 4 * r and recompressed.rank == 2 + r  # 3 segments + bias; 2 rows + bias
    engine = _engine(models)
    engine.add_adapter("long", composed)
    engine.add_adapter("long-r2", recompressed)
    got = engine.generate(PROMPTS[:2] * 2, ["long", "long", "long-r2", "long-r2"],
                          SamplingParams(max_tokens=MAX_TOKENS))
    want = [v2l_fast.ask(a, [p], vlm=vlm, max_new_tokens=MAX_TOKENS)[0]
            for a in (composed, recompressed) for p in PROMPTS[:2]]
    assert [c.text.strip() for c in got] == want


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_engine_on_cuda_answers_as_ask_does(models, backend):
    """On a GPU (fp32 weights, so that greedy choices cannot flip on a bf16 near-tie): the engine's
    answers, through each CUDA lora_sgmv backend, equal `ask`'s on the same device."""
    from v2l_fast.ops import runtime_missing

    missing = runtime_missing(backend, torch.device("cuda"))
    if missing:
        pytest.skip(f"{backend}: {missing}")
    _, hypernet, adapters = models
    vlm = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    vlm.model.to("cuda")
    want = [v2l_fast.ask(adapters[v] if v is not None else None, [PROMPTS[p]], vlm=vlm, max_new_tokens=MAX_TOKENS,
                         backend=backend)[0] for p, v in ((0, 0), (1, 1), (2, None))]
    engine = Engine(vlm, hypernet=copy.deepcopy(hypernet).to("cuda"), backend=backend)
    for v in (0, 1):
        engine.add_adapter(f"video-{v}", adapters[v])
    got = engine.generate(PROMPTS[:3], ["video-0", "video-1", None], SamplingParams(max_tokens=MAX_TOKENS))
    assert [c.text.strip() for c in got] == want


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(models, expected, monkeypatch):
    engine = _engine(models, max_batch=2)
    forward = engine.decoder.forward
    calls = []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(*args)

    monkeypatch.setattr(engine.decoder, "forward", broken_once)
    with engine:
        failed = engine.submit(PROMPTS[0], adapter="video-0", params=SamplingParams(max_tokens=MAX_TOKENS))
        completion = failed.result(timeout=60)
        assert completion.finish_reason == "error" and "CUDA out of memory (simulated)" in completion.error
        after = engine.submit(PROMPTS[0], adapter="video-0", params=SamplingParams(max_tokens=MAX_TOKENS))
        assert after.result(timeout=60).text.strip() == expected[0, 0]
    assert engine.stats()["free_kv_slots"] == 2 and engine.stats()["pool"]["pinned"] == 1


def test_refused_engine_arguments_leave_the_model_unfolded(models):
    from v2l_fast.adapters.fold import folded_bias_of

    _, hypernet, _ = models
    vlm = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    with pytest.raises(ValueError, match="budget_bytes: expected at least"):
        Engine(vlm, hypernet=hypernet, pool_bytes=1)
    with pytest.raises(ValueError, match="max_batch: expected an int >= 1, got 0"):
        Engine(vlm, hypernet=hypernet, max_batch=0)
    assert folded_bias_of(vlm.model) is None
    assert Engine(vlm, hypernet=hypernet).folded == folded_bias_of(vlm.model) is not None
