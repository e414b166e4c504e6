"""The public surface: __all__ is complete and importable; the core imports no framework."""

from __future__ import annotations

import ast
from pathlib import Path

import kv_rag
import kv_rag.store

CORE = Path(kv_rag.__file__).parent


def test_all_names_exist() -> None:
    for module in (kv_rag, kv_rag.store):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
        assert sorted(module.__all__) == list(module.__all__)


def test_public_names_have_docstrings() -> None:
    for name in kv_rag.__all__:
        obj = getattr(kv_rag, name)
        if callable(obj) and not name.endswith("Error"):
            assert obj.__doc__, name


def test_core_imports_no_framework() -> None:
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(("langchain", "llama_index")), f"{path}: imports {n}"
