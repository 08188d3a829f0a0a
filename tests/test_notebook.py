"""train_notebook.ipynb: stored clean, and runs top to bottom in an empty folder, as a student's first run would."""
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "train_notebook.ipynb"


def test_notebook_is_stored_without_outputs():
    code = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports tinyvlm from the repo, runs in tmp_path
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    def printed(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")

    assert printed(nb.cells[-1]).strip() == sys.executable  # the kernel is this venv's python
    captions = printed(nb.cells[-2]).splitlines()  # the notebook's last cell: captions of 3 drawings
    assert len(captions) == 3 and all(c.startswith("a ") and " at the " in c for c in captions), captions
    assert list((tmp_path / "checkpoints" / "notebook" / "lora").glob("step_*"))
