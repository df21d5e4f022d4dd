"""PEFT export/import on tiny random SmolVLM2 models: the exported directory, loaded by
``peft.PeftModel.from_pretrained``, gives the logits of `LoRAPatch` with the v2l_fast adapter (full,
rank-padded, re-compressed, and bias-folded onto a saved folded base); `import_peft` round trips;
bad input; the ``export-peft`` command."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from cli_run import run

import v2l_fast
from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.adapters import peft as v2l_peft
from v2l_fast.adapters.fold import CONFIG_KEY, folded_bias_of
from v2l_fast.adapters.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_folded_base,
    export_peft,
    import_peft,
    vllm_rank,
)
from v2l_fast.api import question_ids
from v2l_fast.hypernet import save_frames2lora
from v2l_fast.reference.compose_adapters import truncate_rank
from v2l_fast.testing import rel_error, tiny_hypernet
from v2l_fast.vlm import LoRAPatch, down_proj_targets, load_smolvlm
from v2l_fast.vlm.factory import random_smolvlm, tiny_vlm

peft = pytest.importorskip("peft")
# peft 0.21 still calls a transformers method that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SEED = 7
KEY = "base_model.model.model.text_model.layers.{}.mlp.down_proj.lora_{}.weight"


@pytest.fixture(scope="module")
def made():
    """A tiny hypernetwork and two videos' adapters from it (rank 4: R = 8, bias_rank 4, alpha 16)."""
    vlm = tiny_vlm(seed=SEED, longest_edge=64, max_frames=3)
    hypernet = tiny_hypernet(vlm.model)
    frames = [np.random.default_rng(s).integers(0, 256, (2, 24, 36, 3), dtype=np.uint8) for s in (1, 2)]
    adapters = v2l_fast.Session(vlm, hypernet).internalize(frames)
    assert adapters.rank == 8 and adapters.bias_rank == 4 and adapters.alpha == 16.0
    return hypernet, adapters


@pytest.fixture(scope="module")
def adapters(made):
    return made[1]


def _model():
    """The tiny SmolVLM2 the adapters were made for, built afresh (PEFT wraps the model it loads onto)."""
    return random_smolvlm("tiny", seed=SEED)


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 50, 60, 70]])


@torch.no_grad()
def _patched_logits(model, A, B, alpha) -> torch.Tensor:
    with LoRAPatch(down_proj_targets(model), A, B, alpha):
        return model(input_ids=IDS).logits


@torch.no_grad()
def _peft_logits(directory, model=None) -> torch.Tensor:
    peft_model = peft.PeftModel.from_pretrained(model if model is not None else _model(), directory)
    return peft_model(input_ids=IDS).logits


def _random_adapters(rank: int, seed: int = 0) -> Adapters:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(1, 4, rank, 128, generator=g) * 0.1
    B = torch.randn(1, 4, rank, 64, generator=g) * 0.02
    return Adapters(A, B, 2.0 * 4 ** 1.5, base_fingerprint(_model()), 0)


def _config(directory) -> dict:
    with open(os.path.join(directory, CONFIG_FILE)) as handle:
        return json.load(handle)


def _unnamed(fingerprint: dict) -> dict:
    return {k: v for k, v in fingerprint.items() if k != "name"}


def _tensors(directory):
    from safetensors import safe_open

    with safe_open(os.path.join(directory, WEIGHTS_FILE), framework="pt") as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}, f.metadata()


def test_export_loads_in_peft_and_matches_lora_patch(adapters, tmp_path):
    out = export_peft(adapters, tmp_path / "video1", index=1)
    config = _config(out)
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 8, "target_modules": ["down_proj"],
         "bias": "none"}
    tensors, metadata = _tensors(out)
    assert sorted(tensors) == sorted(KEY.format(i, f) for i in range(4) for f in "AB")
    assert tensors[KEY.format(2, "A")].shape == (8, 128) and tensors[KEY.format(2, "B")].shape == (64, 8)
    assert torch.equal(tensors[KEY.format(2, "A")], adapters.A[1, 2])
    assert torch.equal(tensors[KEY.format(2, "B")], 16.0 * adapters.B[1, 2].T)  # alpha folded into lora_B
    assert metadata["format"] == "pt" and metadata["v2l_fast.rank"] == "8"
    reference = _patched_logits(_model(), adapters.A[1:2], adapters.B[1:2], adapters.alpha)
    assert rel_error(_peft_logits(out), reference) < 1e-5
    assert rel_error(_model()(input_ids=IDS).logits.detach(), reference) > 1e-2  # the adapter matters
    # Greedy answers of the PEFT model equal v2l_fast's ask with the adapter.
    vlm = tiny_vlm(model=_model())
    prompt = "What happens in the video?"
    ids = torch.tensor([question_ids(vlm.tokenizer, prompt)])
    peft_model = peft.PeftModel.from_pretrained(_model(), out)
    with torch.no_grad():
        tokens = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, pad_token_id=0, eos_token_id=2)
    answer = vlm.tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer == v2l_fast.api.ask(adapters[1], [prompt], vlm=vlm, max_new_tokens=8)[0]
    assert answer != v2l_fast.api.ask(None, [prompt], vlm=vlm, max_new_tokens=8)[0]


