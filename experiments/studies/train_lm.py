"""Train one byte-level LM twice, with exact attention and with HyperAttention, then cross-evaluate them.

Command (GPU run behind experiments/results/train_lm.json, train_lm.png and train_lm_gpu.log):
    PYTHONPATH=$PWD python3 experiments/studies/train_lm.py --preset gpu --data .carry/train --out $OUT \
        --checkpoint-dir /tmp/ckpt --checkpoint-every 500 --max-train-seconds 190 --quiet
    (.carry/train holds the long stdlib modules: `hyperattn_jax.data.byte_corpus.copy_stdlib_corpus(".carry/train")`.)
Hardware: one NVIDIA H100 80GB, jax 0.11.2, flax 0.12.10. Runtime: about 100 s (two 8192-byte-context trainings
of 1500 steps, batch 4, a 4-layer d=256 GQA model; four held-out evaluations; compilation included).
Expected result: both runs fall from 8 to about 1.0 train bits/byte with near-identical curves; held-out bits/byte
near 1.2 for both, each model losing about 0.03 bits/byte when evaluated with the other attention; HyperAttention
(implementation=None, which resolved to the Pallas Triton kernels for bf16) about 1.15x the step time of cuDNN
flash attention at this length.

CPU smoke version (seconds; tests/test_train_lm.py runs it): `python3 experiments/studies/train_lm.py --preset
    smoke --out DIR`.

Both runs see identical batches (a pure function of seed and step), start from identical parameters, and use the
same optimizer and step budget. Checkpoints (orbax) go to `--checkpoint-dir`; `--resume` continues a run from its
latest checkpoint, loss history included.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.data.byte_corpus import WindowSampler, eval_windows, load_corpus
from hyperattn_jax.models.byte_lm import ByteLM, LMConfig
from hyperattn_jax.nn.linen import LSH_COLLECTION, RNG_STREAM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: run_record
from run_record import with_run_record

PRESETS = {
    "smoke": dict(
        context=128,
        batch=4,
        steps=30,
        warmup=5,
        lr=3e-3,
        num_layers=2,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        hyper=dict(block_size=16, sample_size=16, num_projections=3, min_seq_len=64),
        eval_windows=4,
        exact_attention="exact",
        dtype="float32",
    ),
    "gpu": dict(
        context=8192,
        batch=4,
        steps=1500,
        warmup=100,
        lr=2e-3,
        num_layers=4,
        d_model=256,
        num_heads=4,
        num_kv_heads=2,
        hyper=dict(block_size=256, sample_size=256, num_projections=7, min_seq_len=1024),
        eval_windows=32,
        exact_attention="cudnn",
        dtype="bfloat16",
    ),
}

# Python-side trace counts of the jitted functions: a count above 1 would mean recompilation between steps.
TRACES = collections.Counter()
# Jitted steps and evals by their static inputs, so a resumed run in the same process reuses the compiled code.
_JITTED = {}


def bits(loss_nats: float) -> float:
    return loss_nats / math.log(2)


def optimizer_settings(args):
    return (args.lr, args.warmup, args.steps)


def make_optimizer(args):
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.01))


def hyper_config(args) -> HyperAttentionConfig:
    """The preset's block/sample/projection/min_seq_len on the published estimator, or on the accuracy defaults."""
    if args.hyper_variant == "paper":
        return HyperAttentionConfig.paper(**args.hyper)
    return HyperAttentionConfig(**args.hyper)


def model_config(args, attention: str) -> LMConfig:
    return LMConfig(
        num_layers=args.num_layers,
        d_model=args.d_model,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        attention=attention,
        hyper=hyper_config(args),
        dtype=jnp.dtype(args.dtype),
    )


def init_state(args, optimizer):
    """Parameters, fixed LSH keys and optimizer state; identical for every run (same seed)."""
    model = ByteLM(model_config(args, "exact"))
    variables = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, 16), jnp.int32))
    params = variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        LSH_COLLECTION: variables[LSH_COLLECTION],
        "opt_state": optimizer.init(params),
    }


def cross_entropy(model, params, lsh, tokens, rngs=None):
    logits = model.apply({"params": params, LSH_COLLECTION: lsh}, tokens[:, :-1], rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def layer_grad_norms(grads):
    """Gradient norm of every parameter, per layer for the scanned stack (leading axis): {path: [layers] or [1]}."""

    def norms(path, grad):
        rows = grad.reshape(grad.shape[0], -1) if "blocks" in jax.tree_util.keystr(path) else grad.reshape(1, -1)
        return jnp.sqrt(jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=1))

    flat = jax.tree_util.tree_leaves_with_path(grads)
    return {jax.tree_util.keystr(path): norms(path, grad) for path, grad in flat}


