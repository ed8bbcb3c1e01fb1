"""The CPU notebooks run top to bottom."""

from __future__ import annotations

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "device_mesh.ipynb"])
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name == "quickstart.ipynb":
        assert "[0, 2, 4, 6, 8, 10, 12, 14]" in text and "7.0" in text
    else:
        assert "[0, 1, 2, 3, 4]" in text and "'dp': 1" in text
