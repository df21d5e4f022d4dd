"""The bias fold on tiny random SmolVLM2 models: folded base + per-video rows = unfolded base + full
adapters, in fp32 to rounding and in bf16 to bf16 precision; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import v2l_fast
from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.adapters.fold import (
    CONFIG_KEY,
    FoldedBias,
    bias_digest,
    fold_bias,
    folded_bias_of,
    read_folded_bias,
)
from v2l_fast.testing import rel_error, tiny_hypernet
from v2l_fast.vlm import LoRAPatch, down_proj_targets
from v2l_fast.vlm.factory import random_smolvlm, tiny_vlm

SEED = 7
PROMPTS = ["What happens in the video?", "Is there a person?"]


@pytest.fixture(scope="module")
def adapters():
    """Two videos' adapters from a tiny hypernetwork (rank 4: R = 8, bias_rank 4, alpha 16)."""
    vlm = tiny_vlm(seed=SEED, longest_edge=64, max_frames=3)
    frames = [np.random.default_rng(s).integers(0, 256, (2, 24, 36, 3), dtype=np.uint8) for s in (1, 2)]
    out = v2l_fast.Session(vlm, tiny_hypernet(vlm.model)).internalize(frames)
    assert out.bias_rank == 4 and out.rank == 8 and out.alpha == 16.0
    return out


def _model(dtype=torch.float32):
    return random_smolvlm("tiny", seed=SEED, dtype=dtype)


def _ids():
    return torch.tensor([[1, 40, 41, 42, 43, 44, 50, 60, 70], [1, 70, 71, 72, 73, 74, 75, 76, 77]])


@torch.no_grad()
def _logits(model, adapters: Adapters | None) -> torch.Tensor:
    if adapters is None:
        return model(input_ids=_ids()).logits.float()
    with LoRAPatch(down_proj_targets(model), adapters.A, adapters.B, adapters.alpha):
        return model(input_ids=_ids()).logits.float()


def test_fold_fp32_equals_full_adapters(adapters):
    model, folded_model = _model(), _model()
    before = base_fingerprint(folded_model)
    record = fold_bias(folded_model, *adapters.bias_block(), adapters.alpha)
    assert record.base == before and record.folded_base == base_fingerprint(folded_model)
    assert record.folded_base["down_proj_sha256"] != before["down_proj_sha256"]
    assert record.digest == bias_digest(*adapters.bias_block()) and record.rank == 4 and record.alpha == 16.0
    served = record.strip(adapters)
    assert served.rank == 4 and served.bias_rank == 0 and served.base == record.folded_base
    served.check_base(folded_model)
    reference = _logits(model, adapters)
    assert rel_error(_logits(folded_model, served), reference) < 1e-5
    # Both halves matter: the fold alone and the rows alone are each far from the reference.
    assert rel_error(_logits(folded_model, None), reference) > 1e-2
    assert rel_error(_logits(model, served), reference) > 1e-2


def test_fold_bf16_same_answers_and_logits_to_bf16_precision(adapters):
    # Tolerance: the bf16 base path itself sits ~1e-2 from fp32 on these models (measured 1.2–1.5e-2
    # relative on the logits: 4 layers of bf16 GEMMs and activations). Folding adds one bf16 rounding
    # of W + ΔW_bias per weight, where the unfolded model adds an fp32 bias delta to its bf16 output;
    # so the folded model must be as close to the fp32 reference as the unfolded bf16 model is (25%
    # slack) and within the design card's bf16 bound (1e-2) plus that slack of it.
    reference = _logits(_model(), adapters)
    model, folded_model = _model(torch.bfloat16), _model(torch.bfloat16)
    record = fold_bias(folded_model, *adapters.bias_block(), adapters.alpha)
    served = record.strip(adapters)
    unfolded_bf16, folded_bf16 = _logits(model, adapters), _logits(folded_model, served)
    assert rel_error(folded_bf16, reference) <= 1.25 * rel_error(unfolded_bf16, reference)
    assert rel_error(folded_bf16, unfolded_bf16) <= 1.25e-2
    assert folded_model.model.text_model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    vlm, folded_vlm = tiny_vlm(model=model), tiny_vlm(model=folded_model)
    answers = v2l_fast.api.ask(adapters, PROMPTS, vlm=vlm, max_new_tokens=8)
    assert v2l_fast.api.ask(served, PROMPTS, vlm=folded_vlm, max_new_tokens=8) == answers
    assert v2l_fast.api.ask(None, PROMPTS, vlm=vlm, max_new_tokens=8) != answers  # the adapters matter


