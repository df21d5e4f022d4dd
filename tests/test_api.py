"""internalize / ask / Adapters on tiny random SmolVLM2 models: behaviour and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import v2l_fast
from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.api import question_ids
from v2l_fast.ops import resolve, use_backend
from v2l_fast.testing import assert_rel_close, tiny_hypernet, write_test_video
from v2l_fast.vlm import LoRAPatch, VideoError, down_proj_targets
from v2l_fast.vlm.factory import random_smolvlm, tiny_vlm
from v2l_fast.vlm.features import inner_model


@pytest.fixture(scope="module")
def session():
    vlm = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    return v2l_fast.Session(vlm, tiny_hypernet(vlm.model))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    write_test_video(path, num_frames=10, fps=2, seed=3)
    return path


def _frames(n, seed, size=(24, 36)):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def test_internalize_batch_equals_one_by_one(session, clip):
    videos = [clip, _frames(2, 1), [Image.fromarray(f) for f in _frames(1, 2, (30, 20))]]
    batched = session.internalize(videos)
    assert len(batched) == 3 and batched.A.shape == (3, 4, 8, 128) and batched.B.shape == (3, 4, 8, 64)
    for i, video in enumerate(videos):
        alone = session.internalize([video])
        assert_rel_close(batched.A[i], alone.A[0], tol=1e-5)
        assert_rel_close(batched.B[i], alone.B[0], tol=1e-5)
    chunked = session.internalize(videos, batch_size=2, progress=False)
    assert_rel_close(chunked.A, batched.A, tol=1e-5)
    assert batched.base == base_fingerprint(session.vlm.model)


def test_ask_context_holds_no_visual_token(session, clip):
    model, tokenizer = session.vlm.model, session.vlm.tokenizer
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs.get("input_ids"), kwargs.get("pixel_values")))

    adapters = session.internalize([clip, clip])
    handle = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        answers = session.ask(adapters, ["What is shown?", "Describe the scene in detail."], max_new_tokens=4)
    finally:
        handle.remove()
    assert len(answers) == 2 and len(seen) >= 2
    visual = {150, tokenizer.convert_tokens_to_ids("<fake_token_around_image>"),
              tokenizer.convert_tokens_to_ids("<global-img>")}
    for input_ids, pixel_values in seen:
        assert pixel_values is None
        assert not visual.intersection(input_ids.flatten().tolist())
    prompt_ids = seen[0][0][0]
    assert tokenizer.decode(prompt_ids[prompt_ids != tokenizer.pad_token_id]) == \
        "<|im_start|>User: What is shown?<end_of_utterance>\nAssistant:"


def test_ask_batched_equals_one_by_one_and_adapters_matter(session, clip):
    adapters = session.internalize([clip, _frames(2, 5)])
    prompts = ["What happens?", "Is there any person in the whole video at all?"]
    batched = session.ask(adapters, prompts, max_new_tokens=8)
    assert batched == [session.ask(adapters[i], [p], max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    model = session.vlm.model
    ids = torch.tensor([question_ids(session.vlm.tokenizer, prompts[0])])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with LoRAPatch(down_proj_targets(model), adapters.A[:1], adapters.B[:1], adapters.alpha):
            patched = model(input_ids=ids).logits
        with LoRAPatch(down_proj_targets(model), adapters.A[:1], torch.zeros_like(adapters.B[:1]), adapters.alpha):
            zero = model(input_ids=ids).logits
    assert (patched - base).norm() > 1e-3 * base.norm()
    assert torch.equal(zero, base)


def test_adapters_save_load_and_refuse_another_base(tmp_path, session, clip):
    adapters = session.internalize([clip])
    path = tmp_path / "a.safetensors"
    adapters.save(path)
    loaded = Adapters.load(path, model=session.vlm.model)
    assert torch.equal(loaded.A, adapters.A) and loaded.alpha == adapters.alpha and loaded.base == adapters.base
    assert loaded.bias_rank == adapters.bias_rank == session.hypernet.config.rank
    other = random_smolvlm("tiny", seed=99)
    with pytest.raises(ValueError, match="another base model.*down_proj_sha256"):
        Adapters.load(path, model=other)
    with pytest.raises(ValueError, match="another base model.*num_layers"):
        Adapters.load(path, model=random_smolvlm("tiny", num_hidden_layers=2))
    with pytest.raises(ValueError, match="another base model"):
        session.ask(Adapters(adapters.A, adapters.B, adapters.alpha, base_fingerprint(other)), ["Hi"])
    not_adapters = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file
    save_file({"A": adapters.A}, not_adapters)
    with pytest.raises(ValueError, match="v2l_fast adapters file"):
        Adapters.load(not_adapters)
    with pytest.raises(ValueError, match="cannot read adapters"):
        Adapters.load(tmp_path / "missing.safetensors")
    from v2l_fast.adapters import FORMAT
    save_file({"A": adapters.A, "B": adapters.B}, not_adapters, metadata={"format": FORMAT})
    with pytest.raises(ValueError, match="metadata is incomplete or malformed .KeyError: 'alpha'"):
        Adapters.load(not_adapters)


def test_adapters_indexing_and_concatenation(session, clip):
    adapters = session.internalize([clip, _frames(1, 4)])
    repeated = adapters[[0, 0, 1]]
    assert len(repeated) == 3 and torch.equal(repeated.A[1], adapters.A[0])
    assert torch.equal(Adapters.cat([adapters[1], adapters[0]]).B, adapters.B.flip(0))
    with pytest.raises(ValueError, match="B"):
        Adapters(adapters.A, adapters.B[:, :, :4], 16.0, {})
    with pytest.raises(ValueError, match="base"):
        Adapters(adapters.A, adapters.B, 16.0, {"hidden_size": 65})
    with pytest.raises(ValueError, match=r"bias_rank: expected an int in \[0, 8\] \(R of A\), got 9"):
        Adapters(adapters.A, adapters.B, 16.0, {}, bias_rank=9)


def test_bias_block_is_shared_and_without_bias_keeps_the_video_rows(session, clip):
    adapters = session.internalize([clip, _frames(1, 4)])
    r = session.hypernet.config.rank
    bias_A, bias_B = adapters.bias_block()
    assert torch.equal(bias_A, session.hypernet.bias_A["down_proj"])
    assert torch.equal(adapters[1].bias_block()[1], bias_B)
    own = adapters.without_bias()
    assert own.rank == adapters.rank - r and own.bias_rank == 0 and torch.equal(own.A, adapters.A[:, :, :r])
    with pytest.raises(ValueError, match="adapters: expected adapters that carry the bias block"):
        own.bias_block()


def test_bad_inputs_get_clear_errors(tmp_path, session, clip):
    with pytest.raises(VideoError, match="not found.*missing.mp4"):
        session.internalize([clip, tmp_path / "missing.mp4"])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        session.internalize([corrupt])
    with pytest.raises(ValueError, match=r"videos\[0\]"):
        session.internalize([42])
    with pytest.raises(ValueError, match="videos"):
        session.internalize([])
    with pytest.raises(ValueError, match="batch_size"):
        session.internalize([clip], batch_size=0)
    adapters = session.internalize([clip])
    with pytest.raises(ValueError, match="one adapter per prompt"):
        session.ask(adapters, ["a?", "b?"])
    with pytest.raises(ValueError, match="adapters"):
        session.ask(adapters.A, ["a?"])
    with pytest.raises(ValueError, match=r"prompts\[0\].*image tokens"):
        session.ask(adapters, ["look: <image>"])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        session.ask(adapters, [3])
    other = random_smolvlm("tiny", num_hidden_layers=2)
    with pytest.raises(ValueError, match="hypernet.*num_layers"):
        v2l_fast.Session(session.vlm, tiny_hypernet(other))
    patch = LoRAPatch(down_proj_targets(session.vlm.model), adapters.A, adapters.B, adapters.alpha)
    with patch, pytest.raises(ValueError, match="without a LoRA patch"):
        session.internalize([clip])


def test_ask_without_adapters_is_the_base_model(session):
    answers = session.ask(None, "Hello there", max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.triton
def test_v2l_backend_switches_the_stack(monkeypatch, session):
    """V2L_BACKEND=triton runs the Perceiver and the LoRA through the Triton kernels
    (interpreter on CPU) and gives the same adapters and answers as the torch backend."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    frames = _frames(1, 8)
    monkeypatch.setenv("V2L_BACKEND", "torch")
    ref = session.internalize([frames])
    ref_answer = session.ask(ref, ["What?"], max_new_tokens=3)
    monkeypatch.setenv("V2L_BACKEND", "triton")
    got = session.internalize([frames])
    assert_rel_close(got.A, ref.A, tol=1e-4)
    assert session.ask(got, ["What?"], max_new_tokens=3) == ref_answer