def test_rank_is_padded_to_a_vllm_rank(tmp_path):
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 24, 300, 512)] == [1, 8, 8, 16, 32, 320, 512]
    small = _random_adapters(6)
    out = export_peft(small, tmp_path / "padded")
    tensors, metadata = _tensors(out)
    lora_A, lora_B = tensors[KEY.format(0, "A")], tensors[KEY.format(0, "B")]
    assert lora_A.shape == (8, 128) and lora_B.shape == (64, 8) and metadata["v2l_fast.rank"] == "6"
    assert not lora_A[6:].any() and not lora_B[:, 6:].any() and lora_A[:6].abs().min() > 0
    reference = _patched_logits(_model(), small.A, small.B, small.alpha)
    assert rel_error(_peft_logits(out), reference) < 1e-5
    back = import_peft(out)
    assert back.rank == 6 and torch.equal(back.A, small.A)


def test_max_rank_recompresses_to_the_best_approximation(tmp_path):
    wide = _random_adapters(24, seed=1)
    assert _config(export_peft(wide, tmp_path / "pad"))["r"] == 32
    out = export_peft(wide, tmp_path / "k16", max_rank=16)
    tensors, metadata = _tensors(out)
    assert tensors[KEY.format(0, "A")].shape == (16, 128) and metadata["v2l_fast.rank"] == "16"
    ref_A, ref_B = truncate_rank(wide.A[0], wide.B[0], 16)  # the reference truncation, [L, 16, ·]
    back = import_peft(out)
    torch.testing.assert_close(back.A[0], ref_A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.B[0], ref_B, rtol=1e-5, atol=1e-6)
    dense = wide.B[0].double().mT @ wide.A[0].double()  # [L, H, I]
    u, s, vh = torch.linalg.svd(dense)
    best = (u[..., :16] * s[..., None, :16]) @ vh[..., :16, :]
    assert rel_error(back.B[0].double().mT @ back.A[0].double(), best) < 1e-5
    reference = _patched_logits(_model(), ref_A[None], ref_B[None], wide.alpha)
    assert rel_error(_peft_logits(out), reference) < 1e-5
    full = _patched_logits(_model(), wide.A, wide.B, wide.alpha)
    assert rel_error(reference, full) > 1e-4  # rank 16 of 24 is not the adapter itself


def test_folded_export_and_folded_base_round_trip(adapters, tmp_path):
    vlm = tiny_vlm(model=_model())
    base_dir, adapter_dir = tmp_path / "folded_base", tmp_path / "video1"
    record = export_folded_base(vlm, *adapters.bias_block(), adapters.alpha, base_dir)
    export_peft(adapters, adapter_dir, index=1, folded=record, base_model_name_or_path=str(base_dir))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= \
        set(os.listdir(base_dir))
    with open(base_dir / "config.json") as handle:
        assert json.load(handle)[CONFIG_KEY]["digest"] == record.digest
    loaded = load_smolvlm(base_dir, dtype=torch.float32)
    assert folded_bias_of(loaded.model) == record
    assert _unnamed(base_fingerprint(loaded.model)) == _unnamed(record.folded_base)  # the name is the path now
    assert loaded.preprocessor == vlm.preprocessor
    config = _config(adapter_dir)
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(base_dir)  # 4 per-video rows, padded
    tensors, metadata = _tensors(adapter_dir)
    assert metadata["v2l_fast.rank"] == "4" and metadata["v2l_fast.folded_bias"] == record.digest
    assert torch.equal(tensors[KEY.format(0, "A")][:4], adapters.A[1, 0, :4])
    reference = _patched_logits(_model(), adapters.A[1:2], adapters.B[1:2], adapters.alpha)  # unfolded, full
    assert rel_error(_peft_logits(adapter_dir, loaded.model), reference) < 1e-5
    back = import_peft(adapter_dir, base=load_smolvlm(base_dir, dtype=torch.float32).model)
    assert back.base == record.folded_base and back.bias_rank == 0 and back.rank == 4
    assert torch.equal(back.A[0], adapters.A[1, :, :4])


