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


def _kv_rag_imports() -> dict[str, set[str]]:
    """Module -> the kv_rag modules it imports (at the top, in functions, or for type checking)."""
    mods = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(path.relative_to(CORE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def test_no_import_cycle_among_core_modules() -> None:
    graph = _kv_rag_imports()
    assert graph["kv_rag.engine"] >= {"kv_rag.plan", "kv_rag.assemble", "kv_rag.serving"}  # the check sees imports
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_core_module_is_long() -> None:
    for path in CORE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{path.relative_to(CORE.parent)} has {lines} lines: split it by concern"
