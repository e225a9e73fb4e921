"""The example notebooks run top to bottom (TINY settings, a temporary run directory)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for all notebooks, so the model the first one trains is reused."""
    return tmp_path_factory.mktemp("notebooks")


def test_there_are_the_five_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, workdir):
    nb = nbformat.read(path, as_version=4)
    params = nb.cells[1]
    assert "parameters" in params.metadata.get("tags", []) and "TINY = True" in params.source
    params.source = params.source.replace('"runs/notebook-tiny"', repr(str(workdir / "run")))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert outputs  # every notebook shows something
