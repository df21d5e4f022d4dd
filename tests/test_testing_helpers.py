"""`v2l_fast.testing`: model configs with the released shapes, tolerance helpers."""

from __future__ import annotations

import pytest
import torch

from v2l_fast.testing import assert_rel_close, image_seq_len, random_smolvlm, rel_error, smolvlm_config


@pytest.mark.parametrize("size,H,I,L,tokens", [
    ("256M", 576, 1536, 30, 64), ("500M", 960, 2560, 32, 64), ("2.2B", 2048, 8192, 24, 81), ("tiny", 64, 128, 4, 4),
])
def test_configs_carry_the_released_shapes(size, H, I, L, tokens):
    text = smolvlm_config(size).text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (H, I, L)
    assert image_seq_len(size) == tokens


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="size"):
        smolvlm_config("7B")


def test_tiny_model_runs_a_forward_with_overrides():
    model = random_smolvlm(num_hidden_layers=2, seed=3)
    assert len(model.model.text_model.layers) == 2
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 3, 160) and torch.isfinite(out.logits).all()
    again = random_smolvlm(num_hidden_layers=2, seed=3)(input_ids=torch.tensor([[5, 6, 7]])).logits
    torch.testing.assert_close(out.logits, again, rtol=0, atol=0)


def test_rel_error_and_assert():
    ref = torch.ones(10)
    assert rel_error(ref * 1.01, ref) == pytest.approx(0.01)
    assert rel_error(torch.full((10,), float("nan")), ref) == float("inf")
    assert rel_error(torch.ones(3), ref) == float("inf")
    assert_rel_close(ref + 1e-6, ref, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(ref * 1.01, ref, torch.float32)
