"""hyperattn_jax.data and hyperattn_jax.models.smollm2 offline: a tiny synthetic GGUF with SmolLM2's tensor names
(2 layers, tiny dims, llama.cpp's q/k row permutation) checked against an independent jnp Llama forward."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from hyperattn_jax.data import capture_qkv, documents  # noqa: E402
from hyperattn_jax.models import smollm2  # noqa: E402

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, THETA, EPS = 16, 4, 2, 2, 32, 10000.0, 1e-5


def _permute_for_gguf(w, n_heads):
    """llama.cpp's converter: each head's rows reordered for interleaved RoPE (the model must undo it)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)
    vocab = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokens = [*vocab, "Ġt", "<|endoftext|>"]
    head_dim = HIDDEN // HEADS
    weights = {
        "token_embd.weight": rng.normal(size=(len(tokens), HIDDEN)),
        "output_norm.weight": 1 + rng.normal(size=HIDDEN) * 0.1,
    }
    for i in range(LAYERS):
        weights |= {
            f"blk.{i}.attn_norm.weight": 1 + rng.normal(size=HIDDEN) * 0.1,
            f"blk.{i}.attn_q.weight": rng.normal(size=(HIDDEN, HIDDEN)) / 4,
            f"blk.{i}.attn_k.weight": rng.normal(size=(KV_HEADS * head_dim, HIDDEN)) / 4,
            f"blk.{i}.attn_v.weight": rng.normal(size=(KV_HEADS * head_dim, HIDDEN)) / 4,
            f"blk.{i}.attn_output.weight": rng.normal(size=(HIDDEN, HIDDEN)) / 4,
            f"blk.{i}.ffn_norm.weight": 1 + rng.normal(size=HIDDEN) * 0.1,
            f"blk.{i}.ffn_gate.weight": rng.normal(size=(FFN, HIDDEN)) / 4,
            f"blk.{i}.ffn_up.weight": rng.normal(size=(FFN, HIDDEN)) / 4,
            f"blk.{i}.ffn_down.weight": rng.normal(size=(HIDDEN, FFN)) / 6,
        }
    weights = {n: w.astype(np.float32) for n, w in weights.items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t"])
    writer.add_token_types([1] * (len(vocab) + 1) + [3])
    for name, w in weights.items():
        stored = w
        if name.endswith("attn_q.weight"):
            stored = _permute_for_gguf(w, HEADS)
        elif name.endswith("attn_k.weight"):
            stored = _permute_for_gguf(w, KV_HEADS)
        writer.add_tensor(name, np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, weights


def _reference_forward(weights, ids, n_layers):
    """Plain numpy Llama: rotate-half RoPE on the original (unpermuted) weights, GQA causal softmax attention."""
    head_dim, group = HIDDEN // HEADS, HEADS // KV_HEADS
    t = len(ids)
    inv = 1 / THETA ** (np.arange(0, head_dim, 2) / head_dim)
    ang = np.concatenate([np.arange(t)[:, None] * inv] * 2, axis=-1)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    rope = lambda x: x * cos + np.concatenate([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], -1) * sin
    norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w
    x = weights["token_embd.weight"][ids].astype(np.float64)
    captured = {}
    for i in range(n_layers):
        w = {n.split(".", 2)[2]: a for n, a in weights.items() if n.startswith(f"blk.{i}.")}
        h = norm(x, w["attn_norm.weight"])
        q = rope((h @ w["attn_q.weight"].T).reshape(t, HEADS, head_dim))
        k = rope((h @ w["attn_k.weight"].T).reshape(t, KV_HEADS, head_dim))
        v = (h @ w["attn_v.weight"].T).reshape(t, KV_HEADS, head_dim)
        captured[i] = (q, k, v)
        kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("qnh,knh->nqk", q, kk) / np.sqrt(head_dim) + np.triu(np.full((t, t), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        out = np.einsum("nqk,knh->qnh", p / p.sum(-1, keepdims=True), vv).reshape(t, HIDDEN)
        x = x + out @ w["attn_output.weight"].T
        h = norm(x, w["ffn_norm.weight"])
        gate = h @ w["ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["ffn_up.weight"].T)) @ w["ffn_down.weight"].T
    return norm(x, weights["output_norm.weight"]) @ weights["token_embd.weight"].T, captured


def test_forward_and_capture_match_independent_reference(tiny):
    path, weights = tiny
    params, config = smollm2.load_params(path)
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (LAYERS, HEADS, KV_HEADS, 4)
    ids = np.random.default_rng(1).integers(0, 257, size=40).astype(np.int32)
    logits, captured = smollm2.forward(params, ids[None], config=config, capture=True)
    ref_logits, ref_captured = _reference_forward(weights, ids, LAYERS)
    np.testing.assert_allclose(np.asarray(logits[0]), ref_logits, rtol=1e-4, atol=1e-4)
    for layer, tensors in ref_captured.items():
        for ours, ref in zip(captured[layer], tensors, strict=True):
            np.testing.assert_allclose(np.asarray(ours[0]), ref, rtol=1e-4, atol=1e-4)


def test_capture_qkv_caches_on_disk(tiny, tmp_path):
    path, weights = tiny
    doc = documents(kinds=("code",))[0].name
    first = capture_qkv(doc, [1], 64, gguf_path=path, directory=tmp_path, progress=False)[1]
    assert first.q.shape == (1, 64, HEADS, 4) and first.k.shape == (1, 64, KV_HEADS, 4)
    files = list((tmp_path / "qkv").rglob("*.npz"))
    assert [f.name for f in files] == ["T64_L1.npz"]
    tokenizer = smollm2.load_tokenizer(path)
    ids = tokenizer.encode(documents(kinds=("code",))[0].text()).ids[:64]
    _, ref = _reference_forward(weights, np.asarray(ids), LAYERS)
    np.testing.assert_allclose(first.q[0], ref[1][0], rtol=1e-4, atol=1e-4)
    files[0].write_bytes(files[0].read_bytes())  # still there: the second call reads it, no model needed
    second = capture_qkv(doc, 1, 64, gguf_path=path.with_name("missing.gguf").with_stem("tiny"), directory=tmp_path)
    np.testing.assert_array_equal(second[1].k, first.k)