@pytest.fixture
def lora_backends_seen(session):
    """The backend ``lora_sgmv`` resolves to (under the setting in force) at every forward of
    the VLM body, i.e. inside the calls: feature extraction, prefill and decode."""
    seen: list[str] = []

    def record(module, args):
        seen.append(resolve("lora_sgmv", "auto", session.vlm.device).backend)

    handle = inner_model(session.vlm.model).register_forward_pre_hook(record)
    yield seen
    handle.remove()


def test_backend_argument_is_what_the_ops_resolve_to_inside_the_call(monkeypatch, session, lora_backends_seen):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    automatic = resolve("lora_sgmv", "auto", session.vlm.device).backend
    if automatic == "torch":
        pytest.skip("auto picks torch for lora_sgmv here (v2l_fast._C not built, no GPU): nothing to switch from")
    adapters = session.internalize([_frames(1, 9)], backend="torch")
    answers = session.ask(adapters, ["What?"], max_new_tokens=2, backend="torch")
    assert lora_backends_seen and set(lora_backends_seen) == {"torch"}
    lora_backends_seen.clear()
    assert session.ask(adapters, ["What?"], max_new_tokens=2) == answers  # "auto": auto's own choice
    assert set(lora_backends_seen) == {automatic}
    assert resolve("lora_sgmv", "auto", session.vlm.device).backend == automatic  # the scope ended with the call

    lora_backends_seen.clear()
    pinned = v2l_fast.Session(session.vlm, session.hypernet, backend="torch")
    pinned.ask(adapters, ["What?"], max_new_tokens=2)
    assert set(lora_backends_seen) == {"torch"}
    lora_backends_seen.clear()
    pinned.ask(adapters, ["What?"], max_new_tokens=2, backend=automatic)  # a call's backend= wins
    assert set(lora_backends_seen) == {automatic}


