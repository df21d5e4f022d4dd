"""Backend dispatch of `v2l_fast.ops`: availability, auto choice, $V2L_BACKEND, clear errors."""

from __future__ import annotations

import pytest
import torch

import v2l_fast.ops as ops
from v2l_fast import reference
from v2l_fast.ops import backends


def _sgmv_args():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(4, 8, generator=gen), torch.randn(2, 3, 8, generator=gen),
            torch.randn(2, 3, 5, generator=gen), torch.tensor([0, 1, 4]), torch.tensor([1, 0]))


def test_torch_is_always_available_and_only_real_backends_are_listed():
    names = ops.available_backends()
    assert "torch" in names
    assert set(names) <= set(backends.BACKENDS)
    for name in names:
        assert backends.runtime_missing(name) is None
    for op in ("lora_sgmv", "perceiver_attention", "compose_adapters", "swiglu_mlp"):
        assert "torch" in ops.available_backends(op)


def test_torch_backend_is_the_reference():
    args = _sgmv_args()
    torch.testing.assert_close(ops.lora_sgmv(*args, backend="torch"), reference.lora_sgmv(*args), rtol=0, atol=0)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        ops.lora_sgmv(*_sgmv_args(), backend="tpu")


def test_triton_on_cpu_tensors_without_the_interpreter_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        ops.lora_sgmv(*_sgmv_args(), backend="triton")


def test_missing_backend_of_an_op_is_named(monkeypatch):
    monkeypatch.setitem(backends._implementations, "test_only_op", {"torch": reference.compose_adapters})
    with pytest.raises(RuntimeError, match="test_only_op has no 'cuda' backend"):
        backends.resolve("test_only_op", "cuda", torch.device("cpu"))


def test_env_overrides_auto(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return reference.lora_sgmv(*args, **kwargs)

    monkeypatch.setitem(backends._implementations["lora_sgmv"], "torch", spy)
    monkeypatch.setenv("V2L_BACKEND", "torch")
    ops.lora_sgmv(*_sgmv_args())
    assert len(calls) == 1
    ops.lora_sgmv(*_sgmv_args(), backend="torch")  # an explicit backend is honoured too
    assert len(calls) == 2


def test_env_with_a_bad_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv("V2L_BACKEND", "fastest")
    with pytest.raises(ValueError, match="V2L_BACKEND"):
        ops.lora_sgmv(*_sgmv_args())


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    for op in ("lora_sgmv", "perceiver_attention", "compose_adapters", "swiglu_mlp"):
        chosen = backends.resolve(op, "auto", torch.device("cpu"))
        assert not chosen.__module__.startswith("v2l_fast.kernels"), (op, chosen.__module__)


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        backends.register("lora_sgmv", "metal", reference.lora_sgmv)


@pytest.mark.parametrize("backend", ["auto", *ops.available_backends("lora_sgmv")])
def test_a_non_tensor_input_is_named_by_every_backend(backend):
    x, A, B, indptr, adapters = _sgmv_args()
    with pytest.raises(ValueError, match="^x: expected a torch.Tensor"):
        ops.lora_sgmv(x.tolist(), A, B, indptr, adapters, backend=backend)
    with pytest.raises(ValueError, match="^A: expected a torch.Tensor"):
        ops.lora_sgmv(x.requires_grad_(), A.tolist(), B, indptr, adapters, backend=backend)
