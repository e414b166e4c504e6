"""examples/langchain_rag.ipynb runs from top to bottom (so it cannot rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[4] / "examples" / "langchain_rag.ipynb"


def test_notebook_runs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel is this interpreter's ipykernel; a failing cell (its asserts included) raises CellExecutionError
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    text = "\n".join(
        str(out.get("text", "")) for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "prompt tokens read from the cache" in text and "TTFT no cache" in text
