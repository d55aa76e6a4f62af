"""Figures of the notebooks, redrawn from the recorded JSON under experiments/results/ (reads files only).

Every loader returns None and prints why when a record is missing, so a notebook degrades instead of failing.
Every plot puts the record's device, date, jax version and commit under the figure.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MODES = ("noncausal_fwd", "noncausal_fwdbwd", "causal_fwd", "causal_fwdbwd")
LABELS = {"noncausal_fwd": "forward", "noncausal_fwdbwd": "forward+backward", "causal_fwd": "forward",
          "causal_fwdbwd": "forward+backward"}  # fmt: skip


def repository_url() -> str:
    """The one repository URL: `[project.urls] Repository` of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def load(name: str) -> dict | None:
    """experiments/results/<name>.json, or None (with a message) when it is not recorded yet."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        print(f"[no record] {path.relative_to(ROOT)} does not exist yet: this figure is skipped.")
        return None
    return json.loads(path.read_text())


def provenance(record: dict, name: str) -> str:
    """'name: device, date, jax x, commit abc1234' from a record's "run" entry (or its top-level fields)."""
    run = record.get("run", {})
    device = run.get("device") or record.get("device", "?")
    date = run.get("date") or record.get("date", "?")
    jax_version = run.get("jax_version") or record.get("jax_version", "?")
    commit = run.get("git_commit", "")[:7] or "no commit recorded"
    return f"{name}.json: {device}, {date}, jax {jax_version}, {commit}"


def _footer(fig, lines):
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, color="0.35", va="bottom")


def fig4(record: dict, name: str, head_dim: int = 64):
    """The paper's Fig. 4: speed-up over exact attention (cuDNN) vs sequence length, non-causal and causal panels."""
    import matplotlib.pyplot as plt

    rows = [r for r in record["timings"] if r.get("head_dim", head_dim) == head_dim]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, causal in zip(axes, ("noncausal", "causal")):
        for mode in (f"{causal}_fwd", f"{causal}_fwdbwd"):
            points = sorted((r["n"], r["ratio_cudnn_over_pallas_triton"]) for r in rows
                            if r["mode"] == mode and r.get("ratio_cudnn_over_pallas_triton"))  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS[mode])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", title=causal.replace("noncausal", "non-causal"))
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("speed-up over cuDNN exact attention")
    config = record.get("config", {})
    _footer(fig, [provenance(record, name), "config: " + ", ".join(f"{k}={v}" for k, v in config.items())])
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


BREAKDOWN_PARTS = (  # (part, substrings of kernel names), first match wins
    ("hash", ("hash",)),
    ("sort", ("sort",)),
    ("probe (column mass)", ("probe",)),
    ("block + residual (fused attention)", ("hyper_gathered_attention", "hyper_indexed", "tiled", "hyper_attention")),
    ("base case (exact)", ("cudnn", "flash", "fmha", "segment")),
    ("merge", ("merge",)),
)


def breakdown(profile: dict) -> dict[str, dict[str, float]]:
    """{mode: {part: ms}}: kernel times of a profile record grouped into the algorithm's parts ("other": the rest)."""
    parts = {}
    for mode, entry in profile["profile"].items():
        grouped = {}
        for kernel, ms in entry.get("kernels", {}).items():
            low = kernel.lower()
            part = next((p for p, keys in BREAKDOWN_PARTS if any(k in low for k in keys)), "other (gathers, fusions)")
            grouped[part] = grouped.get(part, 0.0) + ms
        parts[mode] = grouped
    return parts


