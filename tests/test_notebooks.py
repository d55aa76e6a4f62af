"""Every notebook runs top to bottom in its small CPU mode, and its Colab badge and install cell point at the one
repository URL ([project.urls] Repository in pyproject.toml)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_speed", "03_perplexity", "04_quality_and_hardness", "05_sharding"]


def repository_url() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_badge_and_install_cell_use_the_project_url(path):
    cells = json.loads(path.read_text())["cells"]
    header = "".join(cells[0]["source"])
    url = repository_url()
    owner_repo = url.removeprefix("https://github.com/")
    assert header.startswith("# "), "the first cell is the title"
    assert f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}" in header
    install = "".join(cells[1]["source"])
    assert f'REPOSITORY = "{url}"' in install
    assert 'find_spec("hyperattn_jax") is None' in install, "installing must be a no-op when importable"
    assert any("# @param" in "".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    cells = json.loads(path.read_text())["cells"]
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient, ipykernel)")
    import nbformat

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the small CPU mode, whatever the machine has
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert os.path.isdir(path.parent)
