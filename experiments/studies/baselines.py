"""Other approximate attentions in plain JAX, for comparison with HyperAttention at matched keys per query.

Every function works on ONE head: q `[T, H]` already multiplied by the softmax scale, k and v `[S, H]`, and returns
(out `[T, H]`, lse `[T]`), lse the natural-log normaliser of the scores it used (so that the paper's causal recursion,
`causal_recursion`, can merge any of them like HyperAttention's own off-diagonal quarters). `budget` is the number of
keys each query attends (Performer: random features, the same O(budget * H) work per query).

- `exact`: the reference; `uniform`: every key weighted equally (the floor an estimator must beat).
- `top_k_oracle`: each query's `budget` largest scores, exactly (the upper bound of any method that attends `budget`
  keys with softmax weights; it needs every score, so it is no algorithm).
- `reformer`: Reformer-style LSH bucket attention (Kitaev et al. 2020): random-rotation argmax buckets, queries and keys
  sorted by (bucket, position) and cut into chunks, a query chunk attends its key chunk and the previous one, 2 hash
  rounds, a key seen in both rounds counted once (its score lowered by log of its count, as Reformer does).
- `performer`: Performer FAVOR+ (Choromanski et al. 2021): positive orthogonal random features, unbiased for e^{q.k}.
- `bigbird`: BigBird-style (Zaheer et al. 2020) blocks of budget/8 keys: 3 sliding blocks (the query block's own and its
  neighbours), 2 global blocks (the first keys) and 3 random blocks per query block, softmax over their union.
- `sampling_only`: HyperAttention's uniform residual alone (`budget` keys per head, with replacement).
- `random_blocks`: HyperAttention's estimator with the hash replaced by a random permutation (blocks of budget/2 random
  keys plus budget/2 uniform samples weighted S/m, own-block samples excluded): what the hashing buys.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

QUERY_CHUNK = 512


def _softmax_rows(scores, values):
    """out, lse of softmax(scores) @ values; scores [..., n] (-inf allowed), values [..., n, H]."""
    lse = jax.nn.logsumexp(scores, axis=-1)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    return jnp.matmul(p[..., None, :], values)[..., 0, :], lse


def _chunked(fn, q, *args):
    """fn(q_chunk, start, *args) -> (out, lse) over query chunks of QUERY_CHUNK rows (memory O(chunk * S))."""
    t = q.shape[0]
    chunk = min(QUERY_CHUNK, t)
    if t % chunk:
        raise ValueError(f"query length {t} must be a multiple of {chunk}")
    starts = jnp.arange(0, t, chunk)
    out, lse = jax.lax.map(lambda s: fn(jax.lax.dynamic_slice_in_dim(q, s, chunk), s, *args), starts)
    return out.reshape(t, -1), lse.reshape(t)


def exact(q, k, v, *, causal: bool = False):
    def attend(q_chunk, start, k, v):
        s = q_chunk @ k.T
        if causal:
            pos = start + jnp.arange(q_chunk.shape[0])
            s = jnp.where(jnp.arange(k.shape[0])[None] <= pos[:, None], s, -jnp.inf)
        return _softmax_rows(s, v)

    return _chunked(attend, q, k, v)


def uniform(q, k, v, *, causal: bool = False):
    """Uniform attention: the mean of the visible values (causal: the running mean); lse = log(#keys)."""
    t, s = q.shape[0], k.shape[0]
    if causal:
        count = jnp.arange(1, t + 1, dtype=jnp.float32)
        return jnp.cumsum(v, axis=0) / count[:, None], jnp.log(count)
    return jnp.broadcast_to(v.mean(0), (t, v.shape[1])), jnp.full((t,), math.log(s), jnp.float32)


def top_k_oracle(q, k, v, *, budget: int):
    """Exact softmax over each query's `budget` largest scores."""

    def attend(q_chunk, start, k, v):
        values, index = jax.lax.top_k(q_chunk @ k.T, budget)
        return _softmax_rows(values, v[index])

    return _chunked(attend, q, k, v)


def _sorted_chunks(x, rotation, chunk: int):
    """Reformer's angular LSH: bucket = argmax([xR, -xR]); order by (bucket, position); returns (order, chunk id)."""
    projected = x @ rotation
    bucket = jnp.argmax(jnp.concatenate([projected, -projected], axis=-1), axis=-1)
    n = x.shape[0]
    order = jnp.argsort(bucket * n + jnp.arange(n), stable=True)
    chunk_of = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) // chunk)
    return order, chunk_of


