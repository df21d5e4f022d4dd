"""`v2l_fast.compat`: the one check that a checkpoint, a hypernetwork or adapters fit a base model."""

from __future__ import annotations

import pytest

from v2l_fast.compat import base_dimensions, check_fits
from v2l_fast.hypernet import Frames2LoRAConfig
from v2l_fast.vlm.factory import random_smolvlm, smolvlm_config

TINY = {"num_layers": 4, "hidden_size": 64, "intermediate_size": 128}


def test_dimensions_agree_across_model_config_and_hypernet_config():
    config = smolvlm_config("tiny")
    assert base_dimensions(random_smolvlm("tiny")) == TINY
    assert base_dimensions(config) == base_dimensions(config.text_config) == TINY
    assert base_dimensions(Frames2LoRAConfig.for_vlm(config, rank=4)) == TINY
    assert base_dimensions({**TINY, "name": "tiny"}) == TINY
    with pytest.raises(ValueError, match=r"^expect: expected a model, .*got str$"):
        base_dimensions("500M", "expect")


def test_a_fit_passes_and_a_misfit_names_every_difference():
    check_fits("hypernet", "a hypernetwork", {**TINY, "rank": 4}, TINY)  # extra fields are not compared
    other = base_dimensions(smolvlm_config("500M"))
    with pytest.raises(ValueError) as raised:
        check_fits("hypernet", "a hypernetwork", other, TINY)
    assert str(raised.value) == (
        "hypernet: expected a hypernetwork made for this base model, got a hypernetwork made for another base "
        "model: num_layers (L) is 32 in the hypernetwork but 4 expected; hidden_size (H) is 960 in the "
        "hypernetwork but 64 expected; intermediate_size (I) is 2560 in the hypernetwork but 128 expected")


def test_names_and_unsymbolled_fields_and_a_rank_only_misfit():
    with pytest.raises(ValueError) as raised:
        check_fits("adapters in 'a.safetensors'", "adapters", {**TINY, "down_proj_sha256": "ab"},
                   {**TINY, "down_proj_sha256": "cd"}, names=("org/small", "org/other"))
    assert str(raised.value) == (
        "adapters in 'a.safetensors': expected adapters made for this base model ('org/other'), got adapters made "
        "for another base model ('org/small'): down_proj_sha256 is 'ab' in the adapters but 'cd' expected")
    with pytest.raises(ValueError, match=r"^checkpoint: .*got a checkpoint made with another rank: "
                       r"rank \(r\) is 4 in the checkpoint but 16 expected$"):
        check_fits("checkpoint", "a checkpoint", {**TINY, "rank": 4}, {**TINY, "rank": 16})
