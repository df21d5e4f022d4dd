"""Imports go one way: kernels ← ops ← models ← stack ← cli (DESIGN.md), and nothing imports testing.

Every ``import`` in the package and the kernels, at module level or inside a function, is read
from the source (ast) and mapped to its layer; a module may import its own layer, the base
modules and the layers its own layer is allowed to see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer of a module, by longest matching prefix.
LAYERS = {
    "v2l_fast.errors": "base", "v2l_fast._ext": "base", "v2l_fast._C": "base",
    "v2l_fast.kernels": "kernels",
    "v2l_fast.reference": "reference",
    "v2l_fast.ops": "ops",
    "v2l_fast.hypernet": "models", "v2l_fast.vlm": "models", "v2l_fast.compat": "models",
    "v2l_fast.precision": "models",
    "v2l_fast.adapters": "stack", "v2l_fast.api": "stack", "v2l_fast.data": "stack", "v2l_fast.train": "stack",
    "v2l_fast.serve": "stack", "v2l_fast.long_video": "stack",
    "v2l_fast.cli": "cli", "v2l_fast.__main__": "cli",
    "v2l_fast.testing": "testing",
    "v2l_fast": "package",  # the lazy top-level facade (build_info, __getattr__)
}
ALLOWED = {
    "base": {"base"},
    "kernels": {"base", "kernels"},
    "reference": {"base", "reference"},
    "ops": {"base", "kernels", "reference", "ops"},
    "models": {"base", "ops", "models"},
    "stack": {"base", "ops", "models", "stack"},
    "cli": {"base", "ops", "models", "stack", "cli", "package"},
    "package": {"base", "package"},
}


def layer_of(module: str) -> str:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module}: no layer assigned in tests/test_layering.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["v2l_fast", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every v2l_fast module ``path`` imports, with the line (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found += [(f"{base}.{alias.name}" if base == "v2l_fast" else base, node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == "v2l_fast" or name.startswith("v2l_fast.")]


SOURCES = sorted([*ROOT.joinpath("v2l_fast").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")])


def test_the_sources_are_found():
    names = {module_name(p) for p in SOURCES}
    assert {"v2l_fast.kernels.lora_sgmv", "v2l_fast.ops.registry", "v2l_fast.vlm.lora_patch", "v2l_fast.api"} <= names


@pytest.mark.parametrize("path", [p for p in SOURCES if module_name(p) != "v2l_fast.testing"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path):
    layer = layer_of(module_name(path))
    bad = [f"line {line}: {name} ({layer_of(name)})" for name, line in imports_of(path)
           if layer_of(name) not in ALLOWED[layer]]
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports upward or sideways: {bad}"


def test_the_layer_check_catches_a_kernel_importing_the_reference(monkeypatch):
    fake = ROOT / "kernels" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from v2l_fast.reference import lora_sgmv\n")
    with pytest.raises(AssertionError, match="imports upward or sideways"):
        test_imports_point_down_the_layers(fake)
