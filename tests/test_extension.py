"""The compiled extension: what it reports, and a clear message when it is missing."""

from __future__ import annotations

import importlib

import pytest
import torch

import v2l_fast
from v2l_fast import _ext
from v2l_fast.reference import lora_sgmv


def test_extension_is_built_and_reports_its_build():
    ext = pytest.importorskip("v2l_fast._C", reason="extension not built (pip install --no-build-isolation -e .)")
    info = ext.build_info()
    assert info["version"] == v2l_fast.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert bool(info["cuda_archs"]) == info["cuda"]
    assert v2l_fast.build_info() == {"built": True, **info}


def test_missing_extension_gives_a_clear_message(monkeypatch):
    real_import = importlib.import_module

    def no_ext(name, *args, **kwargs):
        if name == "v2l_fast._C":
            raise ImportError("simulated: not built")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_ext.importlib, "import_module", no_ext)
    assert _ext.load_extension() is None
    info = v2l_fast.build_info()
    assert info["built"] is False and "pip install" in info["hint"]
    with pytest.raises(ImportError, match="not built"):
        _ext.require_extension()
    from v2l_fast.ops import registry
    assert "not built" in registry.runtime_missing("cpp")


def _sgmv_args(**change):
    """A valid `lora_sgmv_cpu` call (4 tokens, 2 adapters of rank 3, I=8, O=5), with ``change`` applied."""
    args = {"x": torch.randn(4, 8), "A": torch.randn(2, 3, 8), "B": torch.randn(2, 3, 5),
            "seg_indptr": torch.tensor([0, 2, 4]), "seg_adapter": torch.tensor([0, 1]),
            "ranks": None, "scaling": 1.0, "base": None}
    return {**args, **change}


@pytest.mark.parametrize(("change", "pattern"), [
    ({"x": torch.randn(8)}, r"^x: expected a 2-D tensor \[T, I\], got tensor of shape \[8\]"),
    ({"x": torch.ones(4, 8, dtype=torch.int64)}, r"^x: expected a floating-point tensor .*dtype torch.int64"),
    ({"x": torch.randn(4, 8, device="meta")}, r"^x: expected a tensor on cpu, got .*device meta"),
    ({"A": torch.randn(2, 3, 7)}, r"^A: expected size 8 \(I, the width of x\) in dim 2, got .*shape \[2, 3, 7\]"),
    ({"A": torch.randn(2, 3, 8, device="meta")}, r"^A: expected a tensor on cpu \(the device of x\)"),
    ({"B": torch.randn(2, 4, 5)}, r"^B: expected size 3 \(R, the rank of A\) in dim 1"),
    ({"seg_indptr": torch.tensor([0.0, 2.0, 4.0])}, r"^seg_indptr: expected an int32 or int64 tensor"),
    ({"seg_adapter": torch.tensor([0])}, r"^seg_adapter: expected size 2 \(S, one adapter id per segment\)"),
    ({"ranks": torch.tensor([3, 3, 3])}, r"^ranks: expected size 2 \(n, one rank per adapter\)"),
    ({"base": torch.randn(4, 6)}, r"^base: expected size 5 \(O, the width of B\) in dim 1"),
], ids=["x-1d", "x-int", "x-meta", "A-width", "A-device", "B-rank", "indptr-float", "adapter-count", "ranks-count",
        "base-width"])
def test_cpu_kernel_rejects_bad_arguments_with_value_error(change, pattern):
    ext = pytest.importorskip("v2l_fast._C", reason="extension not built (pip install --no-build-isolation -e .)")
    with pytest.raises(ValueError, match=pattern):
        ext.lora_sgmv_cpu(**_sgmv_args(**change))


def test_cpu_kernel_accepts_the_valid_call_the_bad_ones_derive_from():
    ext = pytest.importorskip("v2l_fast._C", reason="extension not built (pip install --no-build-isolation -e .)")
    args = _sgmv_args()
    expected = lora_sgmv(args["x"], args["A"], args["B"], args["seg_indptr"], args["seg_adapter"])
    torch.testing.assert_close(ext.lora_sgmv_cpu(**args), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("on_cpu", "change", "pattern"), [
    ("x", {}, r"^x: expected a tensor on cuda, got .*device cpu"),
    ("A", {}, r"^A: expected a tensor on cuda:0 \(the device of x\)"),
    (None, {"x": "bf16-1d"}, r"^x: expected a 2-D tensor \[T, I\]"),
    (None, {"work_end": "short"}, r"^work_end: expected size 2 \(W, the work tiles of work_group\)"),
    (None, {"x": "int"}, r"^x: expected a floating-point tensor"),
], ids=["x-on-cpu", "A-on-cpu", "x-1d", "work-end-count", "x-int"])
def test_cuda_kernel_rejects_bad_arguments_with_value_error(on_cpu, change, pattern):
    ext = pytest.importorskip("v2l_fast._C", reason="extension not built (pip install --no-build-isolation -e .)")
    if not hasattr(ext, "lora_sgmv_cuda"):
        pytest.skip("v2l_fast._C was built without CUDA")
    dev = torch.device("cuda", 0)
    args = {"x": torch.randn(4, 8, device=dev), "A": torch.randn(2, 3, 8, device=dev),
            "B": torch.randn(2, 3, 5, device=dev), "ranks": None, "scaling": 1.0, "base": None,
            "sorted_tokens": torch.arange(4, dtype=torch.int32, device=dev),
            "work_group": torch.tensor([0, 1], dtype=torch.int32, device=dev),
            "work_start": torch.tensor([0, 2], dtype=torch.int32, device=dev),
            "work_end": torch.tensor([2, 4], dtype=torch.int32, device=dev)}
    if on_cpu:
        args[on_cpu] = args[on_cpu].cpu()
    replace = {"bf16-1d": torch.randn(8, device=dev, dtype=torch.bfloat16),
               "short": torch.tensor([2], dtype=torch.int32, device=dev),
               "int": torch.ones(4, 8, dtype=torch.int32, device=dev)}
    args.update({k: replace[v] for k, v in change.items()})
    with pytest.raises(ValueError, match=pattern):
        ext.lora_sgmv_cuda(**args)