def plot_breakdown(profile: dict, name: str):
    import matplotlib.pyplot as plt

    parts = breakdown(profile)
    names = [p for p, _ in BREAKDOWN_PARTS] + ["other (gathers, fusions)"]
    modes = [m for m in MODES if m in parts]
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom = np.zeros(len(modes))
    for part in names:
        ms = np.array([parts[m].get(part, 0.0) for m in modes])
        if ms.any():
            ax.bar([m.replace("_", " ") for m in modes], ms, bottom=bottom, label=part)
            bottom += ms
    ax.set_ylabel("GPU kernel time (ms)")
    ax.set_title(f"where the time goes, n = {profile.get('n')}")
    ax.legend(fontsize=8, loc="upper left")
    _footer(fig, [provenance(profile, name), f"config: {profile.get('config')}"])
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def fig3_from_layers(record: dict, name: str):
    """Fig. 3 analogue from perplexity_layers.json: perplexity / exact vs layers replaced, per config and choice."""
    import matplotlib.pyplot as plt

    summary = record.get("summary", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config, by_choice in summary.items():
        if config == "exact":
            continue
        last = sorted((int(n), c) for n, c in by_choice.get("last", {}).items())
        if last:
            xs = [0] + [n for n, _ in last]
            ratio = [1.0] + [c["ratio_mean"] for _, c in last]
            std = [0.0] + [c["ratio_std"] for _, c in last]
            (line,) = left.plot(xs, ratio, marker="o", label=f"{config}, last l")
            left.fill_between(xs, np.subtract(ratio, std), np.add(ratio, std), color=line.get_color(), alpha=0.15)
            ms = [(n, c["attention_ms"]) for n, c in last if "attention_ms" in c]
            if ms:
                right.plot(*zip(*ms), marker="o", color=line.get_color(), label=config)
            first = sorted((int(n), c["ratio_mean"]) for n, c in by_choice.get("first", {}).items())
            if first:
                left.plot(*zip(*first), marker="s", linestyle=":", color=line.get_color(), label=f"{config}, first l")
            for choice, marker in (("even", "^"), ("odd", "v")):
                for n, c in by_choice.get(choice, {}).items():
                    left.plot([int(n)], [c["ratio_mean"]], marker=marker, color=line.get_color(), linestyle="none",
                              label=f"{config}, every other ({choice})")  # fmt: skip
    left.set(xlabel="layers replaced l", ylabel="perplexity / exact (mean over documents, ±1 std)", yscale="log")
    right.set(xlabel="layers replaced l (last l)", ylabel="attention time, all 30 layers (ms)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    docs = ", ".join(record.get("documents", []))
    _footer(fig, [provenance(record, name), f"{record.get('tokens')} tokens; documents: {docs}"])
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def fig3_from_sweep(record: dict, name: str):
    """Fig. 3 analogue from the older accuracy_perplexity.json schema ("<config>/last<l>" entries per document)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for config in record.get("configs", {}):
        by_count = {}
        for doc in record["documents"].values():
            for entry_name, entry in doc.items():
                if entry_name.startswith(f"{config}/last") and "ratio_to_exact" in entry:
                    by_count.setdefault(int(entry_name.rsplit("last", 1)[1]), []).append(entry["ratio_to_exact"])
        points = sorted((n, np.mean(r)) for n, r in by_count.items())
        if points:
            ax.plot([0] + [n for n, _ in points], [1.0] + [r for _, r in points], marker="o", label=config)
    ax.set(xlabel="last l layers replaced", ylabel="perplexity / exact (mean over documents)", yscale="log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _footer(
        fig, [provenance(record, name), f"{record.get('tokens')} tokens; documents: {', '.join(record['documents'])}"]
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def kinds_table(record: dict) -> str:
    """Markdown table of perplexity / exact with every layer replaced, per kind of text (perplexity_kinds.json)."""
    summary = record.get("summary", {})
    configs = sorted({c for by in summary.values() for c in by})
    lines = ["| kind | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for kind, by in sorted(summary.items()):
        cells = [f"{by[c]['mean']:.3f} ± {by[c]['std']:.3f} (n={by[c]['n']})" if c in by else "—" for c in configs]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_errors(record: dict, kind: str, mode: str) -> dict[str, dict[int, float]]:
    """{method: {budget: mean relative error over layers and heads}} of quality_vs_cost.json ("uniform": {0: e})."""
    layers = record["results"].get(kind, {}).get(mode, {})
    out = {}
    for entry in layers.values():
        for method, by_budget in entry.items():
            if method == "uniform":
                out.setdefault(method, {}).setdefault(0, []).extend(by_budget)
                continue
            for budget, errors in by_budget.items():
                out.setdefault(method, {}).setdefault(int(budget), []).extend(errors)
    return {m: {b: float(np.mean(e)) for b, e in by.items()} for m, by in out.items()}


def pareto(record: dict, name: str):
    """Relative error vs keys per query, one panel per (mode, kind); uniform attention drawn as the floor line."""
    import matplotlib.pyplot as plt

    kinds = list(record["results"])
    modes = record["config"]["modes"]
    fig, axes = plt.subplots(len(modes), len(kinds), figsize=(4.2 * len(kinds), 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            errors = mean_errors(record, kind, mode)
            if not errors:
                ax.set_title(f"{kind}, {mode}: not recorded")
                continue
            for method, by_budget in errors.items():
                if method == "uniform":
                    ax.axhline(by_budget[0], color="black", linestyle="--", linewidth=1, label="uniform (floor)")
                    continue
                cost = record["keys_per_query"][mode][method]
                points = sorted((cost[str(b)], e) for b, e in by_budget.items())
                style = "-" if method in ("paper", "default", "accurate") else ":"
                ax.plot(*zip(*points), marker="o", linestyle=style, label=method)
            ax.set(xscale="log", yscale="log", title=f"{kind}, {mode}", xlabel="keys per query")
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("relative error (mean over layers, heads)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    cfg = record["config"]
    _footer(fig, [provenance(record, name), f"tokens={cfg['tokens']} layers={cfg['layers']} heads={cfg['heads']} "
                  f"min_seq_len={cfg['min_seq_len']} documents={cfg['documents']}"])  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def hardness_scatter(record: dict, name: str):
    """Each preset's error vs alpha and vs log kappa per (document, layer, head), with Spearman's rho in the title."""
    import matplotlib.pyplot as plt

    predictors = record["predictors"]
    presets = record["presets"]
    fig, axes = plt.subplots(len(presets), len(predictors), figsize=(3.3 * len(predictors), 3.0 * len(presets)),
                             squeeze=False)  # fmt: skip
    points = record["points"]
    for i, preset in enumerate(presets):
        for j, predictor in enumerate(predictors):
            ax = axes[i][j]
            for kind in sorted({p["kind"] for p in points}):
                mine = [p for p in points if p["kind"] == kind]
                ax.scatter([p[predictor] for p in mine], [p["error"][preset] for p in mine], s=10, label=kind)
            rho = record["spearman"][preset][predictor]
            ax.set_title(f"{preset}: rho=" + ("n/a" if rho is None else f"{rho:+.2f}"), fontsize=9)
            ax.set_xlabel(predictor, fontsize=8)
            ax.set_yscale("log")
            if j == 0:
                ax.set_ylabel("relative error", fontsize=8)
    axes[0][0].legend(fontsize=7)
    _footer(fig, [provenance(record, name), f"mode={record['mode']}, budget={record['budget']} keys per query"])
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def redraw_pngs() -> None:
    """The PNGs the README and docs show, redrawn from their records: `python3 notebooks/_figures.py`."""
    import matplotlib

    matplotlib.use("Agg")
    figures = {
        "quality_vs_cost.png": ("quality_vs_cost", pareto, 90),
        "hardness.png": ("hardness", hardness_scatter, 80),
        "fig4_speedup.png": ("bench_single_layer_h100", fig4, 90),
    }
    layers = load("perplexity_layers")
    if layers is not None and layers.get("summary"):
        figures["fig3_perplexity.png"] = ("perplexity_layers", fig3_from_layers, 90)
    else:  # until the Fig. 3 record exists: the earlier last-l sweep on Hamlet
        figures["fig3_perplexity.png"] = ("accuracy_perplexity", fig3_from_sweep, 90)
    for png, (name, draw, dpi) in figures.items():
        record = load(name)
        if record is not None:
            draw(record, name).savefig(RESULTS / png, dpi=dpi)
            print(f"{png} <- {name}.json")


if __name__ == "__main__":
    redraw_pngs()
