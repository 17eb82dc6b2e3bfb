"""Concatenate several indexed datasets (`PREFIX.bin/.idx`) into one.

    python tools/merge_datasets.py --input data/shard_0_text_document data/shard_1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

Inputs are prefixes (with or without .bin/.idx), glob patterns of them, or directories (every
pair inside, in name order), merged in the order given. Their token dtypes must match. Sequences
and document boundaries are kept (also megatron's multi-sequence documents); the result is
read by megatron-core like any other. It is written under temporary names and renamed at the
end, so an interrupted merge leaves nothing under the output name.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

try:
    import pretrain  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.indexed import merge_datasets


def _strip(path: str) -> str:
    return path[: -len(".idx")] if path.endswith((".idx", ".bin")) else path


def expand_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(_strip(p) for p in glob.glob(os.path.join(item, "*.idx")))
            if not found:
                raise ValueError(f"directory {item!r} holds no .idx files")
            prefixes.extend(found)
        elif glob.has_magic(item):
            found = sorted({_strip(p) for p in glob.glob(item) if p.endswith((".idx", ".bin"))})
            if not found:
                raise ValueError(f"no dataset matches {item!r}")
            prefixes.extend(found)
        else:
            prefixes.append(_strip(item))
    return prefixes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes, globs or directories")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx")
    args = parser.parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        merged = merge_datasets(prefixes, args.output_prefix)
    except ValueError as exc:  # includes IndexedDatasetError: names the file and the problem
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets: {len(merged)} sequences, {merged.num_tokens} tokens -> "
        f"{args.output_prefix}.bin/.idx",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
