"""Frames2LoRA checkpoints: the official .pt via the restricted unpickler, dicts, own format."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from golden import OFFICIAL_CKPT, golden_tensors
from safetensors.torch import save_file

from v2l_fast.hypernet import (
    Frames2LoRA,
    Frames2LoRAConfig,
    PickledRecord,
    UnsafeCheckpointError,
    load_frames2lora,
    read_official_checkpoint,
    save_frames2lora,
)
from v2l_fast.vlm.factory import smolvlm_config


@pytest.fixture(scope="module")
def state_dict():
    tensors = golden_tensors()
    return {k.removeprefix("hypernet."): v for k, v in tensors.items() if k.startswith("hypernet.")}


def small_model(seed: int = 0) -> Frames2LoRA:
    torch.manual_seed(seed)
    model = Frames2LoRA(Frames2LoRAConfig(
        num_layers=2, hidden_size=24, intermediate_size=40, rank=2, latent_size=16,
        num_latent_queries=3, num_blocks=2, num_self_attn_per_block=1, num_heads=4, head_dim=8,
        num_kv_heads=2, base_model_name_or_path="org/some-vlm"))
    with torch.no_grad():  # make the zero-initialised B side matter
        model.scaler_B["down_proj"].normal_()
        model.bias_B["down_proj"].normal_()
    return model


def test_official_pt_tensors_and_metadata(state_dict):
    raw = read_official_checkpoint(OFFICIAL_CKPT)
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    assert tensors.keys() == state_dict.keys()
    assert all(torch.equal(tensors[k], state_dict[k]) for k in state_dict)
    assert raw["base_model_name_or_path"] == "tiny-random-smolvlm"
    config = raw["hypernet_config"]
    assert isinstance(config, PickledRecord)
    assert config.pickled_class == "ctx_to_lora.modeling.hypernet.HypernetConfig"
    assert config.aggregator_config.num_blocks == 3 and config.lora_config.r == 4
    assert config.lora_config.target_modules == {"down_proj"}
    assert torch.equal(config.layer_indices, torch.arange(4))
    assert raw["ctx_encoder_args"].ctx_encoder_type == "per_layer_activations"
    model = load_frames2lora(OFFICIAL_CKPT)
    assert model.config.base_model_name_or_path == "tiny-random-smolvlm"
    assert not model.training


def _evil_payload(marker):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    return Payload()


def test_pickle_with_foreign_global_is_refused_without_running(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"head.weight": torch.zeros(2), "payload": _evil_payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"^path: refusing .*'posix\.system'"):
        load_frames2lora(path)
    assert not marker.exists()


def test_foreign_global_inside_a_config_record_is_refused(tmp_path, monkeypatch):
    """A ctx_to_lora class becomes an inert record, but what its state holds is still vetted."""
    marker = tmp_path / "executed"
    module = types.ModuleType("ctx_to_lora.configs")

    class CtxEncoderArguments:
        def __init__(self, payload=None):
            self.payload = payload

        def __setstate__(self, state):  # the real class's code must never run at load time
            (tmp_path / "setstate_ran").touch()
            self.__dict__.update(state)

    CtxEncoderArguments.__module__ = "ctx_to_lora.configs"
    CtxEncoderArguments.__qualname__ = "CtxEncoderArguments"
    module.CtxEncoderArguments = CtxEncoderArguments
    monkeypatch.setitem(sys.modules, "ctx_to_lora", types.ModuleType("ctx_to_lora"))
    monkeypatch.setitem(sys.modules, "ctx_to_lora.configs", module)
    benign, evil = tmp_path / "benign.pt", tmp_path / "evil.pt"
    torch.save({"ctx_encoder_args": CtxEncoderArguments(payload=[1, 2])}, benign)
    torch.save({"ctx_encoder_args": CtxEncoderArguments(payload=_evil_payload(marker))}, evil)
    monkeypatch.delitem(sys.modules, "ctx_to_lora.configs")
    record = read_official_checkpoint(benign)["ctx_encoder_args"]
    assert isinstance(record, PickledRecord) and record.payload == [1, 2]
    assert not (tmp_path / "setstate_ran").exists()
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        read_official_checkpoint(evil)
    assert not marker.exists()


def test_non_zip_and_missing_files_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match=r"^path: .*not a zip archive"):
        load_frames2lora(legacy)
    with pytest.raises(ValueError, match=r"^path: .*existing checkpoint"):
        load_frames2lora(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"^path_or_state_dict: "):
        load_frames2lora(3)
    truncated = tmp_path / "truncated.pt"
    data = Path(OFFICIAL_CKPT).read_bytes()
    truncated.write_bytes(data[:len(data) // 2] + data[-2000:])  # zip directory kept, data cut
    with pytest.raises(ValueError, match=r"^path: .*readable torch.save checkpoint"):
        load_frames2lora(truncated)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match=r"^path: .*state dict"):
        load_frames2lora(not_a_dict)


def test_compiled_prefix_is_stripped_and_safetensors_file_loads(state_dict, tmp_path):
    compiled = {"_orig_mod." + k: v for k, v in state_dict.items()}
    model = load_frames2lora(compiled)
    assert model.config.num_layers == 4
    assert torch.equal(model.head.weight, state_dict["head.weight"])
    path = tmp_path / "weights.safetensors"
    save_file(state_dict, str(path))
    assert load_frames2lora(path).config == model.config


def test_missing_or_misshapen_tensors_are_refused(state_dict):
    broken = dict(state_dict)
    del broken["bias_A.down_proj"]
    with pytest.raises(ValueError, match=r"^checkpoint: .*'bias_A\.down_proj'"):
        load_frames2lora(broken)
    broken = dict(state_dict)
    broken["layers.0.mlp.2.weight"] = torch.zeros(7, 32)
    with pytest.raises(ValueError, match=r"^checkpoint: .*layers\.0\.mlp\.2\.weight"):
        load_frames2lora(broken)
    broken = dict(state_dict)
    del broken["aggregator.perceiver.encoder.layers.1.input_context_layernorm.weight"]
    with pytest.raises(ValueError, match=r"^checkpoint: .*encoder layers"):
        load_frames2lora(broken)
    multi = dict(state_dict)
    multi["aggregator.perceiver.decoder.latents_q"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"M > 1"):
        load_frames2lora(multi)


def test_pickled_config_must_agree_with_shapes(state_dict):
    record = PickledRecord()
    record.latent_size = 64  # the tensors say 32
    with pytest.raises(ValueError, match=r"^checkpoint: .*latent_size"):
        load_frames2lora({**state_dict, "hypernet_config": record})


@pytest.mark.parametrize("expect,named", [
    (dict(num_layers=5), r"num_layers \(L\) is 4 in the checkpoint but 5 expected"),
    (dict(hidden_size=96), r"hidden_size \(H\) is 64"),
    (dict(intermediate_size=256), r"intermediate_size \(I\) is 128"),
    (dict(rank=16), r"rank \(r\) is 4 in the checkpoint but 16 expected"),
])
def test_checkpoint_for_another_base_model_or_rank_is_refused(expect, named):
    fields = dict(num_layers=4, hidden_size=64, intermediate_size=128, rank=4)
    fields.update(expect)
    made_for_another = r"^checkpoint: expected a checkpoint made for this base model, got .*"
    with pytest.raises(ValueError, match=made_for_another + named):
        load_frames2lora(OFFICIAL_CKPT, expect=Frames2LoRAConfig(**fields))


def test_expect_accepts_vlm_configs():
    assert load_frames2lora(OFFICIAL_CKPT, expect=smolvlm_config("tiny")).config.rank == 4
    with pytest.raises(ValueError, match=r"intermediate_size \(I\) is 128 .* 96 expected"):
        load_frames2lora(OFFICIAL_CKPT, expect=smolvlm_config("tiny", intermediate_size=96))
    with pytest.raises(ValueError, match=r"num_layers \(L\).*hidden_size \(H\)"):
        load_frames2lora(OFFICIAL_CKPT, expect=smolvlm_config("2.2B"))
    with pytest.raises(ValueError, match=r"^expect: "):
        load_frames2lora(OFFICIAL_CKPT, expect="2.2B")


def test_own_format_round_trip(tmp_path):
    model = small_model()
    directory = save_frames2lora(model, tmp_path / "hn")
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    loaded = load_frames2lora(directory)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    features = torch.randn(2, 2, 5, 24)
    with torch.no_grad():
        a, b = model.generate(features), loaded.generate(features)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and b.B.any()
    with pytest.raises(ValueError, match=r"rank \(r\) is 2 in the checkpoint but 3"):
        load_frames2lora(directory, expect=Frames2LoRAConfig(
            num_layers=2, hidden_size=24, intermediate_size=40, rank=3))


def test_own_format_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"^model: "):
        save_frames2lora(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^directory: "):
        save_frames2lora(small_model(), tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^path: .*config\.json"):
        load_frames2lora(tmp_path / "empty")
    directory = save_frames2lora(small_model(), tmp_path / "hn")
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write('{"format": "something-else", "version": 1}')
    with pytest.raises(ValueError, match=r"^path: .*format"):
        load_frames2lora(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"^path: .*valid JSON"):
        load_frames2lora(directory)


def test_config_validation_and_for_vlm():
    cfg = Frames2LoRAConfig.for_vlm(smolvlm_config("500M"), rank=8, latent_size=256)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.rank) == (32, 960, 2560, 8)
    assert cfg.latent_size == 256 and cfg.head_width == 3520 and cfg.lora_alpha == 2 * 8 ** 1.5
    assert Frames2LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"^rank: "):
        Frames2LoRAConfig(num_layers=2, hidden_size=4, intermediate_size=8, rank=0)
    with pytest.raises(ValueError, match=r"^num_heads: "):
        Frames2LoRAConfig(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=6)
    with pytest.raises(ValueError, match=r"^config: .*unknown keys \['bogus'\]"):
        Frames2LoRAConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"^vlm_config: "):
        Frames2LoRAConfig.for_vlm(object())
    with pytest.raises(ValueError, match=r"^config: "):
        Frames2LoRA({"num_layers": 2})
