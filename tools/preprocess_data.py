"""Tokenize JSONL documents into megatron-format indexed datasets.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/web \\
        --tokenizer tokenizer.model --json-keys text --append-eod --workers 16

writes data/web_text_document.bin/.idx (one PREFIX_{key}_document pair per JSON key, as
Megatron names them), readable by megatron-core's IndexedDataset. Input: JSONL files, plain,
.gz or .zst, given as paths or glob patterns, read in the order given. Each JSON line is one
document; `--append-eod` ends each with the tokenizer's end-of-document id so that packed
samples show where documents meet. The tokenizer is a sentencepiece .model file or a Hugging
Face tokenizer.json (or a directory holding one). Tokens are stored as uint16 when the
vocabulary fits, int32 otherwise. The output is byte-identical whatever --workers and
--partitions are.

Bad input (invalid UTF-8 or JSON, a missing key, a non-string or empty document) stops the run
with `file:line: reason` and leaves nothing under the output names; with --skip-bad-lines such
lines are counted, reported and left out instead.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import pretrain  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.preprocess import (
    PreprocessError,
    Progress,
    check_output_directory,
    expand_inputs,
    output_prefixes,
    preprocess,
)
from pretrain.data.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns (.jsonl, .gz, .zst)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file or Hugging Face tokenizer.json")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize (default: text)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer processes, one thread each (default: one per core)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="split the input into this many ranges, each read, tokenized and written by its own "
        "process with workers/partitions workers, concatenated at the end (for very many cores)",
    )
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip lines that are not valid JSON objects with non-empty text, and count them, "
        "instead of stopping at the first",
    )
    parser.add_argument("--log-interval", type=float, default=None, help="seconds between progress lines")
    parser.add_argument("--chunk-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")
    if args.partitions > args.workers:
        parser.error(f"--partitions ({args.partitions}) cannot exceed --workers ({args.workers}): each needs a worker")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys repeats a key: {args.json_keys}")
    try:
        paths = expand_inputs(args.input)
    except PreprocessError as exc:
        parser.error(str(exc))

    # The quickstart writes under a fresh data/ directory: created here rather than failing.
    # Checked before the tokenizer loads and anything is tokenized (exit 2: a bad request).
    try:
        check_output_directory(args.output_prefix)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = Progress(sum(os.path.getsize(p) for p in paths), interval=args.log_interval)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        stats = preprocess(
            paths,
            output_prefix=args.output_prefix,
            tokenizer=tokenizer,
            keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            partitions=args.partitions,
            skip_bad_lines=args.skip_bad_lines,
            chunk_bytes=args.chunk_bytes,
            progress=progress,
        )
    except ValueError as exc:  # PreprocessError, tokenizer and dataset errors: the user's to fix
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was written under the output prefix", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("interrupted; nothing was written under the output prefix", file=sys.stderr)
        return 130
    progress.close()
    print(f"done: {progress.line()}", file=sys.stderr)
    if stats.skipped:
        print(f"skipped {stats.skipped} bad line(s); the first:", file=sys.stderr)
        for example in stats.examples:
            print(f"  {example}", file=sys.stderr)
    for prefix in output_prefixes(args.output_prefix, args.json_keys):
        print(f"wrote {prefix}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