def reformer(q, k, v, *, key, budget: int, rounds: int = 2):
    """Reformer-style LSH bucket attention: `rounds` hashes, each query attends 2 key chunks per round (budget keys)."""
    t, s, h = q.shape[0], k.shape[0], q.shape[1]
    chunk = budget // (2 * rounds)
    num_chunks = s // chunk
    if t != s or s % chunk or num_chunks < 3:
        raise ValueError(f"reformer needs T == S, a multiple of chunk={chunk} and >= 3 chunks: T={t}, S={s}")
    num_buckets = max(2, num_chunks)
    rotations = jax.random.normal(key, (rounds, h, num_buckets // 2))
    hashed = [(_sorted_chunks(q, r, chunk), _sorted_chunks(k, r, chunk)) for r in rotations]
    out, lse = None, None
    for (q_order, _), (k_order, _) in hashed:
        k_sorted = k[k_order].reshape(num_chunks, chunk, h)
        v_sorted = v[k_order].reshape(num_chunks, chunk, h)
        key_index = k_order.reshape(num_chunks, chunk)
        previous = jnp.roll(jnp.arange(num_chunks), 1)  # chunk 0 looks back at the last one, as in Reformer
        attended = jnp.concatenate([key_index, key_index[previous]], axis=1)  # [num_chunks, 2 * chunk]
        kk = jnp.concatenate([k_sorted, k_sorted[previous]], axis=1)
        vv = jnp.concatenate([v_sorted, v_sorted[previous]], axis=1)
        q_sorted = q[q_order].reshape(num_chunks, chunk, h)
        scores = jnp.einsum("cqh,ckh->cqk", q_sorted, kk)
        # How many rounds let this (query, key) pair meet: lowering its score by log(count) in every round counts
        # the pair once in the lse merge of the rounds below (Reformer's duplicate correction).
        count = jnp.zeros(scores.shape, jnp.float32)
        query_index = q_order.reshape(num_chunks, chunk)
        for (_, q_chunk_of), (_, k_chunk_of) in hashed:
            qc = q_chunk_of[query_index][:, :, None]
            kc = k_chunk_of[attended][:, None, :]
            count += ((kc == qc) | (kc == (qc - 1) % num_chunks)).astype(jnp.float32)
        out_round, lse_round = _softmax_rows(scores - jnp.log(count), vv[:, None])
        inverse = jnp.zeros(t, jnp.int32).at[q_order].set(jnp.arange(t, dtype=jnp.int32))  # back to query order
        out_round, lse_round = out_round.reshape(t, h)[inverse], lse_round.reshape(t)[inverse]
        out, lse = (out_round, lse_round) if out is None else _merge(out, lse, out_round, lse_round)
    return out, lse


def _orthogonal_features(key, num_features: int, h: int):
    """Rows of independent orthogonal blocks scaled by chi(h) norms, as Performer's FAVOR+ draws them."""
    blocks = []
    keys = jax.random.split(key, num_features // h + 2)
    for i in range(math.ceil(num_features / h)):
        q_mat, _ = jnp.linalg.qr(jax.random.normal(keys[i], (h, h)))
        blocks.append(q_mat.T)
    norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_features, h)), axis=1)
    return jnp.concatenate(blocks, axis=0)[:num_features] * norms[:, None]


