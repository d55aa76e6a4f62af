"""Command line: pre-fetch the model and texts, list documents, capture q/k/v into the cache.

python3 -m hyperattn_jax.data fetch                               # GGUF + texts into the cache folder
python3 -m hyperattn_jax.data list [--kinds prose code]           # names and kinds of the documents
python3 -m hyperattn_jax.data capture shakespeare/hamlet --layers 2 8 15 --tokens 8192
"""

from __future__ import annotations

import argparse
import time

from hyperattn_jax.data import KINDS, cache_dir, capture_qkv, documents, smollm2_gguf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m hyperattn_jax.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="download the SmolLM2 GGUF and the public-domain texts")
    listing = commands.add_parser("list", help="list the documents")
    listing.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    grab = commands.add_parser("capture", help="capture post-RoPE q/k/v of SmolLM2 layers on a document")
    grab.add_argument("document", help='e.g. "shakespeare/hamlet", "milton/areopagitica", "stdlib/typing.py"')
    grab.add_argument("--layers", type=int, nargs="+", default=[15])
    grab.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)

    print(f"cache folder: {cache_dir()}")
    if args.command == "fetch":
        print(f"model: {smollm2_gguf()}")
        print(f"documents: {len(documents())}")
    elif args.command == "list":
        for doc in documents(kinds=tuple(args.kinds)):
            print(f"{doc.kind:<6} {doc.name}")
    else:
        start = time.perf_counter()
        for layer, qkv in capture_qkv(args.document, args.layers, args.tokens).items():
            print(f"layer {layer}: q {qkv.q.shape}, k {qkv.k.shape}, v {qkv.v.shape}, scale {qkv.scale}")
        print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
