"""Every notebook runs top to bottom in its small CPU mode, and its Colab badge and install cell point at the one
repository URL ([project.urls] Repository in pyproject.toml)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from conftest import FAST_COMPILE_FLAG

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_speed", "03_perplexity", "04_quality_and_hardness", "05_sharding"]

# The test runs each notebook with these `# @param` values (a user's Colab form; the files keep their defaults): the
# smallest sizes at which every cell still takes the same path and every figure still draws. All stay above the
# configs' min_seq_len (256 in 01/04, max(64, tokens // 8) in 03), so the estimator, not exact attention, runs and the
# causal call still recurses.
CI_PARAMS = {
    "01_quickstart": {"SEQ_LEN": 512, "HEADS": 1},
    "02_speed": {"SIZES": [512], "REPEATS": 1},  # the timing loop and both causal modes, at one size
    "03_perplexity": {"LIVE_TOKENS": 128},  # 128 > min_seq_len 64: the replaced layers still run the estimator
    "04_quality_and_hardness": {"SEQ_LEN": 512, "HEADS": 1},
    # 05 keeps SEQ_LEN 1024, the least bucket_dispatch can sort on 8 devices (128 rows >= Columnsort's 98), and 8 kv
    # heads (all_to_all splits them over 8 devices); its memory table compiles for P=1 and P=8 only
    "05_sharding": {"MEMORY_DEVICES": [8]},
}


def with_params(notebook, params: dict) -> None:
    """Sets `NAME = value  # @param ...` lines to `params` in place (as Colab's form would); every name must exist."""
    for name, value in params.items():
        pattern = re.compile(rf"^{name} = .*?(  # @param\b.*)$", re.MULTILINE)
        hits = 0
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.source, n = pattern.subn(lambda m, line=f"{name} = {value!r}": line + m.group(1), cell.source)
                hits += n
        assert hits == 1, f"{name}: {hits} '# @param' lines"


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
    # Only tests/conftest.py's -O0 (a compile-time setting; 05 appends its device count), not a caller's device flags.
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAG)
    notebook = nbformat.read(path, as_version=4)
    with_params(notebook, CI_PARAMS[path.stem])
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert os.path.isdir(path.parent)