def performer(q, k, v, *, key, budget: int):
    """FAVOR+ positive random features (`budget` of them): phi(x) = exp(Wx - |x|^2/2) / sqrt(m), unbiased for e^{q.k}.

    Numerically stabilised by subtracting the largest key exponent (a constant that cancels in out; added back to lse).
    """
    w = _orthogonal_features(key, budget, q.shape[1])

    def log_features(x):
        return x @ w.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True) - 0.5 * math.log(budget)

    log_k = log_features(k)
    k_shift = jnp.max(log_k)
    phi_k = jnp.exp(log_k - k_shift)  # [S, m]
    kv = phi_k.T @ v  # [m, H]
    k_sum = phi_k.sum(0)  # [m]

    def attend(q_chunk, start, kv, k_sum):
        log_q = log_features(q_chunk)
        q_shift = jnp.max(log_q, axis=-1, keepdims=True)
        phi_q = jnp.exp(log_q - q_shift)
        den = phi_q @ k_sum
        return (phi_q @ kv) / den[:, None], jnp.log(den) + q_shift[:, 0] + k_shift

    return _chunked(attend, q, kv, k_sum)


def bigbird(q, k, v, *, key, budget: int):
    """BigBird-style block-sparse attention: per query block 3 sliding + 2 global + 3 random key blocks of budget/8."""
    t, s, h = q.shape[0], k.shape[0], q.shape[1]
    block = budget // 8
    num_q_blocks, num_k_blocks = t // block, s // block
    if t % block or s % block or num_k_blocks < 8:
        raise ValueError(f"bigbird needs T, S multiples of block={block} and >= 8 key blocks: T={t}, S={s}")
    q_block = jnp.arange(num_q_blocks)
    # Sliding blocks at the query block's relative position among the key blocks (T and S may differ).
    centre = q_block * num_k_blocks // num_q_blocks
    sliding = jnp.clip(centre[:, None] + jnp.arange(-1, 2)[None], 0, num_k_blocks - 1)
    global_blocks = jnp.broadcast_to(jnp.arange(2), (num_q_blocks, 2))
    random_blocks = jax.vmap(lambda kk: jax.random.choice(kk, num_k_blocks, (3,), replace=False))(
        jax.random.split(key, num_q_blocks)
    )
    chosen = jnp.concatenate([sliding, global_blocks, random_blocks], axis=1)  # [num_q_blocks, 8]
    # A block chosen twice (a global block next to the query, a random one that is also sliding) counts once.
    repeated = jnp.any(jnp.tril(chosen[:, :, None] == chosen[:, None, :], k=-1), axis=2)  # [num_q_blocks, 8]
    k_blocks = k.reshape(num_k_blocks, block, h)[chosen].reshape(num_q_blocks, 8 * block, h)
    v_blocks = v.reshape(num_k_blocks, block, h)[chosen].reshape(num_q_blocks, 8 * block, h)
    scores = jnp.einsum("bqh,bkh->bqk", q.reshape(num_q_blocks, block, h), k_blocks)
    scores = jnp.where(jnp.repeat(repeated, block, axis=1)[:, None, :], -jnp.inf, scores)
    out, lse = _softmax_rows(scores, v_blocks[:, None])
    return out.reshape(t, h), lse.reshape(t)


def _uniform_samples(key, s: int, m: int):
    return jax.random.randint(key, (m,), 0, s)


def sampling_only(q, k, v, *, key, budget: int):
    """Softmax over `budget` uniform samples (with replacement) shared by every query; lse = log(S/m) + sample lse."""
    index = _uniform_samples(key, k.shape[0], budget)
    out, lse = _softmax_rows(q @ k[index].T, v[index])
    return out, lse + math.log(k.shape[0] / budget)


