"""Tokenize documents (JSONL, Parquet or Arrow) into megatron-format indexed datasets.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/web \\
        --tokenizer tokenizer.model --json-keys text --append-eod --workers 16

writes data/web_text_document.bin/.idx (one PREFIX_{key}_document pair per JSON key, as
Megatron names them), readable by megatron-core's IndexedDataset. Input, given as paths, glob
patterns or directories, read in the order given: JSONL files (plain, .gz or .zst; one JSON
object per line), Parquet files (*.parquet) and Arrow files or directories written by
Hugging Face `datasets.save_to_disk`; for the columnar ones --json-keys names the columns. A
directory that is not a `save_to_disk` dataset stands for its .parquet, .arrow and .jsonl files,
sorted. `--append-eod` ends each document with the tokenizer's end-of-document id so that
packed samples show where documents meet. The tokenizer is a sentencepiece .model file or a Hugging
Face tokenizer.json (or a directory holding one). Tokens are stored as uint16 when the
vocabulary fits, int32 otherwise. The output is byte-identical whatever --workers and
--partitions are.

Empty documents ("" or only whitespace) are left out and counted (--empty error stops at the
first instead); --dedup exact leaves out records whose normalised text came before. A malformed
record (invalid UTF-8 or JSON, a missing key, a non-string or null value) stops the run with
`file:line: reason` (`file: row N: reason` for Parquet and Arrow, rows counted from 0) and leaves
nothing under the output names; with --skip-bad-lines such records are counted and left out
instead. The summary lists what was left out, by kind. An input without any document to write
is an error (exit code 2).
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
    NoDocumentsError,
    PreprocessError,
    Progress,
    Stats,
    check_output_directory,
    expand_inputs,
    output_prefixes,
    preprocess,
    skip_summary,
)
from pretrain.data.tokenizer import load_tokenizer


def report_skips(stats: Stats) -> None:
    """What was left out, by kind, with the first few of each."""
    print(f"skipped: {skip_summary(stats)}", file=sys.stderr)
    for kind, examples in stats.examples.items():
        print(f"  the first {kind} record(s):", file=sys.stderr)
        for example in examples:
            print(f"    {example}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, glob patterns or directories: JSONL (.jsonl, .gz, .zst), Parquet, Arrow (datasets.save_to_disk)",
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file or Hugging Face tokenizer.json")
    parser.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON fields or columns to tokenize (default: text)",
    )
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
        help="skip malformed records (invalid UTF-8 or JSON, a missing key, a non-string or null value) "
        "and count them, instead of stopping at the first",
    )
    parser.add_argument(
        "--empty",
        choices=["skip", "error"],
        default="skip",
        help="documents that are empty or only whitespace: leave them out and count them (default), "
        "or stop at the first",
    )
    parser.add_argument(
        "--dedup",
        choices=["none", "exact"],
        default="none",
        help="exact: leave out records whose text (NFC, whitespace runs as one space, ends stripped) "
        "was seen before, the first occurrence in input order kept (16 bytes of memory per document)",
    )
    parser.add_argument("--log-interval", type=float, default=None, help="seconds between progress lines")
    parser.add_argument("--chunk-bytes", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    progress = Progress(sum(os.path.getsize(s.path) for s in paths), interval=args.log_interval)
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
            empty=args.empty,
            dedup=args.dedup == "exact",
            chunk_bytes=args.chunk_bytes,
            progress=progress,
        )
    except NoDocumentsError as exc:  # a bad request rather than bad data: exit code 2
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was written under the output prefix", file=sys.stderr)
        return 2
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
    report_skips(stats)
    for prefix in output_prefixes(args.output_prefix, args.json_keys):
        print(f"wrote {prefix}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