def make_train_step(model, optimizer, name: str, settings):
    cache_key = ("train", model.cfg, name, settings)
    if cache_key in _JITTED:
        return _JITTED[cache_key]

    def train_step(state, tokens, base_key):
        TRACES[f"train_step/{name}"] += 1
        rngs = {RNG_STREAM: jax.random.fold_in(base_key, state["step"])}  # new samples every step
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, state[LSH_COLLECTION], tokens, rngs))(
            state["params"]
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, loss, layer_grad_norms(grads)

    _JITTED[cache_key] = jax.jit(train_step, donate_argnums=0)
    return _JITTED[cache_key]


def make_eval(model, name: str):
    cache_key = ("eval", model.cfg)
    if cache_key in _JITTED:
        return _JITTED[cache_key]

    def eval_batch(params, lsh, tokens):
        TRACES[f"eval/{name}"] += 1
        return cross_entropy(model, params, lsh, tokens)  # no rng: each layer's fixed evaluation key

    _JITTED[cache_key] = jax.jit(eval_batch)
    return _JITTED[cache_key]


def evaluate(eval_fn, state, windows, batch: int) -> float:
    losses = [
        float(eval_fn(state["params"], state[LSH_COLLECTION], jnp.asarray(windows[i : i + batch])))
        for i in range(0, len(windows) - batch + 1, batch)
    ]
    return float(np.mean(losses))


def train(args, name: str, attention: str, sampler, optimizer):
    """One training run; resumes from `args.checkpoint_dir/name` when asked. Returns (state, history)."""
    model = ByteLM(model_config(args, attention))
    step_fn = make_train_step(model, optimizer, name, optimizer_settings(args))
    state = init_state(args, optimizer)
    history = {"step": [], "loss": [], "grad_norm": [], "seconds": []}
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(args.checkpoint_dir, name)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    history_path = os.path.join(args.checkpoint_dir, name, "history.json")
    if args.resume and manager.latest_step() is not None:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
        with open(history_path) as f:
            history = json.load(f)
        print(f"[{name}] resumed at step {int(state['step'])}")

    def save():
        if manager.latest_step() != int(state["step"]):
            manager.save(int(state["step"]), args=ocp.args.StandardSave(state), force=True)
            manager.wait_until_finished()
        with open(history_path, "w") as f:
            json.dump(history, f)

    base_key = jax.random.key(args.seed + 1)
    start = int(state["step"])
    deadline = time.perf_counter() + args.max_train_seconds
    bar = tqdm(range(start, args.steps), desc=f"train {name}", disable=args.quiet)
    for step in bar:
        tokens = jnp.asarray(sampler.batch(step))
        t0 = time.perf_counter()
        state, loss, grad_norms = step_fn(state, tokens, base_key)
        loss = float(loss)  # blocks: the step's wall time includes its computation
        history["seconds"].append(time.perf_counter() - t0)
        history["step"].append(step)
        history["loss"].append(loss)
        history["grad_norm"].append(math.sqrt(sum(float(jnp.sum(n**2)) for n in grad_norms.values())))
        if step == start:  # proof that gradients reach every parameter of every layer
            history["first_step_min_grad_norm"] = {k: float(jnp.min(n)) for k, n in grad_norms.items()}
        bar.set_postfix(bits_per_byte=f"{bits(loss):.3f}")
        if args.quiet and (step % 50 == 0 or step + 1 == args.steps):
            print(
                f"[{name}] step {step} bits/byte {bits(loss):.3f} step time {history['seconds'][-1]:.4f}s", flush=True
            )
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{name}] loss became {loss} at step {step}")
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save()
        if args.stop_after is not None and step + 1 >= args.stop_after:
            break  # an interruption, for testing --resume
        if time.perf_counter() > deadline:
            print(f"[{name}] stopped by --max-train-seconds={args.max_train_seconds} after step {step}")
            break
    save()
    manager.close()
    return state, history