def random_blocks(q, k, v, *, key, budget: int):
    """HyperAttention's block-diagonal + uniform residual estimator with a random permutation instead of the hash."""
    t, s, h = q.shape[0], k.shape[0], q.shape[1]
    block, m = budget // 2, budget // 2
    num_blocks = s // block
    if s % block or t % num_blocks:
        raise ValueError(f"random_blocks needs S a multiple of block={block} and T of {num_blocks} blocks: T={t}")
    q_key, k_key, sample_key = jax.random.split(key, 3)
    q_order, k_order = jax.random.permutation(q_key, t), jax.random.permutation(k_key, s)
    q_rows = t // num_blocks
    q_blocks = q[q_order].reshape(num_blocks, q_rows, h)
    k_blocks, v_blocks = k[k_order].reshape(num_blocks, block, h), v[k_order].reshape(num_blocks, block, h)
    block_scores = jnp.einsum("bqh,bkh->bqk", q_blocks, k_blocks)
    index = _uniform_samples(sample_key, s, m)
    key_block = jnp.zeros(s, jnp.int32).at[k_order].set(jnp.arange(s, dtype=jnp.int32) // block)
    own = key_block[index][None, :] == jnp.arange(num_blocks)[:, None]  # [num_blocks, m]
    sample_scores = jnp.einsum("bqh,mh->bqm", q_blocks, k[index]) + math.log(s / m)
    sample_scores = jnp.where(own[:, None, :], -jnp.inf, sample_scores)
    scores = jnp.concatenate([block_scores, sample_scores], axis=-1)
    values = jnp.concatenate([v_blocks, jnp.broadcast_to(v[index], (num_blocks, m, h))], axis=1)
    out, lse = _softmax_rows(scores, values[:, None])
    inverse = jnp.zeros(t, jnp.int32).at[q_order].set(jnp.arange(t, dtype=jnp.int32))
    return out.reshape(t, h)[inverse], lse.reshape(t)[inverse]


def _merge(out1, lse1, out2, lse2):
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.exp(lse1 - safe)[:, None] * out1 + jnp.exp(lse2 - safe)[:, None] * out2, lse


def causal_recursion(estimator, q, k, v, *, key, min_seq_len: int):
    """The paper's causal recursion (Alg. 4) around any non-causal `estimator(q, k, v, key=)`: exact causal attention
    at or below `min_seq_len` keys; above, the two diagonal halves recurse and the lower-left quarter (second-half
    queries, first-half keys) is estimated and merged by lse. The same structure HyperAttention's causal calls use."""
    t = q.shape[0]
    if t <= min_seq_len:
        return exact(q, k, v, causal=True)
    half = t // 2
    upper_key, lower_key, quarter_key = jax.random.split(key, 3)
    out1, lse1 = causal_recursion(estimator, q[:half], k[:half], v[:half], key=upper_key, min_seq_len=min_seq_len)
    out2, lse2 = causal_recursion(estimator, q[half:], k[half:], v[half:], key=lower_key, min_seq_len=min_seq_len)
    out3, lse3 = estimator(q[half:], k[:half], v[:half], key=quarter_key)
    out2, lse2 = _merge(out2, lse2, out3, lse3)
    return jnp.concatenate([out1, out2]), jnp.concatenate([lse1, lse2])


METHODS = {
    "top_k_oracle": top_k_oracle,
    "reformer": reformer,
    "performer": performer,
    "bigbird": bigbird,
    "sampling_only": sampling_only,
    "random_blocks": random_blocks,
}


def estimator(method: str, budget: int):
    """`METHODS[method]` as `f(q, k, v, key=)`; exact attention where `budget` covers every key (a small quarter)."""
    fn = METHODS[method]

    def estimate(q, k, v, *, key):
        if budget >= k.shape[0]:
            return exact(q, k, v)
        if method == "top_k_oracle":
            return fn(q, k, v, budget=budget)
        return fn(q, k, v, key=key, budget=budget)

    return estimate


@functools.partial(jax.jit, static_argnames=("method", "budget", "causal", "min_seq_len"))
def attend_heads(q, k, v, key, *, method: str, budget: int, causal: bool, min_seq_len: int):
    """`method` on every head: q `[N, T, H]` (scaled), k, v `[N, S, H]` (kv heads already repeated) -> out `[N, T, H]`.

    Causal: inside `causal_recursion` (the oracle too: its top-k per off-diagonal quarter)."""
    estimate = estimator(method, budget)

    def one_head(args):
        q_h, k_h, v_h, key_h = args
        if causal:
            return causal_recursion(estimate, q_h, k_h, v_h, key=key_h, min_seq_len=min_seq_len)[0]
        return estimate(q_h, k_h, v_h, key=key_h)[0]

    keys = jax.random.split(key, q.shape[0])
    return jax.lax.map(one_head, (q, k, v, keys))