def test_fold_marks_config_and_survives_save(adapters, tmp_path):
    model = _model()
    record = fold_bias(model, *adapters.bias_block(), adapters.alpha)
    assert folded_bias_of(model) == record and folded_bias_of(_model()) is None
    model.save_pretrained(tmp_path)
    from transformers import SmolVLMForConditionalGeneration

    loaded = SmolVLMForConditionalGeneration.from_pretrained(tmp_path)
    assert getattr(loaded.config, CONFIG_KEY) == record.to_dict()
    assert FoldedBias.from_dict(record.to_dict()) == record and read_folded_bias(tmp_path) == record
    _model().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"^directory: expected a folded base model \(config.json with "
                       r"'v2l_fast_folded_bias', written by export_folded_base\), got '.*plain', whose config.json "
                       r"has none$"):
        read_folded_bias(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"^model: expected a model whose down_proj weights hold no folded bias "
                       r"block yet, got a model already folded \(bias digest [0-9a-f]{12}…\)$"):
        fold_bias(loaded, *adapters.bias_block(), adapters.alpha)


def test_fold_bad_input(adapters):
    bias_A, bias_B = adapters.bias_block()
    model = _model()
    with pytest.raises(ValueError, match=r"^bias_A: expected shape \[L, r, I\] = \[4, r ≥ 1, 128\] \(the model's "
                       r"layers and down_proj in_features\), got \[3, 4, 128\]$"):
        fold_bias(model, bias_A[:3], bias_B, 16.0)
    with pytest.raises(ValueError, match=r"^bias_B: expected shape \[L, r, H\] = \[4, 4, 64\] \(layers, r of "
                       r"bias_A, out_features\), got \[4, 3, 64\]$"):
        fold_bias(model, bias_A, bias_B[:, :3], 16.0)
    with pytest.raises(ValueError, match=r"^bias_A: expected a 3-D tensor \[L, r, I\], got tensor of shape"):
        fold_bias(model, bias_A[0], bias_B, 16.0)
    with pytest.raises(ValueError, match=r"^alpha: expected a positive finite float, got nan$"):
        fold_bias(model, bias_A, bias_B, float("nan"))
    patched = r"^model: expected a model without a LoRA patch while folding, got a patched model$"
    with LoRAPatch(down_proj_targets(model), adapters.A, adapters.B, adapters.alpha), \
            pytest.raises(ValueError, match=patched):
        fold_bias(model, bias_A, bias_B, 16.0)
    assert folded_bias_of(model) is None and base_fingerprint(model) == adapters.base  # untouched


def test_strip_refuses_other_adapters(adapters):
    record = fold_bias(_model(), *adapters.bias_block(), adapters.alpha)
    other_bias = Adapters(adapters.A.clone(), adapters.B.clone(), adapters.alpha, adapters.base, 4)
    other_bias.B[:, :, -1] += 1.0
    with pytest.raises(ValueError, match=r"^adapters: expected adapters carrying the folded bias block \(digest "
                       r"[0-9a-f]{12}…\), got a different bias block \(digest [0-9a-f]{12}…\)$"):
        record.strip(other_bias)
    mixed = Adapters(adapters.A.clone(), adapters.B.clone(), adapters.alpha, adapters.base, 4)
    mixed.A[1, :, -1] += 1.0
    with pytest.raises(ValueError, match=r"got a different bias block .*and not the same in every adapter\)$"):
        record.check(mixed)
    with pytest.raises(ValueError, match=r"^adapters: expected adapters whose last 4 rows are the bias block "
                       r"\(bias_rank 4\), got bias_rank 0$"):
        record.strip(adapters.without_bias())
    with pytest.raises(ValueError, match=r"^adapters: expected adapters of alpha 16.0 \(the folded bias block's\), "
                       r"got alpha 8.0$"):
        record.strip(Adapters(adapters.A, adapters.B, 8.0, adapters.base, 4))
    other_base = dict(adapters.base, down_proj_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"^adapters: expected adapters made for this base model.*down_proj_sha256"):
        record.strip(Adapters(adapters.A, adapters.B, adapters.alpha, other_base, 4))
