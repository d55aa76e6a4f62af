"""The README's demo (examples/demo.py) on a short prefix of Hamlet: every row it prints is real and means something.

Runs where the SmolLM2 GGUF is cached (`python3 -m hyperattn_jax.data fetch`, which CI runs); nothing is downloaded
here. 2048 tokens with min_seq_len 1024 in the demo's configs: the real rows are approximated, causal and not.
"""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("gguf")
from hyperattn_jax.data.fetch import SMOLLM2_GGUF_NAME, cache_dir

ROOT = Path(__file__).resolve().parents[1]
GGUF = cache_dir() / SMOLLM2_GGUF_NAME
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not fetched (python3 -m hyperattn_jax.data fetch)")


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_prints_real_rows_with_the_uniform_floor(capsys):
    demo = _demo()
    rows = demo.main(["--tokens", "2048", "--layers", "2", "--synthetic-tokens", "2048", "--synthetic-heads", "1"])
    printed = capsys.readouterr().out
    real = [r for r in rows if r["data"].startswith("SmolLM2")]
    assert {(r["config"], r["causal"]) for r in real} == {(c, m) for c in demo.CONFIGS for m in (False, True)}
    for r in real:
        assert 0 < r["error"] < math.inf and 0 < r["uniform"] < math.inf
        assert r["exact_ms"] > 0 and r["hyper_ms"] > 0
    by_config = {(r["config"], r["causal"]): r for r in real}
    # Causal real attention is far from uniform; the default and accurate() must beat the uniform floor there.
    for name in ("default", "accurate"):
        row = by_config[(name, True)]
        assert row["error"] < 0.5 * row["uniform"], row
    # The synthetic rows are speed only: no error is claimed for them.
    assert all(r["error"] is None for r in rows if r["data"] == "Gaussian")
    assert "uniform" in printed and "How to read it" in printed
