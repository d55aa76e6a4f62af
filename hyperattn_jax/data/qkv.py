"""Real attention inputs: post-RoPE q, k, v of SmolLM2-135M layers on a document, cached on disk.

The first call downloads what it needs (the GGUF file, the texts), runs the model up to the deepest requested layer
(exact attention, float32) and writes one .npz per layer; later calls read the .npz files (well under a second).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hyperattn_jax.data import corpus
from hyperattn_jax.data.fetch import cache_dir


@dataclasses.dataclass(frozen=True)
class LayerQKV:
    """One layer's attention inputs, float32 numpy in jax.nn's layout: q `[1, T, N, H]`, k and v `[1, T, K, H]`.

    q and k are after RoPE, k and v before GQA repetition (query head h reads kv head h // (N // K)); the model's
    attention is causal with softmax scale `scale` = 1/sqrt(H):
    `out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)`.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    document: str
    layer: int

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


def _cache_path(root: Path, model: str, document: str, n_tokens: int, layer: int) -> Path:
    return root / "qkv" / model / document.replace("/", "__") / f"T{n_tokens}_L{layer}.npz"


def capture_qkv(
    document: str,
    layers: int | Iterable[int],
    n_tokens: int = 8192,
    *,
    gguf_path: str | Path | None = None,
    directory: str | Path | None = None,
    progress: bool = True,
) -> dict[int, LayerQKV]:
    """{layer: LayerQKV} of SmolLM2-135M reading the first n_tokens tokens of `document` (a name from
    `hyperattn_jax.data.documents()`, e.g. "shakespeare/hamlet"). Layers are 0-based (0..29).

    Cached as `<cache>/qkv/<model>/<document>/T<n_tokens>_L<layer>.npz`; only missing layers are computed, and
    the model runs (and is read) only up to the deepest of them. gguf_path: the model file (default: the
    downloaded SmolLM2-135M-Instruct.Q4_1.gguf). directory: the cache folder (default `cache_dir()`).
    On 2 CPU cores an 8192-token capture costs about 3-5 s per layer up to the deepest one, plus ~10 s to read
    the model.

    >>> from hyperattn_jax.data import capture_qkv
    >>> hamlet = capture_qkv("shakespeare/hamlet", layers=[2], n_tokens=8192)[2]   # doctest: +SKIP
    >>> hamlet.q.shape, hamlet.k.shape, hamlet.scale                             # doctest: +SKIP
    ((1, 8192, 9, 64), (1, 8192, 3, 64), 0.125)
    """
    from hyperattn_jax.models import smollm2

    layers = sorted({layers} if isinstance(layers, int) else set(layers))
    if not layers or n_tokens < 1:
        raise ValueError(f"need at least one layer and one token, got {layers=}, {n_tokens=}")
    root = Path(directory or cache_dir())
    gguf_path = Path(gguf_path) if gguf_path is not None else None
    if gguf_path is None:
        from hyperattn_jax.data.fetch import smollm2_gguf

        gguf_path = smollm2_gguf(root)
    model = gguf_path.stem
    paths = {layer: _cache_path(root, model, document, n_tokens, layer) for layer in layers}
    missing = [layer for layer, path in paths.items() if not path.is_file()]
    if missing:
        config = smollm2.read_config(gguf_path)
        if missing[-1] >= config.n_layers:
            raise ValueError(f"{layers=}: {model} has layers 0..{config.n_layers - 1}")
        tokenizer = smollm2.load_tokenizer(gguf_path)
        ids = corpus.tokens(document, n_tokens, tokenizer, directory=root)
        params, config = smollm2.load_params(gguf_path, num_layers=missing[-1] + 1)
        with tqdm(total=missing[-1] + 1, desc=f"SmolLM2 layers on {document}", disable=not progress) as bar:
            captured = smollm2.capture(params, ids[None], config=config, layers=missing, progress=bar.update)
        for layer, tensors in captured.items():
            paths[layer].parent.mkdir(parents=True, exist_ok=True)
            partial = paths[layer].with_name(paths[layer].stem + ".partial.npz")
            np.savez(partial, **{name: np.asarray(t, np.float32) for name, t in zip("qkv", tensors, strict=True)})
            partial.replace(paths[layer])
    result = {}
    for layer, path in paths.items():
        with np.load(path) as stored:
            result[layer] = LayerQKV(stored["q"], stored["k"], stored["v"], document=document, layer=layer)
    return result