def test_import_round_trip_and_foreign_peft_dirs(adapters, tmp_path):
    out = export_peft(adapters, tmp_path / "video0")
    back = import_peft(out, base=_model())
    assert back.alpha == 16.0 and back.bias_rank == 4 and back.base == adapters.base
    assert torch.equal(back.A, adapters.A[:1]) and torch.equal(back.B, adapters.B[:1])  # alpha 16: exact
    with pytest.raises(ValueError, match=r"^directory: expected adapters made for this base model.*down_proj_sha256"):
        import_peft(out, base=random_smolvlm("tiny", seed=SEED + 1))
    # A LoRA made by peft itself (lora_alpha / r = 2, random lora_B) comes back with alpha 2.
    model = _model()
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    wrapped.save_pretrained(tmp_path / "foreign")
    with torch.no_grad():
        theirs = wrapped(input_ids=IDS).logits
    with pytest.raises(ValueError, match=r"^base: expected the base model or its base_fingerprint \(the directory "
                       r"carries no v2l_fast fingerprint\), got None$"):
        import_peft(tmp_path / "foreign")
    foreign = import_peft(tmp_path / "foreign", base=base_fingerprint(_model()))
    assert foreign.alpha == 2.0 and foreign.rank == 4 and foreign.bias_rank == 0
    assert rel_error(_patched_logits(_model(), foreign.A, foreign.B, foreign.alpha), theirs) < 1e-5


def _write_dir(directory, config: dict, tensors: dict | None = None):
    from safetensors.torch import save_file

    os.makedirs(directory)
    with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
        json.dump(config, handle)
    save_file(tensors or {"x": torch.zeros(1)}, os.path.join(directory, WEIGHTS_FILE))
    return directory


def test_bad_input(adapters, tmp_path):
    with pytest.raises(ValueError, match=r"^index: expected an int in \[0, 2\) \(the adapters hold 2\), got 2$"):
        export_peft(adapters, tmp_path / "x", index=2)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match=r"^out_dir: expected a path that does not exist yet \(an export never "
                       r"overwrites\), got '.*exists'$"):
        export_peft(adapters, tmp_path / "exists")
    with pytest.raises(ValueError, match=r"^max_rank: expected one of vLLM's ranks \[1, 8, 16, 32, 64, 128, 256, "
                       r"320, 512\], got 24$"):
        export_peft(adapters, tmp_path / "x", max_rank=24)
    with pytest.raises(ValueError, match=r"^rank: expected at most 512 \(vLLM's largest max_lora_rank\); pass "
                       r"max_rank to re-compress, got 513$"):
        export_peft(_random_adapters(513), tmp_path / "x")
    # with max_rank it re-compresses instead: to rank min(512, I, H) = 64, all ΔW can have here
    assert _config(export_peft(_random_adapters(513), tmp_path / "k512", max_rank=512))["r"] == 64
    with pytest.raises(ValueError, match=r"^vlm: expected a v2l_fast.vlm.VLM \(model, tokenizer and preprocessor, "
                       r"e.g. from load_smolvlm\), got SmolVLMForConditionalGeneration$"):
        export_folded_base(_model(), *adapters.bias_block(), adapters.alpha, tmp_path / "x")
    with pytest.raises(ValueError, match=r"^directory: expected a PEFT LoRA directory \(adapter_config.json and "
                       r"adapter_model.safetensors\), got '.*exists'$"):
        import_peft(tmp_path / "exists")
    good = _config(export_peft(adapters, tmp_path / "good"))
    tensors, _ = _tensors(tmp_path / "good")
    cases = [
        (dict(good, peft_type="IA3"), tensors, r"expected a PEFT LoRA adapter \(peft_type 'LORA'\), got .* with "
         r"peft_type 'IA3'$"),
        (dict(good, target_modules=["q_proj", "v_proj"]), tensors, r"expected a LoRA of target_modules "
         r"\['down_proj'\] \(the Frames2LoRA targets\), got .* with target_modules \['q_proj', 'v_proj'\]$"),
        (dict(good, use_dora=True), tensors, r"expected a plain LoRA \(use_dora = False\), got .* with use_dora = "
         r"True$"),
        (dict(good, layers_to_transform=[0]), tensors, r"expected a plain LoRA \(no layers_to_transform\), got .* "
         r"with layers_to_transform = \[0\]$"),
        (good, {**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)},
         r"expected LoRA tensors of the text layers' mlp.down_proj only .*, got .* holding "
         r"'base_model.model.lm_head.lora_A.weight'$"),
        (good, {k: v for k, v in tensors.items() if ".3." not in k or "lora_A" in k},
         r"expected lora_A and lora_B for every text layer 0 … L−1, got .* with layers \[0, 1, 2, 3\] \(7 tensors\)$"),
        (dict(good, r=4), tensors, r"expected lora_A \[r, I\] = \[4, 128\] and lora_B \[H, r\] = \[64, 4\] in every "
         r"layer, got .* with layer 0: lora_A \[8, 128\], lora_B \[64, 8\]$"),
    ]
    for i, (config, weights, message) in enumerate(cases):
        with pytest.raises(ValueError, match=r"^directory: " + message):
            import_peft(_write_dir(tmp_path / f"bad{i}", config, weights))


