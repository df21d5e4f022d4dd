"""The compiled extension: what it reports, and a clear message when it is missing."""

from __future__ import annotations

import importlib

import pytest
import torch

import v2l_fast
from v2l_fast import _ext


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

    def no_ext(name, *args):
        if name == "v2l_fast._C":
            raise ImportError("simulated: not built")
        return real_import(name, *args)

    monkeypatch.setattr(_ext.importlib, "import_module", no_ext)
    assert _ext.load_extension() is None
    info = v2l_fast.build_info()
    assert info["built"] is False and "pip install" in info["hint"]
    with pytest.raises(ImportError, match="not built"):
        _ext.require_extension()
    from v2l_fast.ops import backends
    assert "not built" in backends.runtime_missing("cpp")
