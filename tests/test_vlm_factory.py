"""`v2l_fast.vlm.factory`: SmolVLM2 configs with the released shapes, tiny random models and tokenizer."""

from __future__ import annotations

import pytest
import torch

from v2l_fast.vlm.factory import image_seq_len, random_smolvlm, smolvlm_config, tiny_smolvlm_tokenizer, tiny_vlm


@pytest.mark.parametrize("size,H,I,L,tokens", [
    ("256M", 576, 1536, 30, 64), ("500M", 960, 2560, 32, 64), ("2.2B", 2048, 8192, 24, 81), ("tiny", 64, 128, 4, 4),
])
def test_configs_carry_the_released_shapes(size, H, I, L, tokens):
    text = smolvlm_config(size).text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (H, I, L)
    assert image_seq_len(size) == tokens


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match=r"^size: expected one of \['2.2B', '256M', '500M', 'tiny'\], got '7B'$"):
        smolvlm_config("7B")


def test_tiny_model_runs_a_forward_with_overrides():
    model = random_smolvlm(num_hidden_layers=2, seed=3)
    assert len(model.model.text_model.layers) == 2
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 3, 160) and torch.isfinite(out.logits).all()
    again = random_smolvlm(num_hidden_layers=2, seed=3)(input_ids=torch.tensor([[5, 6, 7]])).logits
    torch.testing.assert_close(out.logits, again, rtol=0, atol=0)


def test_tiny_tokenizer_renders_the_smolvlm_chat_template():
    tokenizer = tiny_smolvlm_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>User: Hi?<end_of_utterance>\nAssistant:"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and 2 in ids and tokenizer.decode(ids, skip_special_tokens=True) == "User: Hi?\nAssistant:"
    assert tokenizer.convert_tokens_to_ids("<image>") == 150


def test_tiny_vlm_holds_model_tokenizer_and_preprocessor_overrides():
    vlm = tiny_vlm(seed=1, max_frames=3)
    assert vlm.preprocessor.max_frames == 3
    assert vlm.tokenizer.convert_tokens_to_ids("<image>") == vlm.model.config.image_token_id
    assert vlm.preprocessor.image_seq_len == image_seq_len("tiny")
