"""Figure (like the paper's Fig. 4) and README table from the single-layer benchmark JSON.

Command:  python3 experiments/benchmarks/plot_single_layer.py experiments/results/bench_single_layer.json \
              experiments/results/bench_single_layer_large.json
Hardware: any (CPU, reads JSON only). Runtime: ~2 seconds. Expected result: writes bench_single_layer.png next to the
first JSON (speed-up over cuDNN vs n, one line per mode; run time vs n incl. HyperAttention alone up to 1M) and prints
a Markdown table of median milliseconds and ratios for the README. Several files (runs of one benchmark split by n, on
the same device and jax version) are merged into one table. Records of `bench_single_layer.py --min-seq-len A,B,...`
(base-case sizes) give one table each, no figure.
"""

from __future__ import annotations

import json
import os
import sys

MODES = ("noncausal_fwd", "noncausal_fwdbwd", "causal_fwd", "causal_fwdbwd")
LABELS = {
    "noncausal_fwd": "non-causal fwd",
    "noncausal_fwdbwd": "non-causal fwd+bwd",
    "causal_fwd": "causal fwd",
    "causal_fwdbwd": "causal fwd+bwd",
}


# our kernel paths, as the tables name them (the Mosaic path's backward is the Triton one)
KERNELS = {"pallas_triton": "pallas_triton", "pallas_mosaic_gpu": "pallas_mosaic_gpu (Triton backward)"}


def _config_name(config) -> str:
    return {"paper": "paper()", "default": "HyperAttentionConfig()"}[config.get("name", "paper")]


def _ms(row, method):
    return row.get(method, {}).get("ms")


def _kernels(rows):
    """Our kernel paths timed in these rows, in a fixed order."""
    return [m for m in KERNELS if any(_ms(r, m) is not None for r in rows)]


