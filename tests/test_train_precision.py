"""Training autocasts to bf16 only where the device multiplies bf16 in hardware (`v2l_fast.precision`):
CUDA, or a CPU with AMX. Either kind of CPU is simulated here by patching what the trainer asks, so
both paths run on every machine (a CPU without AMX runs bf16 slowly, but correctly)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_world import killed_after_step_3_then_resumed, read_metrics, save_tiny_vlm, tiny_config, write_train_and_val

from v2l_fast import precision
from v2l_fast.train import trainer as trainer_module
from v2l_fast.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_train_and_val(root)
    save_tiny_vlm(root / "vlm")
    return root


@pytest.mark.parametrize("amx,expected", [(True, "AMX"), (False, None)])
def test_a_cpu_multiplies_bf16_in_hardware_exactly_when_it_has_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.bf16_matmul_hardware("cpu") == expected
    assert precision.bf16_matmul_hardware(torch.device("cpu")) == expected


def test_why_bf16_is_not_in_hardware_is_said_per_device_type():
    assert "no AMX" in precision.bf16_unavailable_reason("cpu")
    assert precision.bf16_matmul_hardware("meta") is None
    assert "'meta'" in precision.bf16_unavailable_reason("meta")


def first_step(world, monkeypatch, name: str, *, hardware: str | None, bf16: bool) -> tuple[Trainer, dict]:
    """One training step of the tiny run on a CPU whose bf16 hardware is ``hardware``; the trainer
    (its VLM loaded from disk) and the step's metrics."""
    monkeypatch.setattr(trainer_module, "bf16_matmul_hardware", lambda device: hardware)
    config = tiny_config(world, vlm=str(world / "vlm"), out_dir=str(world / name), max_steps=1, eval_every=1000,
                         save_every=1000, bf16=bf16)
    trainer = Trainer(config)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer, next(r for r in read_metrics(config.out_dir) if "loss" in r)


def test_on_an_amx_cpu_the_step_runs_in_bf16_within_bf16_tolerance_of_fp32(world, monkeypatch):
    fp32_trainer, fp32 = first_step(world, monkeypatch, "fp32", hardware="AMX", bf16=False)
    bf16_trainer, bf16 = first_step(world, monkeypatch, "amx", hardware="AMX", bf16=True)
    assert not fp32_trainer.bf16 and fp32_trainer.vlm.model.dtype == torch.float32
    assert bf16_trainer.bf16 and bf16_trainer.vlm.model.dtype == torch.bfloat16, "the frozen VLM loads in bf16"
    for key in ("loss", "grad_norm"):
        error = abs(bf16[key] - fp32[key]) / abs(fp32[key])
        assert 1e-6 < error < 3e-2, (key, bf16[key], fp32[key])  # bf16 ran (not fp32), and ran right


def test_on_a_cpu_without_amx_bf16_true_trains_in_fp32_bit_for_bit(world, monkeypatch):
    _, fp32 = first_step(world, monkeypatch, "plain", hardware=None, bf16=False)
    trainer, asked = first_step(world, monkeypatch, "no-amx", hardware=None, bf16=True)
    assert not trainer.bf16 and trainer.vlm.model.dtype == torch.float32
    assert (asked["loss"], asked["grad_norm"]) == (fp32["loss"], fp32["grad_norm"])


def test_a_bf16_run_killed_mid_way_and_resumed_ends_bit_identical(world, monkeypatch):
    """bf16 is the default on an AMX CPU, so exact resume must hold there too."""
    monkeypatch.setattr(trainer_module, "bf16_matmul_hardware", lambda device: "AMX")
    whole = tiny_config(world, vlm=str(world / "vlm"), out_dir=str(world / "bf16-whole"), bf16=True)
    train(whole)
    killed = whole.replace(out_dir=str(world / "bf16-killed"))
    resumed = killed_after_step_3_then_resumed(monkeypatch, killed, None)
    assert resumed.resumed_from.endswith("step-00000002") and resumed.step == 6
    a, b = (load_file(f"{c.out_dir}/checkpoints/step-00000006/hypernet/model.safetensors") for c in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"


def backward_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that ``tensor``'s backward runs."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("enabled,flash,dtype", [(True, False, torch.bfloat16), (False, True, torch.float32)])
def test_a_bf16_training_forward_on_the_cpu_takes_the_math_attention_kernel(enabled, flash, dtype):
    """The CPU flash kernel's bf16 backward is the slow one (bench/NOTES.md): under
    `training_autocast` the decoder's attention records the math kernel's ops instead."""
    q = torch.randn(2, 3, 8, 16, requires_grad=True)
    with precision.training_autocast("cpu", enabled):
        assert torch.is_autocast_enabled("cpu") == enabled
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.dtype == dtype
    assert ("ScaledDotProductFlashAttentionForCpuBackward0" in backward_nodes(out)) == flash


def test_forward_only_blocks_keep_the_flash_kernel():
    """Evaluation and the KL teacher run without a backward: the flash forward is the faster there."""
    with torch.no_grad(), precision.training_autocast("cpu", True):
        assert torch.backends.cuda.flash_sdp_enabled()  # the flag the CPU's SDPA dispatch reads too
    with precision.training_autocast("cpu", True):
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled(), "restored after the block"