def test_a_failed_export_leaves_nothing(adapters, tmp_path, monkeypatch):
    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(v2l_peft, "_write", crash)
    with pytest.raises(OSError, match="disk full"):
        export_peft(adapters, tmp_path / "video0")
    assert os.listdir(tmp_path) == []




def test_cli_export_peft(made, tmp_path, capsys):
    hypernet, adapters = made
    file = tmp_path / "adapters.safetensors"
    adapters.save(file)
    code, out, err = run(capsys, "export-peft", file, tmp_path / "plain", "--index", "1")
    assert code == 0, err
    assert "rank 8 = lora_alpha (8 adapter rows as is)" in out and "--max-lora-rank 8" in out
    plain = import_peft(tmp_path / "plain")
    assert torch.equal(plain.A, adapters.A[1:2]) and plain.bias_rank == 4
    vlm_dir = tmp_path / "vlm"
    vlm = tiny_vlm(model=_model())
    vlm.model.save_pretrained(vlm_dir)
    vlm.tokenizer.save_pretrained(vlm_dir)
    hypernet_dir = save_frames2lora(hypernet, tmp_path / "hypernet")
    code, out, err = run(capsys, "export-peft", file, tmp_path / "video1", "--index", "1", "--folded-base-out",
                         tmp_path / "folded", "--vlm", vlm_dir, "--hypernet", hypernet_dir, "--dtype", "fp32",
                         "--device", "cpu")
    assert code == 0, err
    assert "rank 8 = lora_alpha (4 adapter rows + 4 zero rows)" in out
    assert f"vllm serve {tmp_path / 'folded'} --enable-lora --max-lora-rank 8" in out
    folded = load_smolvlm(tmp_path / "folded", dtype=torch.float32)
    reference = _patched_logits(_model(), adapters.A[1:2], adapters.B[1:2], adapters.alpha)
    assert rel_error(_peft_logits(tmp_path / "video1", folded.model), reference) < 1e-5
    code, out, err = run(capsys, "export-peft", file, tmp_path / "video0", "--folded-base", tmp_path / "folded")
    assert code == 0, err
    reference = _patched_logits(_model(), adapters.A[:1], adapters.B[:1], adapters.alpha)
    folded_again = load_smolvlm(tmp_path / "folded", dtype=torch.float32).model  # PEFT wrapped the first one
    assert rel_error(_peft_logits(tmp_path / "video0", folded_again), reference) < 1e-5
    # bad input: one line on stderr, exit code 2, nothing written
    capsys.readouterr()  # the progress bars of the loads above
    code, _, err = run(capsys, "export-peft", file, tmp_path / "x", "--folded-base-out", tmp_path / "y")
    assert code == 2 and err.strip() == ("v2l-fast export-peft: error: --vlm: expected the base model (hub id or "
                                         "directory) to fold, with --folded-base-out, got none")
    code, _, err = run(capsys, "export-peft", file, tmp_path / "x", "--index", "5")
    assert code == 2 and err.strip() == ("v2l-fast export-peft: error: --index: expected an int in [0, 2) (the file "
                                         "holds 2 adapters), got 5")
    code, _, err = run(capsys, "export-peft", file, tmp_path / "x", "--max-rank", "24")
    assert code == 2 and "--max-rank: expected one of vLLM's ranks" in err
    code, _, err = run(capsys, "export-peft", file, tmp_path / "plain")
    assert code == 2 and "OUT_DIR: expected a path that does not exist yet" in err
    code, _, err = run(capsys, "export-peft", file, tmp_path / "x", "--folded-base", vlm_dir)
    assert code == 2 and err.strip() == ("v2l-fast export-peft: error: directory: expected a folded base model "
                                         "(config.json with 'v2l_fast_folded_bias', written by export_folded_base), "
                                         f"got {str(vlm_dir)!r}, whose config.json has none")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
