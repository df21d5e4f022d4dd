"""SmolVLM2 loading through transformers' classes, incl. the PEFT-saved fixture VLM."""

from __future__ import annotations

import json

import pytest
import torch
from golden import FIXTURES, TINY_VLM, needs_fixtures
from safetensors.torch import load_file

from v2l_fast.vlm import VLM, down_proj_targets, load_smolvlm
from v2l_fast.vlm.factory import random_smolvlm, tiny_smolvlm_tokenizer


@needs_fixtures
def test_peft_saved_fixture_loads_its_base_down_proj_weights():
    """The fixture stores down_proj as PEFT's base_layer: the loader puts it back in place."""
    vlm = load_smolvlm(TINY_VLM, dtype=torch.float32, tokenizer=tiny_smolvlm_tokenizer())
    expected = load_file(FIXTURES / "frames2lora_tiny.safetensors")["lora.down_proj_weight"]
    got = torch.stack([m.weight for m in down_proj_targets(vlm.model)])
    assert torch.equal(got, expected)
    assert not vlm.model.training and vlm.dtype == torch.float32
    assert vlm.preprocessor.max_image_size == 32 and vlm.preprocessor.image_seq_len == 4


@needs_fixtures
def test_directory_without_tokenizer_asks_for_one():
    with pytest.raises(ValueError, match="tokenizer="):
        load_smolvlm(TINY_VLM, dtype=torch.float32)


def test_saved_model_round_trip_reads_tokenizer_and_preprocessor_config(tmp_path):
    model = random_smolvlm("tiny", seed=3)
    model.save_pretrained(tmp_path)
    tiny_smolvlm_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SmolVLMImageProcessor", "max_image_size": {"longest_edge": 32},
        "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4], "resample": 1,
        "video_sampling": {"fps": 2, "max_frames": 64, "video_size": {"longest_edge": 1536}}}))
    vlm = load_smolvlm(str(tmp_path), dtype=torch.bfloat16, max_frames=5)
    assert vlm.dtype == torch.bfloat16
    assert vlm.preprocessor.image_mean == (0.4, 0.5, 0.6) and vlm.preprocessor.fps == 2.0
    assert vlm.preprocessor.max_frames == 5
    for ours, theirs in zip(vlm.model.parameters(), model.parameters()):
        assert torch.equal(ours.float(), theirs.to(torch.bfloat16).float())
    assert vlm.tokenizer.convert_tokens_to_ids("<image>") == 150


def test_missing_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = random_smolvlm("tiny", seed=3)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.text_model.layers.1.self_attn.q_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights.*layers.1.self_attn.q_proj"):
        load_smolvlm(tmp_path, dtype=torch.float32, tokenizer=tiny_smolvlm_tokenizer())


def test_tokenizer_of_another_model_is_refused():
    model = random_smolvlm("tiny")
    model.config.image_token_id = 151
    with pytest.raises(ValueError, match="image_token_id"):
        VLM(model, tiny_smolvlm_tokenizer(), None)


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "some/deep/missing/dir"])
def test_missing_local_directory_is_a_clear_error(path):
    with pytest.raises(ValueError, match="^name_or_path: expected a hub id"):
        load_smolvlm(path)
