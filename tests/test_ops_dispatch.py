"""Backend dispatch of `v2l_fast.ops`: availability, auto choice, use_backend, $V2L_BACKEND, clear errors."""

from __future__ import annotations

import contextvars
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from packaging.version import Version

import v2l_fast.ops as ops
from v2l_fast import reference
from v2l_fast.kernels._common import interpreting
from v2l_fast.ops import registry

OPS = ("lora_sgmv", "perceiver_attention", "compose_adapters", "swiglu_mlp")


def _sgmv_args():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(4, 8, generator=gen), torch.randn(2, 3, 8, generator=gen),
            torch.randn(2, 3, 5, generator=gen), torch.tensor([0, 1, 4]), torch.tensor([1, 0]))


def test_torch_is_always_available_and_only_real_backends_are_listed():
    names = ops.available_backends()
    assert "torch" in names
    assert set(names) <= set(registry.BACKENDS)
    for name in names:
        assert registry.runtime_missing(name) is None
    for op in OPS:
        assert "torch" in ops.available_backends(op)


def test_torch_backend_on_a_ragged_batch_is_the_reference_loop():
    args = _sgmv_args()
    torch.testing.assert_close(ops.lora_sgmv(*args, backend="torch"), reference.lora_sgmv(*args), rtol=0, atol=0)


def test_importing_the_ops_imports_neither_triton_nor_the_compiler():
    code = "import sys, v2l_fast.ops; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        ops.lora_sgmv(*_sgmv_args(), backend="tpu")


def test_triton_on_cpu_tensors_without_the_interpreter_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        ops.lora_sgmv(*_sgmv_args(), backend="triton")


# How triton 3.6's interpreter fails with numpy 2.4.
NUMPY_24_DEFECT = TypeError("only 0-dimensional arrays can be converted to Python scalars")


class _FailingLaunch:
    """A kernel whose launch raises ``error``."""

    def __init__(self, error: Exception):
        self.error = error

    def __getitem__(self, grid):
        def launch(*args):
            raise self.error

        return launch


@pytest.fixture
def interpreter_probe():
    """`kernels/interpreter_probe.py`, its cached verdict cleared before and after; only where triton
    interprets (tests/conftest.py sets TRITON_INTERPRET before triton is imported, without a GPU)."""
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("TRITON_INTERPRET is not set: triton compiles for a GPU here")
    from v2l_fast.kernels import interpreter_probe

    interpreter_probe.interpreter_defect.cache_clear()
    yield interpreter_probe
    interpreter_probe.interpreter_defect.cache_clear()


def test_an_interpreter_that_cannot_loop_makes_triton_unavailable_on_cpu(interpreter_probe, monkeypatch):
    monkeypatch.setattr(interpreter_probe, "_count_kernel", _FailingLaunch(NUMPY_24_DEFECT))
    missing = registry.runtime_missing("triton", torch.device("cpu"))
    assert missing is not None and missing.startswith("triton ")
    assert missing.endswith("'s interpreter cannot run a loop over a kernel argument with numpy "
                            f"{np.__version__} (TypeError: only 0-dimensional arrays can be converted to Python "
                            "scalars); triton>=3.7 can")
    assert "triton" not in ops.available_backends("lora_sgmv")
    with pytest.raises(RuntimeError, match="^lora_sgmv: backend 'triton' cannot run: triton .*'s interpreter"):
        ops.lora_sgmv(*_sgmv_args(), backend="triton")
    assert ops.lora_sgmv.op.choose("auto", torch.device("cpu")) in ("torch", "cpp")  # auto is unaffected


def test_another_interpreter_failure_is_reported_as_it_is(interpreter_probe, monkeypatch):
    """(e.g. TRITON_INTERPRET set after triton was imported: the kernel is compiled for a GPU instead)"""
    monkeypatch.setattr(interpreter_probe, "_count_kernel", _FailingLaunch(RuntimeError("0 active drivers ([]).")))
    missing = registry.runtime_missing("triton", torch.device("cpu"))
    assert missing is not None and missing.startswith("triton ")
    assert missing.endswith(" could not interpret a one-loop kernel (RuntimeError: 0 active drivers ([]).)")


def test_the_interpreter_probe_passes_where_triton_interprets_loops(interpreter_probe):
    import triton

    if Version(triton.__version__) < Version("3.7"):
        pytest.skip(f"triton {triton.__version__}: its interpreter may fail the probe (kernels/interpreter_probe.py)")
    assert interpreter_probe.interpreter_defect() is None
    assert registry.runtime_missing("triton", torch.device("cpu")) is None


def test_missing_backend_of_an_op_is_named():
    with pytest.raises(RuntimeError, match="compose_adapters has no 'cuda' backend"):
        registry.resolve("compose_adapters", "cuda", torch.device("cpu"))


