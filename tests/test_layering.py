"""Layers import only the layers above them; only Lightning code imports Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mono_quant"

# Each layer and the mono_quant layers it may import (itself included).
ALLOWED = {
    "core": {"core"},
    "nn": {"core", "nn"},
    "config": {"core", "config"},
    "transform": {"core", "nn", "config", "transform"},
    "evaluate": {"core", "nn", "config", "transform", "evaluate"},
    "io": {"core", "nn", "config", "transform", "evaluate", "io"},
}


def _layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files_of(layer: str) -> list[Path]:
    folder = PACKAGE / layer
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_layers_above(layer: str) -> None:
    for path in _files_of(layer):
        for module in _imported_modules(path):
            parts = module.split(".")
            if parts[0] in ("lightning", "pytorch_lightning"):
                pytest.fail(f"{path.relative_to(PACKAGE)} imports {module}")
            if parts[0] == "mono_quant" and len(parts) > 1:
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {module}"


def test_package_import_does_not_load_lightning() -> None:
    code = (
        "import sys, mono_quant\n"
        "roots = ('lightning', 'pytorch_lightning')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in roots]\n"
        "print(','.join(sorted(loaded)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"import mono_quant loads {result.stdout.strip()}"