def markdown_table(record, head_dim=64) -> str:
    rows = [r for r in record["timings"] if r["head_dim"] == head_dim]
    sizes = sorted({r["n"] for r in rows})
    kernels = _kernels(rows)
    header = "| mode | " + " | ".join(f"{n // 1024}k" for n in sizes) + " |"
    lines = [header, "|---" * (len(sizes) + 1) + "|"]
    for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
        mode_rows = {r["n"]: r for r in rows if r["mode"] == mode}
        for method, name in (("cudnn", "cuDNN exact"), *((k, f"ours, {KERNELS[k]}") for k in kernels)):
            cells = []
            for n in sizes:
                row = mode_rows.get(n, {})
                ms = _ms(row, method)
                cells.append(f"{ms:.2f}" if ms is not None else ("OOM" if "error" in row.get(method, {}) else "—"))
            lines.append(f"| {LABELS[mode]}, {name} (ms) | " + " | ".join(cells) + " |")
        for kernel in kernels:
            ratios = [mode_rows.get(n, {}).get(f"ratio_cudnn_over_{kernel}") for n in sizes]
            cells = [f"**{ratio:.1f}x**" if ratio else "—" for ratio in ratios]
            suffix = f" ({kernel})" if len(kernels) > 1 else ""
            lines.append(f"| {LABELS[mode]}, speed-up{suffix} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(record) -> str:
    """A `bench_single_layer.py --min-seq-len A,B,...` record: per size and mode, cuDNN's time, then each base-case
    size's time and speed-up over cuDNN."""
    config = record["config"]
    sizes = config["min_seq_len"]
    kernel = next(k for k in KERNELS if any(f"{k}@{sizes[0]}" in r for r in record["timings"]))
    shape = f"N={config['num_heads']} K={config['num_kv_heads']}"
    header = "| n, H, mode | cuDNN (ms) | " + " | ".join(f"min_seq_len {m}: ms (speed-up)" for m in sizes) + " |"
    lines = [f"{_config_name(config)}, {shape}, {kernel}:", "", header, "|---" * (len(sizes) + 2) + "|"]
    for row in record["timings"]:
        cells = []
        for size in sizes:
            ms, ratio = _ms(row, f"{kernel}@{size}"), row.get(f"ratio_cudnn_over_{kernel}@{size}")
            cells.append(f"{ms:.2f} ({ratio:.1f}x)" if ms is not None and ratio else "—")
        exact = _ms(row, "cudnn")
        label = f"{row['n'] // 1024}k, {row['head_dim']}, {LABELS[row['mode']]}"
        lines.append(f"| {label} | {exact:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(record, path, head_dim=64):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["timings"] if r["head_dim"] == head_dim]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"pallas_triton": "-", "pallas_mosaic_gpu": ":"}
    for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
        mine = sorted(((r["n"], r) for r in rows if r["mode"] == mode), key=lambda item: item[0])
        color = None
        for kernel in _kernels(rows):
            style = {"linestyle": styles[kernel], "color": color}
            label = f"{LABELS[mode]}, {kernel}"
            ratio = [(n, r[f"ratio_cudnn_over_{kernel}"]) for n, r in mine if f"ratio_cudnn_over_{kernel}" in r]
            if ratio:
                (line,) = left.plot(*zip(*ratio), marker="o", label=label, **style)
                color = style["color"] = line.get_color()
            ours = [(n, _ms(r, kernel)) for n, r in mine if _ms(r, kernel) is not None]
            (line,) = right.plot(*zip(*ours), marker="o", label=f"ours, {label}", **style)
            color = line.get_color()
        exact = [(n, _ms(r, "cudnn")) for n, r in mine if _ms(r, "cudnn") is not None]
        if exact:
            right.plot(*zip(*exact), marker="x", linestyle="--", color=color, label=f"cuDNN, {LABELS[mode]}")
    left.axhline(1.0, color="gray", linewidth=0.8)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("speed-up over cuDNN (cuDNN time / ours)")
    right.set_ylabel("median time (ms)")
    left.legend(fontsize=8)
    right.legend(fontsize=6, ncol=2)
    heads = record["config"]["num_heads"]
    kv_heads = record["config"].get("num_kv_heads", heads)
    fig.suptitle(
        f"HyperAttention vs exact cuDNN, {record['device']}, jax {record['jax_version']}, "
        f"B=1 N={heads} K={kv_heads} H={head_dim} bf16, {_config_name(record['config'])}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge_runs(records):
    """One record from several runs of the benchmark on the same device and jax version (timings concatenated)."""
    first = records[0]
    for other in records[1:]:
        if (other["device"], other["jax_version"]) != (first["device"], first["jax_version"]):
            mismatch = f"{first['device']} jax {first['jax_version']} vs {other['device']} jax {other['jax_version']}"
            raise ValueError(f"runs from different machines or jax versions cannot share a table: {mismatch}")
    return {**first, "timings": [row for record in records for row in record["timings"]]}


def main():
    sources = sys.argv[1:] or ["experiments/results/bench_single_layer.json"]
    records = []
    for src in sources:
        with open(src) as f:
            records.append(json.load(f))
    if all(isinstance(r["config"].get("min_seq_len"), list) for r in records):  # base-case sweeps: tables only
        for src, r in zip(sources, records, strict=True):
            print(f"<!-- generated by experiments/benchmarks/plot_single_layer.py from {src} ({r['device']}, "
                  f"{r['date']}) -->")  # fmt: skip
            print(sweep_table(r), end="\n\n")
        return
    record = merge_runs(records)
    png = os.path.splitext(sources[0])[0] + ".png"
    head_dim = record["timings"][0]["head_dim"]  # one head dim per file
    plot(record, png, head_dim=head_dim)
    runs = ", ".join(f"{src} ({r['device']}, {r['date']})" for src, r in zip(sources, records, strict=True))
    print(f"<!-- generated by experiments/benchmarks/plot_single_layer.py from {runs} -->")
    print(markdown_table(record, head_dim=head_dim))
    print("wrote", png)


if __name__ == "__main__":
    main()
