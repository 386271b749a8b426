"""Every notebook in colab/ runs top to bottom in smoke mode (RESNET_JAX_SMOKE=1), as in CI, and follows
the notebook conventions: an Open-in-Colab badge, the Colab clone-and-install cell, the smoke switch, and
no stored outputs."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "stream" and "smoke run" in o.text for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_has_a_badge_the_colab_setup_and_no_stored_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    intro = notebook.cells[0]
    assert intro.cell_type == "markdown"
    assert "colab-badge.svg" in intro.source and f"/colab/{path.name})" in intro.source
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert '"google.colab" in sys.modules' in code and '"pip", "install"' in code
    assert 'os.environ.get("RESNET_JAX_SMOKE") == "1"' in code
    stored = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert len(json.dumps(stored)) < 20_000, "clear the outputs before committing (or keep them small)"