def test_unknown_op_is_a_value_error():
    with pytest.raises(ValueError, match="^op: expected one of"):
        registry.resolve("lora_bgmv", "auto", torch.device("cpu"))


@pytest.fixture
def torch_spy(monkeypatch):
    """Replace lora_sgmv's torch backend by a spy that records its calls."""
    calls = []
    real = ops.lora_sgmv.op.backends["torch"]

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setitem(ops.lora_sgmv.op.backends, "torch", spy)
    return calls


def test_env_overrides_auto(monkeypatch, torch_spy):
    monkeypatch.setenv("V2L_BACKEND", "torch")
    ops.lora_sgmv(*_sgmv_args())
    assert len(torch_spy) == 1
    ops.lora_sgmv(*_sgmv_args(), backend="torch")  # an explicit backend is honoured too
    assert len(torch_spy) == 2


def test_use_backend_scopes_the_choice_and_restores_it(monkeypatch, torch_spy):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    assert ops.current_backend() == "auto"
    with ops.use_backend("torch"):
        assert ops.current_backend() == "torch"
        assert ops.resolve("lora_sgmv", "auto", torch.device("cpu")).backend == "torch"
        ops.lora_sgmv(*_sgmv_args())
        with ops.use_backend("auto"):
            assert ops.current_backend() == "auto"
        assert ops.current_backend() == "torch"
    assert ops.current_backend() == "auto"
    assert len(torch_spy) == 1


def test_use_backend_wins_over_the_environment_and_an_explicit_backend_over_both(monkeypatch):
    monkeypatch.setenv("V2L_BACKEND", "cpp")
    with ops.use_backend("torch"):
        assert ops.resolve("lora_sgmv", "auto", torch.device("cpu")).backend == "torch"
        assert ops.resolve("lora_sgmv", "torch", torch.device("cpu")).backend == "torch"


def test_use_backend_is_per_context_not_process_global(monkeypatch):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    with ops.use_backend("torch"):
        other = contextvars.Context().run(ops.current_backend)  # a fresh context: another thread or task
    assert other == "auto"


def test_use_backend_with_a_bad_name_is_a_value_error():
    with pytest.raises(ValueError, match="^backend: expected 'auto' or one of"), ops.use_backend("fastest"):
        pass


def test_a_scoped_backend_an_op_lacks_leaves_that_op_on_auto(monkeypatch):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    with ops.use_backend("cpp"):
        assert ops.resolve("compose_adapters", "auto", torch.device("cpu")).backend == "torch"


def test_env_with_a_bad_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv("V2L_BACKEND", "fastest")
    with pytest.raises(ValueError, match="V2L_BACKEND"):
        ops.lora_sgmv(*_sgmv_args())


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    for op in OPS:
        chosen = registry.resolve(op, "auto", torch.device("cpu"))
        assert chosen.backend != "triton", op
        assert chosen.fn.__module__ != f"v2l_fast.kernels.{op}", (op, chosen.fn.__module__)  # the Triton module


def test_resolve_names_the_backend_auto_picked(monkeypatch):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    expected = "cpp" if "cpp" in ops.available_backends("lora_sgmv") else "torch"
    assert registry.resolve("lora_sgmv", "auto", torch.zeros(1)).backend == expected


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.lora_sgmv.op.register("metal", reference.lora_sgmv)


@pytest.mark.parametrize("op", OPS)
def test_public_signature_is_the_reference_plus_dispatch_arguments(op):
    public, ref = inspect.signature(getattr(ops, op)), inspect.signature(getattr(reference, op))
    names = list(public.parameters)
    assert names[:len(ref.parameters)] == list(ref.parameters)
    assert names[-2:] == ["check", "backend"]
    assert getattr(ops, op).__doc__.startswith(getattr(reference, op).__doc__)


@pytest.mark.parametrize("op", ["lora_sgmv", "perceiver_attention", "swiglu_mlp"])
def test_kernel_ops_are_registered_with_torch_library(op):
    schema = str(getattr(torch.ops.v2l_fast, op).default._schema)
    assert schema.startswith(f"v2l_fast::{op}(") and schema.endswith("str backend) -> Tensor")
    assert getattr(torch.ops.v2l_fast, f"{op}_backward").default is not None


@pytest.mark.parametrize("backend", ["auto", *ops.available_backends("lora_sgmv")])
def test_a_non_tensor_input_is_named_by_every_backend(backend):
    x, A, B, indptr, adapters = _sgmv_args()
    with pytest.raises(ValueError, match="^x: expected a torch.Tensor"):
        ops.lora_sgmv(x.tolist(), A, B, indptr, adapters, backend=backend)
    with pytest.raises(ValueError, match="^A: expected a torch.Tensor"):
        ops.lora_sgmv(x.requires_grad_(), A.tolist(), B, indptr, adapters, backend=backend)
