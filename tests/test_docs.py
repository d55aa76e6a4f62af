"""Every code block of README.md and docs/*.md runs as written.

- ```python blocks are executed, each in a fresh namespace (a block must stand alone, as a reader would paste it).
  A block right after a `<!-- gpu-only -->` or `<!-- tpu-only -->` comment runs only where jax has that backend.
- ```bash blocks are commands we cannot run here (installs, minutes-long demos, GPU benchmarks): every script and
  module they name must exist, and every extra they install must be declared in pyproject.toml, so a renamed script
  or extra fails this test.
- ```text blocks (diagrams, sample output) are not code. A fenced block with no language fails: say which it is.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "text")
FENCE = re.compile(r"^```(\S*)\s*$")
PLATFORM_MARK = re.compile(r"<!--\s*(gpu|tpu)-only\s*-->")


def _blocks(path: Path):
    """(first line number, language, platform or None, source) of each fenced block of a markdown file."""
    lines = path.read_text().splitlines()
    start = language = None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if not match:
            continue
        if start is None:
            start, language = number, match.group(1)
        else:
            previous = lines[start - 2] if start >= 2 else ""
            platform = PLATFORM_MARK.search(previous)
            yield start, language, platform and platform.group(1), "\n".join(lines[start : number - 1])
            start = None


BLOCKS = [(path, *block) for path in DOCUMENTS for block in _blocks(path)]


def _id(block) -> str:
    path, line, language, *_ = block
    return f"{path.relative_to(ROOT)}:{line}:{language or 'none'}"


def test_blocks_were_found():
    assert any(language == "python" for _, _, language, _, _ in BLOCKS)
    assert any(path.name == "README.md" for path, *_ in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_code_block(block, monkeypatch):
    path, line, language, platform, source = block
    where = f"{path.relative_to(ROOT)}:{line}"
    assert language in LANGUAGES, f"{where}: fenced block with language {language!r}; use one of {LANGUAGES}"
    if language == "python":
        if platform and jax.default_backend() != platform:
            pytest.skip(f"{where} needs a {platform.upper()} (marked {platform}-only)")
        monkeypatch.chdir(ROOT)
        exec(compile(source, where, "exec"), {"__name__": "__docs__"})
    elif language == "bash":
        _check_commands(source, where)


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_commands(source: str, where: str) -> None:
    """The scripts, modules and extras a bash block names exist."""
    text = source.replace("\\\n", " ")
    for command in re.split(r"&&|\n|;", text):
        words = shlex.split(command, comments=True)
        if not words:
            continue
        if words[0] in ("python", "python3") and len(words) > 1:
            if words[1] == "-m":
                module = words[2]
                if module == "pip":
                    for extra in re.findall(r"\.\[([\w,]+)\]", command):
                        unknown = set(extra.split(",")) - _extras()
                        assert not unknown, f"{where}: extras {unknown} are not in pyproject.toml"
                elif module not in ("pytest",):
                    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
            else:
                assert (ROOT / words[1]).is_file(), f"{where}: no script {words[1]}"
