"""Tables (markdown) and figures (PNG) from the accuracy experiments' JSON.

Command:  python3 experiments/accuracy_report.py
Hardware: any CPU; runtime: a few seconds.
Expected: prints the markdown tables used in docs/accuracy.md and the README section, and writes
          experiments/results/accuracy_qkv.png and accuracy_perplexity.png from accuracy_qkv.json and
          accuracy_perplexity.json (whichever exist). Every number printed is read from those files.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def qkv_table(data: dict, rows: list[str] | None = None) -> str:
    layers = list(data["layers"])
    names = rows or [n for n in data["layers"][layers[0]]["causal"] if not n.endswith("seed_std")]
    lines = []
    for mode in ("causal", "noncausal"):
        header = f"| {mode} | keys/query | " + " | ".join(f"L{layer}" for layer in layers) + " | mean | vs paper |"
        lines += [header, "|---" * (len(layers) + 4) + "|"]
        paper_mean = np.mean([np.mean(data["layers"][layer][mode]["paper"]) for layer in layers])
        for name in names:
            if name not in data["layers"][layers[0]][mode]:
                continue
            per_layer = [np.mean(data["layers"][layer][mode][name]) for layer in layers]
            keys = data["configs"].get(name, {}).get("keys_per_query", "all")
            mean = np.mean(per_layer)
            cells = " | ".join(f"{e:.3f}" for e in per_layer)
            lines.append(f"| {name} | {keys} | {cells} | {mean:.3f} | {mean / paper_mean:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def qkv_figure(data: dict, rows: list[str] | None, path: Path):
    layers = list(data["layers"])
    names = rows or [n for n in data["layers"][layers[0]]["causal"] if not n.endswith("seed_std")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    width = 0.8 / len(names)
    for ax, mode in zip(axes, ("causal", "noncausal")):
        for i, name in enumerate(names):
            values = [np.mean(data["layers"][layer][mode].get(name, [np.nan])) for layer in layers]
            ax.bar(np.arange(len(layers)) + i * width, values, width, label=name)
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [f"layer {layer}" for layer in layers])
        ax.set_title(f"{mode}: relative error vs exact (8192 tokens, SmolLM2-135M)")
        ax.set_ylabel("mean relative error over heads")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def perplexity_table(data: dict) -> str:
    lines = ["| document | exact | setting | perplexity | x exact |", "|---|---|---|---|---|"]
    for doc, entry in data["documents"].items():
        exact = entry.get("exact", {}).get("perplexity")
        for name, value in entry.items():
            if name == "exact":
                continue
            lines.append(
                f"| {doc} | {exact:.2f} | {name} | {value['perplexity']:.2f} | {value['ratio_to_exact']:.3f} |"
            )
    return "\n".join(lines)


def perplexity_figure(data: dict, path: Path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for doc, entry in data["documents"].items():
        for name, marker in (("paper", "o"), ("default", "s")):
            points = sorted(
                (int(k.split("last")[1]), v["ratio_to_exact"]) for k, v in entry.items() if k.startswith(name + "/")
            )
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"{name}, {doc}")
    ax.axhline(1.3, color="gray", linestyle=":", label="target 1.3x")
    ax.set_xlabel("last n layers with HyperAttention")
    ax.set_ylabel("perplexity / exact perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M, 8192 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    qkv = RESULTS / "accuracy_qkv.json"
    if qkv.is_file():
        data = json.loads(qkv.read_text())
        print(qkv_table(data))
        qkv_figure(data, None, RESULTS / "accuracy_qkv.png")
    ppl = RESULTS / "accuracy_perplexity.json"
    if ppl.is_file():
        data = json.loads(ppl.read_text())
        print(perplexity_table(data))
        perplexity_figure(data, RESULTS / "accuracy_perplexity.png")


if __name__ == "__main__":
    main()
