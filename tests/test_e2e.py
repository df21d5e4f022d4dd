"""End to end against the golden fixture: official features → hypernetwork → adapters → logits,
and internalize → ask on the fixture's VLM from a video file written by the test."""

from __future__ import annotations

import pytest
import torch
from golden import FIXTURES, needs_fixtures
from safetensors.torch import load_file

import v2l_fast
from v2l_fast.testing import assert_rel_close, write_test_video
from v2l_fast.vlm import LoRAPatch, VideoBatch, down_proj_targets, extract_features, load_smolvlm
from v2l_fast.vlm.factory import tiny_smolvlm_tokenizer

pytestmark = needs_fixtures


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURES / "frames2lora_tiny.safetensors")


@pytest.fixture(scope="module")
def session():
    vlm = load_smolvlm(FIXTURES / "frames2lora_tiny_vlm", dtype=torch.float32, tokenizer=tiny_smolvlm_tokenizer(),
                       longest_edge=64, max_frames=3)
    return v2l_fast.load(vlm, FIXTURES / "frames2lora_tiny_ckpt.pt", device="cpu")


def test_features_to_adapters_to_logits(fx, session):
    model, hypernet = session.vlm.model, session.hypernet
    ids = fx["e2e.ctx_input_ids"]
    batch = VideoBatch(ids, torch.ones_like(ids), fx["e2e.pixel_values"], fx["e2e.pixel_attention_mask"])
    features, mask = extract_features(model, batch)
    assert_rel_close(features, fx["e2e.features"], tol=1e-5)
    with torch.no_grad():
        out = hypernet.generate(features, mask)
    assert out.alpha == 16.0
    assert_rel_close(out.A, fx["e2e.A_combined"], tol=1e-5)
    assert_rel_close(out.B, fx["e2e.B_combined"], tol=1e-5)
    query = fx["e2e.query_input_ids"]
    with torch.no_grad():
        assert_rel_close(model(input_ids=query).logits, fx["e2e.logits_base"], tol=1e-5)
        with LoRAPatch(down_proj_targets(model), out.A, out.B, out.alpha):
            assert_rel_close(model(input_ids=query).logits, fx["e2e.logits_with_lora"], tol=1e-5)


def test_fixture_adapters_give_the_fixture_logits(fx, session):
    """The LoRA patch alone, fed the fixture's own adapters (independent of the hypernetwork)."""
    model = session.vlm.model
    with torch.no_grad(), LoRAPatch(down_proj_targets(model), fx["e2e.A_combined"], fx["e2e.B_combined"], 16.0):
        logits = model(input_ids=fx["e2e.query_input_ids"]).logits
    assert_rel_close(logits, fx["e2e.logits_with_lora"], tol=1e-5)
    assert (logits - fx["e2e.logits_base"]).norm() > 0.05 * fx["e2e.logits_base"].norm()


def test_internalize_then_ask_from_a_video_file(tmp_path, session):
    paths = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    write_test_video(paths[0], num_frames=12, fps=4, seed=1)
    write_test_video(paths[1], num_frames=6, fps=2, size=(40, 30), codec="libx264", seed=2)
    adapters = session.internalize(paths)
    assert adapters.A.shape == (2, 4, 8, 128) and adapters.B.shape == (2, 4, 8, 64)
    assert adapters.alpha == 16.0 and adapters.A.dtype == torch.float32
    assert not torch.allclose(adapters.A[0], adapters.A[1])
    answers = session.ask(adapters, ["What happens in the video?", "Who is there?"], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    saved = tmp_path / "adapters.safetensors"
    adapters.save(saved)
    again = session.load_adapters(saved)
    assert torch.equal(again.A, adapters.A) and torch.equal(again.B, adapters.B)
    assert session.ask(again, ["What happens in the video?", "Who is there?"], max_new_tokens=6) == answers
