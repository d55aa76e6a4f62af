"""Tables (markdown) and figures (PNG) from the accuracy experiments' JSON.

Command:  python3 experiments/studies/accuracy_report.py
Hardware: any CPU; runtime: a few seconds.
Expected: prints the markdown tables used in docs/accuracy.md and the README section, and writes
          experiments/results/accuracy_qkv.png and accuracy_perplexity.png from accuracy_qkv.json and
          accuracy_perplexity.json, perplexity_kinds.png (the per-kind table: perplexity / exact by kind of text,
          mean and spread over documents x seeds, held-out documents apart) from perplexity_kinds.json,
          and the relative error by kind from accuracy_kinds.json (CPU, 3 layers) and accuracy_kinds_gpu.json (GPU,
          every layer), with how many (layer, head) pairs do no better than uniform attention (whichever exist).
          The Fig. 3 analogue (perplexity_layers.json) is drawn by notebooks/_figures.py. Every number printed is read
          from those files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def qkv_table(data: dict, rows: list[str] | None = None) -> str:
    layers = list(data["layers"])
    names = rows or [n for n in data["layers"][layers[0]]["causal"] if not n.endswith("seed_std")]
    names = [n for n in names if all(n in data["layers"][layer]["causal"] for layer in layers)]
    lines = []
    for mode in ("causal", "noncausal"):
        header = f"| {mode} | keys/query | " + " | ".join(f"L{layer}" for layer in layers) + " | mean | vs paper |"
        lines += [header, "|---" * (len(layers) + 4) + "|"]
        paper_mean = np.mean([np.mean(data["layers"][layer][mode]["paper"]) for layer in layers])
        for name in names:
            per_layer = [np.mean(data["layers"][layer][mode][name]) for layer in layers]
            fields = data["configs"].get(name)
            keys = "all" if fields is None else fields["keys_per_query"]
            if fields is not None and mode == "noncausal":
                keys -= fields["local_window"]  # the window exists only in causal attention
            mean = np.mean(per_layer)
            cells = " | ".join(f"{e:.3f}" for e in per_layer)
            lines.append(f"| {name} | {keys} | {cells} | {mean:.3f} | {mean / paper_mean:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def qkv_figure(data: dict, rows: list[str] | None, path: Path):
    layers = list(data["layers"])
    names = rows or [n for n in data["layers"][layers[0]]["causal"] if not n.endswith("seed_std")]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), sharey=False)
    width = 0.8 / len(names)
    for ax, mode in zip(axes, ("causal", "noncausal")):
        for i, name in enumerate(names):
            values = [np.mean(data["layers"][layer][mode].get(name, [np.nan])) for layer in layers]
            ax.bar(np.arange(len(layers)) + i * width, values, width, label=name, color=plt.cm.tab20(i))
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [f"layer {layer}" for layer in layers])
        ax.set_title(f"{mode}: relative error vs exact (8192 tokens, SmolLM2-135M)")
        ax.set_ylabel("mean relative error over heads")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def perplexity_table(data: dict) -> str:
    names = ("paper", "default", "accurate", "first_candidate")
    lines = ["| document (8192 tokens), all 30 layers replaced | exact | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 2) + "|")
    for doc, entry in data["documents"].items():
        cells = []
        for name in names:
            value = entry.get(f"{name}/last30")
            cells.append("" if value is None else f"{value['perplexity']:.2f} ({value['ratio_to_exact']:.3f}x)")
        lines.append(f"| {doc} | {entry['exact']['perplexity']:.2f} | " + " | ".join(cells) + " |")
    for doc, entry in data["documents"].items():
        counts = sorted({int(k.split("last")[1]) for k in entry if "/last" in k}, reverse=True)
        if len(counts) < 2:
            continue
        lines += ["", f"| {doc}: last n layers replaced | " + " | ".join(map(str, counts)) + " |"]
        lines.append("|---" * (len(counts) + 1) + "|")
        for name in names:
            cells = [entry.get(f"{name}/last{n}") for n in counts]
            if any(cells):
                row = " | ".join(
                    "" if c is None else f"{c['perplexity']:.2f} ({c['ratio_to_exact']:.3f}x)" for c in cells
                )
                lines.append(f"| {name} | {row} |")
    return "\n".join(lines)


def perplexity_figure(data: dict, path: Path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for doc, entry in data["documents"].items():
        for name, marker in (("paper", "o"), ("default", "^"), ("accurate", "s")):
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


# Runs made before the variant was fixed name the first candidate "default"; later runs measured
# `HyperAttentionConfig.accurate()` under a descriptive name or as "default". Each file's "configs" holds the exact
# fields of every row.
QKV_FILES = {
    "accuracy_qkv.json": {"default": "b64+sinks32+heavy128+window32"},
    "accuracy_qkv_pow2.json": {"b64+sinks32+heavy96+window64": "accurate", "default": "accurate"},
    "accuracy_qkv_b256.json": {},
    "accuracy_qkv_probes.json": {"column_mass_p16": "default"},  # the library default since 2026-11-25
}
PERPLEXITY_FILES = {
    "accuracy_perplexity.json": {"default": "first_candidate"},
    "accuracy_perplexity_default.json": {"default": "accurate"},
    "accuracy_perplexity_column_mass.json": {},
    "accuracy_perplexity_column_mass_p16.json": {"column_mass_p16": "default"},
    "accuracy_perplexity_sweep_default.json": {"column_mass_p16": "default"},
}


def _renamed(name: str, renames: dict) -> str:
    """A row name ("config" or "config/suffix") with its config part renamed."""
    base, _, suffix = name.partition("/")
    return renames.get(base, base) + (f"/{suffix}" if suffix else "")


def merged_qkv() -> dict | None:
    merged = None
    for file_name, renames in QKV_FILES.items():
        path = RESULTS / file_name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        merged = merged or {"configs": {}, "layers": {}}
        for name, fields in data["configs"].items():
            merged["configs"][renames.get(name, name)] = fields
        for layer, modes in data["layers"].items():
            for mode, rows in modes.items():
                target = merged["layers"].setdefault(layer, {}).setdefault(mode, {})
                for name, value in rows.items():
                    target[_renamed(name, renames)] = value
    return merged


def merged_perplexity() -> dict | None:
    merged = None
    for file_name, renames in PERPLEXITY_FILES.items():
        path = RESULTS / file_name
        if not path.is_file():
            continue
        merged = merged or {"documents": {}}
        for doc, entry in json.loads(path.read_text())["documents"].items():
            target = merged["documents"].setdefault(doc, {})
            for name, value in entry.items():
                target.setdefault(_renamed(name, renames), value)
    return merged


def qkv_summary(data: dict) -> str:
    layers = list(data["layers"])
    # "default" in these records is column-mass sampling alone (block 256, no heavy keys or window).
    lines = ["| mean relative error (5 layers) | paper | column mass | accurate | uniform attention |"]
    lines.append("|---|---|---|---|---|")
    for mode in ("causal", "noncausal"):
        mean = {
            n: np.mean([np.mean(data["layers"][la][mode][n]) for la in layers])
            for n in ("paper", "default", "accurate", "uniform")
        }
        cells = [f"{mean[n]:.3f} ({mean[n] / mean['paper']:.2f}x)" for n in ("default", "accurate")]
        lines.append(f"| {mode} | {mean['paper']:.3f} | {' | '.join(cells)} | {mean['uniform']:.3f} |")
    return "\n".join(lines)


def speed_table(data: dict) -> str:
    lines = [
        "| n | mode | cuDNN exact | paper | accurate | accurate / paper |",
        "|---|---|---|---|---|---|",
    ]
    for case, entry in data["timings_ms"].items():
        n, mode = case.split("/")
        for kind in ("fwd", "fwd+bwd"):
            if f"paper/{kind}" in entry:
                lines.append(
                    f"| {n} | {mode} {kind} | {entry[f'cudnn/{kind}']:.2f} ms | {entry[f'paper/{kind}']:.2f} ms "
                    f"| {entry[f'default/{kind}']:.2f} ms | {entry[f'default_over_paper/{kind}']:.2f}x |"
                )
    return "\n".join(lines)


# The README's three columns and the records each comes from (file, name in it): the default and paper() from the one
# run that measured the candidates side by side (the default was "b128+h128+w256" there), accurate() from a CPU run
# of the same documents, layers and seeds (which measured paper() and the default again, to the same errors). Errors
# are shown as ratios to paper()'s error in the same record.
README_COLUMNS = {
    "paper": {
        "errors": ("accuracy_kinds_candidates_h100.json", "paper"),
        "perplexity": ("perplexity_kinds_candidates_h100.json", "paper"),
    },
    "default": {
        "errors": ("accuracy_kinds_adaptive_cpu.json", "default"),
        "perplexity": ("perplexity_kinds_shifted_cpu.json", "default"),
        "speed": ("accuracy_cost_draw_guard_h100.json", "default"),
    },
    "accurate": {
        "errors": ("accuracy_kinds_adaptive_cpu.json", "accurate"),
        "perplexity": ("perplexity_kinds_shifted_cpu.json", "accurate"),
        "speed": ("accuracy_cost_draw_guard_h100.json", "accurate"),
    },
}


@functools.cache
def _record(file_name: str) -> dict:
    """A results JSON, read once however many cells of the table come from it."""
    return json.loads((RESULTS / file_name).read_text())


def readme_table() -> str:
    """The README's summary by kind of text: paper() vs the default vs accurate(), every number read from the records
    of README_COLUMNS: relative error on real q/k/v (mean over the layers and heads of the record, and its ratio to
    paper()'s in the same record), perplexity / exact with all 30 layers replaced (mean over the tuning documents and
    seeds, held-out document in brackets), GPU time / paper() in the same run (range over 32k, 131k, causal and not)."""
    lines = ["| SmolLM2-135M, 8192 tokens | `paper()` | default | `accurate()` |", "|---|---|---|---|"]
    for mode in ("causal", "noncausal"):
        for kind in KINDS_ORDER:
            cells = []
            for column in README_COLUMNS.values():
                file_name, name = column["errors"]
                errors = _record(file_name)["errors"]
                rows = [e for key, e in errors.items() if key.startswith(f"{kind}/") and key.endswith(f"/{mode}")]
                if not rows:
                    cells.append("")
                    continue
                mean = np.mean([np.mean(e[name]) for e in rows])
                paper = np.mean([np.mean(e["paper"]) for e in rows])
                cells.append(f"{mean:.3f}" + ("" if name == "paper" else f" ({mean / paper:.2f}x)"))
            lines.append(f"| relative error, {mode}, {kind} | {' | '.join(cells)} |")
    for kind in KINDS_ORDER:
        cells = []
        for column in README_COLUMNS.values():
            file_name, name = column["perplexity"]
            summary = _record(file_name)["summary"]
            tuned, held = summary[kind][name], summary.get(f"{kind}/held_out", {}).get(name)
            cells.append(f"{tuned['mean']:.3f}x" + (f" ({held['mean']:.3f}x)" if held else ""))
        lines.append(f"| perplexity / exact, all 30 layers, {kind} (held-out) | {' | '.join(cells)} |")
    for kind, label in (("fwd+bwd", "forward+backward"), ("fwd", "forward")):
        cells = ["1x"]
        for column in list(README_COLUMNS.values())[1:]:
            file_name, name = column["speed"]
            record = _record(file_name)
            device = record["run"]["device"].removeprefix("NVIDIA ").split()[0]
            prefix = f"{name}_over_paper/{kind}/"
            ratios = [r for e in record["timings_ms"].values() for row, r in e.items() if row.startswith(prefix)]
            cells.append(f"{min(ratios):.2f}-{max(ratios):.2f}x ({device})")
        lines.append(f"| GPU time / paper, {label} (32k, 131k, causal and not) | {' | '.join(cells)} |")
    return "\n".join(lines)


def cost_table(file_name: str, name: str = "default") -> str:
    """`name`'s GPU time over paper()'s in one accuracy_cost.py record, per length and mode: latency timings, the
    pipelined ones in brackets (docs/accuracy.md)."""
    lines = ["| | forward | forward+backward |", "|---|---|---|"]
    for row, ratios in _record(file_name)["timings_ms"].items():
        n, mode = row.split("/")
        cells = [
            f"{ratios[f'{name}_over_paper/{kind}/latency']:.2f}x ({ratios[f'{name}_over_paper/{kind}/pipelined']:.2f}x)"
            for kind in ("fwd", "fwd+bwd")
        ]
        lines.append(f"| {int(n) // 1000}k {mode.replace('noncausal', 'non-causal')} | {' | '.join(cells)} |")
    return "\n".join(lines)


KINDS_ORDER = ("play", "code", "prose")

# (label, record, config) of the window-scope comparison in docs/accuracy.md: the first window on the H100, the two
# scopes of experiments/studies/window_scope.py (commit 0d423e9) on the CPU, and the library's shifted window through
# accuracy_perplexity.py on the CPU (same documents, seeds and fields).
WINDOW_SCOPE_ROWS = (
    ("256, every second-half query (the first window)", "perplexity_kinds_candidates_h100.json", "b128+h128+w256"),
    ("256, boundary segment only", "window_scope_cpu.json", "default/boundary"),
    ("256, shifted recursion (window_scope.py)", "window_scope_shifted_cpu.json", "default/shifted"),
    ("256, shifted recursion: the default", "perplexity_kinds_shifted_cpu.json", "default"),
    ("512, every second-half query", "perplexity_kinds_candidates_h100.json", "b128+h128+w512"),
    ("512, boundary segment only", "window_scope_cpu.json", "b128+h128+w512/boundary"),
    ("512, shifted recursion (window_scope.py)", "window_scope_shifted_cpu.json", "b128+h128+w512/shifted"),
)


def window_scope_table() -> str:
    """Perplexity / exact by kind (tuning mean, held-out in brackets) for WINDOW_SCOPE_ROWS whose record exists."""
    lines = ["| window | " + " | ".join(KINDS_ORDER) + " |", "|---" * (len(KINDS_ORDER) + 1) + "|"]
    for label, file_name, name in WINDOW_SCOPE_ROWS:
        if not (RESULTS / file_name).is_file():
            continue
        summary = _record(file_name)["summary"]
        if name not in summary[KINDS_ORDER[0]]:
            continue
        cells = [
            f"{summary[k][name]['mean']:.3f}x ({summary[f'{k}/held_out'][name]['mean']:.3f}x)" for k in KINDS_ORDER
        ]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


# The sample-shrinkage sweep (accuracy_kinds.py): label -> config name in accuracy_kinds_shrinkage_cpu.json.
# (label, record, name) of the sample-shrinkage sweep in docs/accuracy.md: the fixed rule's c from the sweep (whose
# "default" was c = 1/32 then) and the adaptive lam from the same command with --configs default after it became the
# default (same documents, layers, seeds and keys).
SHRINKAGE_ROWS = (
    ("0 (unbiased)", "accuracy_kinds_shrinkage_cpu.json", "shrinkage_0"),
    ("1/64", "accuracy_kinds_shrinkage_cpu.json", "shrinkage_1/64"),
    ("1/32", "accuracy_kinds_shrinkage_cpu.json", "default"),
    ("1/16", "accuracy_kinds_shrinkage_cpu.json", "shrinkage_1/16"),
    ("1/8", "accuracy_kinds_shrinkage_cpu.json", "shrinkage_1/8"),
    ('"adaptive" (the default)', "accuracy_kinds_shrinkage_adaptive_cpu.json", "default"),
)


def shrinkage_table(mode: str = "noncausal") -> str:
    """Mean relative error by kind for each row of SHRINKAGE_ROWS, with how many (layer, head) pairs and (layer,
    kv-head group) means are worse than uniform attention, on the (kind, layer) entries of the sweep's record."""
    entries = _record(SHRINKAGE_ROWS[0][1])["errors"].keys()
    lines = ["| sample_shrinkage | " + " | ".join(KINDS_ORDER) + " |", "|---" * (len(KINDS_ORDER) + 1) + "|"]
    for label, file_name, name in SHRINKAGE_ROWS:
        errors = _record(file_name)["errors"]
        cells = []
        for kind in KINDS_ORDER:
            rows = [errors[key] for key in entries if key.startswith(f"{kind}/") and key.endswith(f"/{mode}")]
            mean = np.mean([np.mean(e[name]) for e in rows])
            heads = sum(int(np.sum(np.greater(e[name], e["uniform"]))) for e in rows)
            group_means = [
                (np.reshape(e[name], (3, -1)).mean(1), np.reshape(e["uniform"], (3, -1)).mean(1)) for e in rows
            ]
            groups = sum(int(np.sum(ours > uniform)) for ours, uniform in group_means)
            cells.append(f"{mean:.3f} ({heads} / {groups})")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def kinds_table(data: dict) -> str:
    """Perplexity / exact by kind of text (all 30 layers), from perplexity_kinds.json: mean ± std [min-max] (n)."""
    summary = data["summary"]
    names = [n for n in ("paper", "default", "accurate") if any(n in by for by in summary.values())]
    names += sorted({n for by in summary.values() for n in by} - set(names))
    groups = [g for kind in KINDS_ORDER for g in (kind, f"{kind}/held_out") if g in summary]
    lines = [
        "| kind (documents x seeds) | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for group in groups:
        cells = []
        for name in names:
            cell = summary[group].get(name)
            cells.append(
                "" if cell is None else f"{cell['mean']:.3f}x ± {cell['std']:.3f} [{cell['min']:.3f}-{cell['max']:.3f}]"
            )
        count = max((c["n"] for c in summary[group].values()), default=0)
        lines.append(f"| {group} ({count}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kinds_figure(data: dict, path: Path):
    summary = data["summary"]
    groups = [g for kind in KINDS_ORDER for g in (kind, f"{kind}/held_out") if g in summary]
    names = sorted({n for g in groups for n in summary[g]})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        cells = [summary[g].get(name) for g in groups]
        x = [j + i * width for j, c in enumerate(cells) if c]
        ax.bar(x, [c["mean"] - 1 for c in cells if c], width, bottom=1, yerr=[c["std"] for c in cells if c],
               label=name)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity / exact (all 30 layers)")
    ax.set_title(f"SmolLM2-135M, {data.get('tokens', 8192)} tokens, causal, min_seq_len {data.get('min_seq_len')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def kinds_error_table(data: dict) -> str:
    """Mean relative error by kind and mode over the layers measured (ratio to `paper()`), then per config the
    (layer, head) pairs where it does no better than uniform attention, from accuracy_kinds[_gpu].json."""
    rows, not_better = {}, {}
    for key, entry in data["errors"].items():
        kind, _, mode = key.split("/")
        for name, per_head in entry.items():
            rows.setdefault(name, {}).setdefault(f"{kind}/{mode}", []).append(np.mean(per_head))
            worse = int(np.sum(np.asarray(per_head) >= np.asarray(entry["uniform"])))
            counts = not_better.setdefault(name, {}).setdefault(f"{kind}/{mode}", [0, 0])
            counts[0] += worse
            counts[1] += len(per_head)
    columns = sorted({c for by in rows.values() for c in by})
    lines = ["| config | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    paper = rows.get("paper", {})

    def cell(by, column):
        if column not in by:
            return ""
        ratio = f" ({np.mean(by[column]) / np.mean(paper[column]):.2f}x)" if column in paper else ""
        return f"{np.mean(by[column]):.3f}{ratio}"

    for name, by in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(by, c) for c in columns) + " |")
    lines += ["", "| (layer, head) pairs no better than uniform | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for name, by in not_better.items():
        if name != "uniform":
            lines.append(
                f"| {name} | " + " | ".join("{} of {}".format(*by[c]) if c in by else "" for c in columns) + " |"
            )
    return "\n".join(lines)


def main():
    for stem, table, figure in (
        ("perplexity_kinds", kinds_table, kinds_figure),
        ("perplexity_kinds_candidates_h100", kinds_table, kinds_figure),
    ):
        path = RESULTS / f"{stem}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            if table is not None:
                print(table(data), end="\n\n")
            figure(data, RESULTS / f"{stem}.png")
    for stem in (
        "accuracy_kinds",
        "accuracy_kinds_gpu",
        "accuracy_kinds_candidates_h100",
        "accuracy_kinds_heldout_cpu",
    ):
        if (RESULTS / f"{stem}.json").is_file():
            print(
                f"{stem}.json:",
                kinds_error_table(json.loads((RESULTS / f"{stem}.json").read_text())),
                sep="\n",
                end="\n\n",
            )
    rows = [
        "uniform", "paper", "sinks64", "heavy64", "systematic", "value_norm", "column_mass", "default", "window64",
        "sinks+window", "b128+sinks+heavy+cm", "b256+sinks32+heavy96+u0.2", "b128+sinks32+heavy96+u0.2",
        "b64+sinks32+heavy128+window32", "accurate",
    ]  # fmt: skip
    data = merged_qkv()
    if data is not None:
        print(qkv_summary(data), end="\n\n")
        print(qkv_table(data, rows))
        qkv_figure(data, [r for r in rows if r != "uniform"] + ["uniform"], RESULTS / "accuracy_qkv.png")
    speed = RESULTS / "accuracy_speed.json"
    if speed.is_file():
        print(speed_table(json.loads(speed.read_text())), end="\n\n")
    data = merged_perplexity()
    print("README:", readme_table(), sep="\n", end="\n\n")
    print("window scope (docs/accuracy.md):", window_scope_table(), sep="\n", end="\n\n")
    print("sample shrinkage (docs/accuracy.md):", shrinkage_table(), sep="\n", end="\n\n")
    print("GPU cost (docs/accuracy.md):", cost_table(README_COLUMNS["default"]["speed"][0]), sep="\n", end="\n\n")
    if data is not None:
        print(perplexity_table(data))
        perplexity_figure(data, RESULTS / "accuracy_perplexity.png")


if __name__ == "__main__":
    main()
