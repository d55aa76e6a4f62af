"""hyperattn_jax.models.gemma3 offline: a tiny synthetic Gemma 3 GGUF (6 layers, layer 5 global, a 4-token window,
GQA) checked against an independent numpy forward, the banded sliding-window attention against a dense mask, and
the tokenizer built from SentencePiece scores."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from hyperattn_jax.models import gemma3  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN, WINDOW, EPS = 16, 4, 2, 8, 6, 32, 4, 1e-6
GLOBAL_THETA, LOCAL_THETA = 1e6, 1e4
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
WORDS = ["\n", "a", "b", "c", "▁", "ab", "bc", "▁a", "▁ab"]  # "\n" is user-defined (matched whole); no "abc"


def _write_tiny(path, weights, pieces, scores, kinds):
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(GLOBAL_THETA)
    writer.add_sliding_window(WINDOW)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_context_length(64)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    for name, w in weights.items():
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)
    pieces = SPECIAL + BYTES + WORDS
    kinds = [3] * 4 + [6] * 256 + [4] + [1] * (len(WORDS) - 1)
    scores = [0.0] * 260 + [-1000.0] + [-float(i) for i in range(len(WORDS) - 1)]
    scores[pieces.index("bc")] = 5.0  # "bc" outranks "ab": "abc" must come out as "a" + "bc", not "ab" + "c"
    norm = lambda n: 1 + rng.normal(size=n) * 0.3  # stored as llama.cpp stores Gemma norms: 1 + w
    weights = {"token_embd.weight": rng.normal(size=(len(pieces), HIDDEN)) * 0.3, "output_norm.weight": norm(HIDDEN)}
    for i in range(LAYERS):
        weights |= {
            f"blk.{i}.attn_norm.weight": norm(HIDDEN),
            f"blk.{i}.attn_q.weight": rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)) / 4,
            f"blk.{i}.attn_k.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)) / 4,
            f"blk.{i}.attn_v.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)) / 4,
            f"blk.{i}.attn_q_norm.weight": norm(HEAD_DIM),
            f"blk.{i}.attn_k_norm.weight": norm(HEAD_DIM),
            f"blk.{i}.attn_output.weight": rng.normal(size=(HIDDEN, HEADS * HEAD_DIM)) / 4,
            f"blk.{i}.post_attention_norm.weight": norm(HIDDEN),
            f"blk.{i}.ffn_norm.weight": norm(HIDDEN),
            f"blk.{i}.ffn_gate.weight": rng.normal(size=(FFN, HIDDEN)) / 4,
            f"blk.{i}.ffn_up.weight": rng.normal(size=(FFN, HIDDEN)) / 4,
            f"blk.{i}.ffn_down.weight": rng.normal(size=(HIDDEN, FFN)) / 6,
            f"blk.{i}.post_ffw_norm.weight": norm(HIDDEN),
        }
    weights = {n: w.astype(np.float32) for n, w in weights.items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny_gemma3.gguf"
    _write_tiny(path, weights, pieces, scores, kinds)
    return path, weights, pieces


def _reference_forward(weights, ids):
    """Plain numpy Gemma 3, written from the architecture description (not from the module under test)."""
    t, group = len(ids), HEADS // KV_HEADS
    norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w
    gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    def rope(x, theta):
        inv = theta ** -(np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        ang = np.concatenate([np.arange(t)[:, None] * inv] * 2, axis=-1)[:, None]
        half = HEAD_DIM // 2
        return x * np.cos(ang) + np.concatenate([-x[..., half:], x[..., :half]], -1) * np.sin(ang)

    x = weights["token_embd.weight"][ids].astype(np.float64) * np.sqrt(HIDDEN)
    for i in range(LAYERS):
        w = {n.split(".", 2)[2]: a for n, a in weights.items() if n.startswith(f"blk.{i}.")}
        is_global = i == 5
        theta = GLOBAL_THETA if is_global else LOCAL_THETA
        h = norm(x, w["attn_norm.weight"])
        q = norm((h @ w["attn_q.weight"].T).reshape(t, HEADS, HEAD_DIM), w["attn_q_norm.weight"])
        k = norm((h @ w["attn_k.weight"].T).reshape(t, KV_HEADS, HEAD_DIM), w["attn_k_norm.weight"])
        v = (h @ w["attn_v.weight"].T).reshape(t, KV_HEADS, HEAD_DIM)
        q, k = rope(q, theta), rope(k, theta)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        distance = np.arange(t)[:, None] - np.arange(t)[None, :]
        visible = (distance >= 0) & (is_global | (distance < WINDOW))
        s = np.where(visible, np.einsum("qnh,knh->nqk", q, k) / np.sqrt(HEAD_DIM), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        attended = np.einsum("nqk,knh->qnh", p / p.sum(-1, keepdims=True), v).reshape(t, -1)
        x = x + norm(attended @ w["attn_output.weight"].T, w["post_attention_norm.weight"])
        h = norm(x, w["ffn_norm.weight"])
        mlp = (gelu(h @ w["ffn_gate.weight"].T) * (h @ w["ffn_up.weight"].T)) @ w["ffn_down.weight"].T
        x = x + norm(mlp, w["post_ffw_norm.weight"])
    return norm(x, weights["output_norm.weight"]) @ weights["token_embd.weight"].T


def test_config_reads_metadata_and_layer_pattern(tiny):
    config = gemma3.read_config(tiny[0])
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (LAYERS, HEADS, KV_HEADS, 8)
    assert config.global_layers == (5,) and config.sliding_window == WINDOW
    assert [config.rope_theta(i) for i in (0, 4, 5)] == [LOCAL_THETA, LOCAL_THETA, GLOBAL_THETA]
    assert config.scale == pytest.approx(HEAD_DIM**-0.5)


def test_forward_matches_independent_reference(tiny):
    """13 tokens > the 4-token window: QK-norm, post-norms, GQA, both RoPE bases and the window all matter."""
    path, weights, pieces = tiny
    params, config = gemma3.load_params(path)
    ids = np.random.default_rng(1).integers(0, len(pieces), size=13).astype(np.int32)
    logits = np.asarray(gemma3.forward(params, ids[None], config=config)[0])
    np.testing.assert_allclose(logits, _reference_forward(weights, ids), rtol=2e-4, atol=2e-4)
    x, _ = gemma3.hidden_states(params, ids[None], config=config)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(12), ids[1:]])
    assert gemma3.cross_entropy(params, x, ids[None], config=config) == pytest.approx(expected, rel=1e-5)


def test_replacing_the_global_layer_changes_only_from_there(tiny):
    """attention_fns={5: fn} swaps layer 5 alone; resuming from its kept input gives the same output."""
    path, _, pieces = tiny
    params, config = gemma3.load_params(path)
    ids = np.random.default_rng(2).integers(0, len(pieces), size=11)[None]
    exact, kept = gemma3.hidden_states(params, ids, config=config, keep=(5,))
    local = lambda q, k, v, *, layer: gemma3.sliding_window_attention(q, k, v, window=WINDOW)
    swapped, _ = gemma3.hidden_states(params, ids, config=config, attention_fns={5: local})
    resumed, _ = gemma3.hidden_states(params, ids, config=config, attention_fns={5: local}, start=(5, kept[5]))
    np.testing.assert_allclose(np.asarray(resumed), np.asarray(swapped), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(swapped), np.asarray(exact), atol=1e-3)  # the window does cut keys off


@pytest.mark.parametrize("seq_len", [7, 37])
def test_sliding_window_attention_is_the_banded_softmax(rng, seq_len):
    window, n, kv, h = 8, 4, 2, 16
    q, k, v = (rng.normal(size=(2, seq_len, heads, h)).astype(np.float32) for heads in (n, kv, kv))
    ours = np.asarray(gemma3.sliding_window_attention(q, k, v, window=window))
    kk, vv = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    distance = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
    s = np.einsum("bqnh,bknh->bnqk", q, kk) / np.sqrt(h)
    s = np.where((distance >= 0) & (distance < window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), vv)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_merges_by_score_with_bos_user_pieces_and_byte_fallback(tiny):
    path, _, pieces = tiny
    tokenizer = gemma3.load_tokenizer(path)
    encoded = tokenizer.encode("abc ab\né")
    assert encoded.tokens == ["<bos>", "a", "bc", "▁ab", "\n", "<0xC3>", "<0xA9>"]
    assert encoded.ids == [pieces.index(t) for t in encoded.tokens]
    assert tokenizer.decode(encoded.ids, skip_special_tokens=True) == "abc ab\né"