def test_backend_auto_keeps_the_enclosing_scope_and_the_environment(monkeypatch, session, lora_backends_seen):
    adapters = session.internalize([_frames(1, 9)])
    lora_backends_seen.clear()
    with use_backend("torch"):
        session.ask(adapters, ["What?"], max_new_tokens=2, backend="auto")
    assert set(lora_backends_seen) == {"torch"}
    lora_backends_seen.clear()
    monkeypatch.setenv("V2L_BACKEND", "torch")
    session.ask(adapters, ["What?"], max_new_tokens=2)
    assert set(lora_backends_seen) == {"torch"}


def test_bad_backend_is_a_clean_error_before_any_work(session, lora_backends_seen):
    names = r"expected 'auto' or one of \('torch', 'triton', 'cuda', 'cpp'\)"
    with pytest.raises(ValueError, match=rf"^backend: {names}, got 'nope'$"):
        session.internalize([_frames(1, 9)], backend="nope")
    with pytest.raises(ValueError, match=rf"^backend: {names}, got 'fast'$"):
        v2l_fast.Session(session.vlm, session.hypernet, backend="fast")
    with pytest.raises(ValueError, match=rf"^backend: {names}, got None$"):
        v2l_fast.load(session.vlm, session.hypernet, backend=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^backend: expected a backend that can run on cpu, got 'cuda', which "
                           r"cannot: "):
            session.ask(None, ["Hi?"], backend="cuda")
    assert lora_backends_seen == []
