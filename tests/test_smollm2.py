"""The pure-JAX SmolLM2-135M (hyperattn_jax.models.smollm2) on the first 64 tokens of Hamlet, with the real GGUF.

Runs only where the GGUF is already in the cache folder (`python3 -m hyperattn_jax.data fetch` puts it there);
nothing is downloaded here. About 10-15 s on 2 CPU cores, most of it parsing the GGUF once.
"""

import numpy as np
import pytest

pytest.importorskip("gguf")
from hyperattn_jax.data.fetch import SMOLLM2_GGUF_NAME, cache_dir

GGUF = cache_dir() / SMOLLM2_GGUF_NAME
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not fetched (python3 -m hyperattn_jax.data fetch)")

HAMLET_OPENING = (
    "HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\n\n\n\nPERSONS REPRESENTED.\n\nClaudius, King of Denmark.\n"
    "Hamlet, Son to the former, and Nephew to the present King.\nPolonius, Lord Chamberlain.\n"
)
HAMLET_IDS = [
    56, 38348, 3438, 28, 13163, 2113, 5628, 6016, 422, 2680, 32161, 59, 198, 198, 1717, 4967,
    12081, 22342, 198, 64, 9670, 43862, 12710, 6886, 2097, 6213, 3010, 30, 198, 198, 3603, 6155,
    3609, 28, 3261, 282, 15644, 30, 198, 29564, 2016, 28, 10782, 288, 260, 4302, 28, 284,
    12799, 32939, 288, 260, 1386, 3261, 30, 198, 14783, 258, 3609, 28, 5151, 45688, 30, 198,
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    from hyperattn_jax.models import smollm2

    return smollm2, *smollm2.load_params(GGUF)


def test_config_read_from_gguf(model):
    _, _, config = model
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert (config.hidden, config.vocab_size, config.rope_theta) == (576, 49152, 100000.0)


def test_forward_capture_and_cross_entropy(model):
    smollm2, params, config = model
    tokens = np.asarray([HAMLET_IDS], dtype=np.int32)
    logits, captured = smollm2.forward(params, tokens, config=config, capture=[0, 15])
    assert logits.shape == (1, 64, 49152)
    # 3.72 nats measured; a wrong RoPE convention or weight layout gives far more (uniform guessing: 10.8).
    assert 3.0 < float(smollm2.cross_entropy(logits, tokens)) < 4.5
    q, k, v = captured[15]
    assert (q.shape, k.shape, v.shape) == ((1, 64, 9, 64), (1, 64, 3, 64), (1, 64, 3, 64))
    only = smollm2.capture(params, tokens, config=config, layers=[15])
    np.testing.assert_allclose(np.asarray(only[15][0]), np.asarray(q), rtol=0, atol=1e-5)


def test_tokenizer_matches_reference_ids():
    pytest.importorskip("tokenizers")
    from hyperattn_jax.models import smollm2

    tokenizer = smollm2.load_tokenizer(GGUF)
    assert tokenizer.encode(HAMLET_OPENING).ids == HAMLET_IDS
    assert tokenizer.decode(HAMLET_IDS) == HAMLET_OPENING
