"""Byte-level long-document corpus for `hyperattn_jax.models.byte_lm` (experiments/train_lm.py): Python source
files, split by file into train and held-out.

Python's standard library is on every machine and its larger modules are long real documents (10k-800k bytes), so it
needs no download. `copy_stdlib_corpus` freezes a selection into a folder (for the GPU run, which carries it along).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import zlib

import numpy as np

MIN_DOCUMENT_BYTES = 9000
HELD_OUT_EVERY = 10  # every 10th document (in a fixed hash order) is held out for evaluation


def stdlib_documents(min_bytes: int = MIN_DOCUMENT_BYTES) -> list[str]:
    """Paths of the standard library's .py files of at least `min_bytes`, tests and site-packages excluded, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, _, names in os.walk(root):
        parts = folder.split(os.sep)
        if "site-packages" in parts or "test" in parts or "tests" in parts or "idle_test" in parts:
            continue
        paths += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(p for p in paths if os.path.getsize(p) >= min_bytes)


def copy_stdlib_corpus(destination: str, min_bytes: int = MIN_DOCUMENT_BYTES) -> int:
    """Copy the long stdlib documents into `destination` (flat, names made unique); returns the number of files."""
    os.makedirs(destination, exist_ok=True)
    root = sysconfig.get_paths()["stdlib"]
    paths = stdlib_documents(min_bytes)
    for path in paths:
        shutil.copyfile(path, os.path.join(destination, os.path.relpath(path, root).replace(os.sep, "__")))
    return len(paths)


def is_held_out(name: str) -> bool:
    """Deterministic split by file name (crc32, stable across machines and Python hash seeds)."""
    return zlib.crc32(os.path.basename(name).encode()) % HELD_OUT_EVERY == 0


def load_corpus(source: str, min_bytes: int = MIN_DOCUMENT_BYTES):
    """Documents as uint8 arrays: `source` is a folder of text files or "stdlib". Returns (train, held_out) lists."""
    if source == "stdlib":
        paths = stdlib_documents(min_bytes)
    else:
        paths = sorted(os.path.join(source, n) for n in os.listdir(source))
        paths = [p for p in paths if os.path.isfile(p) and os.path.getsize(p) >= min_bytes]
    if not paths:
        raise ValueError(f"no documents of at least {min_bytes} bytes under {source!r}")
    train, held_out = [], []
    for path in paths:
        with open(path, "rb") as f:
            doc = np.frombuffer(f.read(), np.uint8)
        (held_out if is_held_out(path) else train).append(doc)
    return train, held_out


class WindowSampler:
    """Random training windows of `length + 1` bytes (inputs and next-byte targets) from documents long enough.

    Documents are drawn in proportion to their usable length, so every window position is equally likely. The
    sampler's state is its step: `batch(step)` is a pure function of (seed, step), so resumed runs see the same data
    and two runs with the same seed (exact vs HyperAttention) train on identical batches.
    """

    def __init__(self, documents, length: int, batch_size: int, seed: int):
        self.documents = [d for d in documents if len(d) > length]
        if not self.documents:
            raise ValueError(f"no training document is longer than the context {length=}")
        usable = np.array([len(d) - length for d in self.documents], np.float64)
        self.weights = usable / usable.sum()
        self.length, self.batch_size, self.seed = length, batch_size, seed

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.documents), self.batch_size, p=self.weights)
        rows = []
        for i in which:
            doc = self.documents[i]
            start = rng.integers(0, len(doc) - self.length)
            rows.append(doc[start : start + self.length + 1])
        return np.stack(rows).astype(np.int32)


def eval_windows(documents, length: int, max_windows: int) -> np.ndarray:
    """Fixed, non-overlapping held-out windows `[W, length + 1]`, taken round-robin over documents long enough."""
    per_doc = [[d[i : i + length + 1] for i in range(0, len(d) - length, length)] for d in documents]
    windows = []
    for depth in range(max((len(w) for w in per_doc), default=0)):
        windows += [w[depth] for w in per_doc if depth < len(w)]
    if not windows:
        raise ValueError(f"no held-out document is longer than the context {length=}")
    return np.stack(windows[:max_windows]).astype(np.int32)