def step_time_summary(seconds):
    steady = np.asarray(seconds[3:] if len(seconds) > 6 else seconds[1:] or seconds)
    return {
        "first_step_s_incl_compile": float(seconds[0]) if seconds else None,
        "median_step_s": float(np.median(steady)),
        "p10_step_s": float(np.percentile(steady, 10)),
        "p90_step_s": float(np.percentile(steady, 90)),
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, run in results["runs"].items():
        loss = np.asarray([bits(x) for x in run["history"]["loss"]])
        window = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        steps = np.asarray(run["history"]["step"])[window - 1 :]
        seconds = np.asarray(run["history"]["seconds"])
        seconds[0] = np.median(seconds)  # leave the first step's compilation out of the time axis
        wall = np.cumsum(seconds)[window - 1 :]
        label = f"{name} ({run['attention']})"
        axes[0].plot(steps, smooth, label=label)
        axes[1].plot(wall, smooth, label=label)
    axes[0].set(xlabel="step", ylabel="train bits/byte (smoothed)", title="training loss")
    axes[1].set(xlabel="wall time of the steps, compilation excluded (s)", ylabel="train bits/byte (smoothed)")
    axes[1].set_title("loss vs time")
    names = list(results["runs"])
    kinds = list(results["eval_attention"])
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        values = [results["runs"][n]["eval_bits_per_byte"][kind] for n in names]
        bars = axes[2].bar(np.arange(len(names)) + j * width, values, width, label=f"evaluated with {kind}")
        axes[2].bar_label(bars, fmt="%.3f", fontsize=8)
    axes[2].set_xticks(np.arange(len(names)) + width * (len(kinds) - 1) / 2, [f"trained {n}" for n in names])
    all_values = [v for n in names for v in results["runs"][n]["eval_bits_per_byte"].values()]
    if all_values:
        axes[2].set_ylim(0.9 * min(all_values), 1.04 * max(all_values))
    axes[2].set(ylabel="held-out bits/byte", title=f"held-out eval, context {results['config']['context']}")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"byte LM, exact vs HyperAttention ({results['device']}, jax {results['jax_version']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--data", default="stdlib", help='folder of long text files, or "stdlib"')
    parser.add_argument("--out", required=True, help="folder for train_lm.json / train_lm.png")
    parser.add_argument("--runs", default="exact,hyper", help="which trainings: exact, hyper or both")
    parser.add_argument("--steps", type=int, dest="steps_override", help="override the preset's step budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hyper-variant",
        choices=("paper", "options"),
        default="paper",
        help="paper: the published estimator (what results/train_lm.json ran); options: the accuracy-option defaults",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, help="stop (as if interrupted) after this step; resume later")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluations")
    parser.add_argument("--max-train-seconds", type=float, default=float("inf"), help="safety stop per run")
    parser.add_argument("--name", default="train_lm", help="basename of the JSON and PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    for field, value in PRESETS[args.preset].items():
        setattr(args, field, value)
    if args.steps_override is not None:
        args.steps = args.steps_override
        args.warmup = min(args.warmup, max(1, args.steps // 10))
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.out, "checkpoints")
    return args


def resolved_implementation(dtype) -> str:
    """The backend `implementation=None` picks for this dtype on this machine (recorded with the results)."""
    from hyperattn_jax.backends import choose

    return choose(implementation=None, dtype=dtype, head_dim=64, config=HyperAttentionConfig(), causal=True).name


def usable_exact_attention(preferred: str) -> str:
    """cuDNN flash attention is the exact baseline on GPUs; fall back to the jnp reference where it cannot run."""
    if preferred != "cudnn":
        return preferred
    try:
        x = jnp.ones((1, 256, 4, 64), jnp.bfloat16)
        jax.block_until_ready(
            jax.nn.dot_product_attention(x, x[:, :, :2], x[:, :, :2], is_causal=True, implementation="cudnn")
        )
        return "cudnn"
    except Exception as error:  # no GPU, or a cuDNN without this attention: record and use the reference
        print(f"cudnn attention unavailable ({type(error).__name__}: {error}); exact baseline = 'exact'")
        return "exact"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    args.exact_attention = usable_exact_attention(args.exact_attention)
    train_docs, held_out = load_corpus(args.data)
    sampler = WindowSampler(train_docs, args.context, args.batch, args.seed)
    windows = eval_windows(held_out, args.context, args.eval_windows)
    optimizer = make_optimizer(args)
    attention_of = {"exact": args.exact_attention, "hyper": "hyper"}
    run_names = [r for r in args.runs.split(",") if r]
    results = {
        "experiment": "train_lm",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint_dir")},
        "data": {
            "source": args.data,
            "train_documents": len(train_docs),
            "train_bytes": int(sum(len(d) for d in train_docs)),
            "held_out_documents": len(held_out),
            "eval_windows": len(windows),
            "eval_bytes": int(windows.shape[0] * (windows.shape[1] - 1)),
        },
        "eval_attention": {"exact": args.exact_attention, "hyper": "hyper"},
        "hyper_implementation": resolved_implementation(jnp.dtype(args.dtype)),
        "runs": {},
    }
    for name in run_names:
        state, history = train(args, name, attention_of[name], sampler, optimizer)
        run = {"attention": attention_of[name], "steps_done": int(state["step"]), "history": history}
        run.update(step_time_summary(history["seconds"]))
        run["eval_bits_per_byte"] = {}
        for kind, attention in () if args.no_eval else results["eval_attention"].items():
            eval_fn = make_eval(ByteLM(model_config(args, attention)), kind)
            run["eval_bits_per_byte"][kind] = bits(evaluate(eval_fn, state, windows, args.batch))
        run["eval_perplexity_per_byte"] = {k: 2**v for k, v in run["eval_bits_per_byte"].items()}
        results["runs"][name] = run
        print(f"[{name}] eval bits/byte {run['eval_bits_per_byte']}, median step {run['median_step_s']:.4f}s")
    results["traces"] = dict(TRACES)
    if "exact" in results["runs"] and "hyper" in results["runs"]:
        exact, hyper = results["runs"]["exact"], results["runs"]["hyper"]
        results["hyper_over_exact_median_step_time"] = hyper["median_step_s"] / exact["median_step_s"]
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(with_run_record(results), f, indent=1, default=str)
    if not (args.no_plot or args.no_eval):
        plot(results, os.path.join(args.out, f"{args.name}.png"))
    return results


if __name__ == "__main__":
    main()
