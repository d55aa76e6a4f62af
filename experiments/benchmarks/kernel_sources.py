"""Which source lines the small XLA kernels of a profile come from.

XLA names each GPU kernel after its fusion (or sort, scatter) instruction, and the optimized HLO keeps each
instruction's metadata: a stack frame of the jax call that made it. This reads a profile of `profile_single_layer.py`
and the optimized HLO its `--hlo-dir` wrote for the same mode, and sums the kernels' time by the first source line
of this project that made them (`?` where the HLO gives none, e.g. a sort emitted for `top_k`, shown with its op name).

    python3 experiments/benchmarks/kernel_sources.py PROFILE.json causal_fwd HLO_DIR/causal_fwd.hlo.txt.gz [--kernels]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\(")  # name, shape (tuples too), opcode


def _tables(lines):
    """The HLO's stack-frame tables: {table: {id: fields}} (file and function names as strings)."""
    tables, current = {name: {} for name in _TABLES}, None
    for line in lines:
        if line in _TABLES:
            current = line
        elif current and line and line[0].isdigit():
            number, rest = line.split(" ", 1)
            fields = dict(re.findall(r"(\w+)=(\d+)", rest)) or rest.strip().strip('"').rsplit("/", 1)[-1]
            tables[current][int(number)] = fields
        elif not line.startswith(" ") and not (line and line[0].isdigit()):
            current = None
    return tables


def kernel_sources(hlo_text: str, kernels: dict[str, float]) -> dict[str, dict]:
    """{kernel: {ms, op, source}}: each profiled kernel's HLO instruction, op name and first project source line
    ("file:function:line", or "?")."""
    lines = hlo_text.splitlines()
    tables = _tables(lines)

    def source(frame: int) -> str:
        seen = set()
        while frame in tables["StackFrames"] and frame not in seen:
            seen.add(frame)
            location = tables["FileLocations"].get(int(tables["StackFrames"][frame]["file_location_id"]), {})
            if location:
                file_name = tables["FileNames"].get(int(location["file_name_id"]), "?")
                function = tables["FunctionNames"].get(int(location["function_name_id"]), "?")
                if file_name.endswith(".py") and file_name != "api.py":  # the frame that made it, not the entry
                    return f"{file_name}:{function}:{location['line']}"
            frame = int(tables["StackFrames"][frame].get("parent_frame_id", 0))
        return "?"

    computations, current, instructions = {}, None, {}
    for line in lines:
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line.strip())
            match = _INSTRUCTION.match(line.strip())
            if match:
                instructions[match.group(1).replace(".", "_")] = line.strip()
    result = {}
    for kernel, ms in kernels.items():
        line = instructions.get(kernel) or instructions.get(re.sub(r"_\d+$", "", kernel))
        if line is None:
            result[kernel] = {"ms": ms, "op": None, "source": None}  # a custom kernel, cuDNN, cub, memcpy
            continue
        called = re.search(r"calls=%([\w.\-]+)", line)
        frames = [
            re.search(r"stack_frame_id=(\d+)", text)
            for text in [line, *computations.get(called and called.group(1), [])]
        ]
        sources = collections.Counter(source(int(frame.group(1))) for frame in frames if frame)
        sources.pop("?", None)
        op = re.search(r'op_name="([^"]+)"', line)
        result[kernel] = {
            "ms": ms,
            "op": op.group(1).rsplit("/", 1)[-1] if op else None,
            "source": sources.most_common(1)[0][0] if sources else "?",
        }
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a profile_single_layer.py JSON")
    parser.add_argument("mode", help="e.g. causal_fwd")
    parser.add_argument("hlo", help="that mode's MODE.hlo.txt.gz from --hlo-dir")
    parser.add_argument("--kernels", action="store_true", help="list every small kernel, not only the sums")
    args = parser.parse_args()
    kernels = json.load(open(args.profile))["profile"][args.mode]["kernels"]
    with gzip.open(args.hlo, "rt") as f:
        found = kernel_sources(f.read(), kernels)
    small = {name: row for name, row in found.items() if row["op"] is not None}
    by_source = collections.defaultdict(lambda: [0.0, 0])
    for name, row in small.items():
        key = row["source"] if row["source"] != "?" else f"? ({row['op']})"
        by_source[key][0] += row["ms"]
        by_source[key][1] += 1
        if args.kernels:
            print(f"{row['ms']:.4f} ms  {name}  {row['op']}  {row['source']}")
    total = sum(row["ms"] for row in small.values())
    print(f"{args.mode}: {total:.3f} ms in {len(small)} XLA kernels (custom kernels, cuDNN and cub left out)")
    for key, (ms, count) in sorted(by_source.items(), key=lambda item: -item[1][0]):
        print(f"  {ms:.4f} ms in {count:3d}  {key}")


if __name__ == "__main__":
    main()
