"""Tokenize JSONL documents into megatron-format indexed datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/stdlib \\
        --tokenizer tokenizer.model --append-eod --workers 2

writes data/stdlib_text_document.bin/.idx (one PREFIX_{key}_document pair per JSON key, as
Megatron names them). Each JSON line becomes one document; `--append-eod` ends each with the
tokenizer's end-of-document id so that packed samples show where documents meet. The output
is byte-identical whatever the number of workers. On any error nothing is left under the final
names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

try:
    import pretrain  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

# Documents are tokenized in batches of about this many bytes: large enough to keep every
# sentencepiece thread busy, small enough to bound memory on any corpus.
_BATCH_BYTES = 4 << 20
_BATCH_DOCS = 4096
_PROGRESS_SECONDS = 5.0


def iter_batches(
    paths: list[str], *, keys: list[str]
) -> Iterator[tuple[list[list[str]], int]]:
    """Yield ([texts of key 0, texts of key 1, ...], raw bytes read) batches, in input order.

    Blank lines are skipped; any other line that is not a JSON object with every key holding a
    string is an error naming file and line.
    """
    texts: list[list[str]] = [[] for _ in keys]
    size = 0
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
                for i, key in enumerate(keys):
                    if key not in record:
                        present = ", ".join(repr(k) for k in list(record)[:10])
                        raise ValueError(
                            f"{where}: no key {key!r} (keys present: {present}); choose the field with --json-keys"
                        )
                    value = record[key]
                    if not isinstance(value, str):
                        raise ValueError(f"{where}: {key!r} holds {type(value).__name__}, not a string")
                    texts[i].append(value)
                size += len(raw)
                if size >= _BATCH_BYTES or len(texts[0]) >= _BATCH_DOCS:
                    yield texts, size
                    texts, size = [[] for _ in keys], 0
    if texts[0]:
        yield texts, size


class Progress:
    """Throughput lines on stderr, at most one every few seconds, and a final summary."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.docs = self.bytes = self.tokens = 0

    def update(self, *, docs: int, nbytes: int, tokens: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_SECONDS:
            self.last = now
            print(f"processed {self.line(now)}", file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        return (
            f"{self.docs} docs, {self.bytes / 1e6:.1f} MB, {self.tokens} tokens in {elapsed:.1f}s "
            f"({self.docs / elapsed:.0f} docs/s, {self.bytes / 1e6 / elapsed:.2f} MB/s)"
        )


def preprocess(
    paths: list[str],
    *,
    output_prefix: str,
    tokenizer: Tokenizer,
    keys: list[str],
    append_eod: bool,
    workers: int,
) -> Progress:
    """Tokenize every input line into one dataset per key; raise ValueError on bad input."""
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    progress = Progress()
    with contextlib.ExitStack() as stack:
        # Each writer deletes its temporary files if anything below raises.
        writers = [
            stack.enter_context(IndexedDatasetWriter(f"{output_prefix}_{key}_document", dtype=dtype))
            for key in keys
        ]
        for texts, nbytes in iter_batches(paths, keys=keys):
            tokens = 0
            for writer, batch in zip(writers, texts, strict=True):
                for ids in tokenizer.encode_batch(batch, num_threads=workers):
                    if append_eod:
                        ids.append(tokenizer.eod)
                    writer.add_document(ids)
                    tokens += len(ids)
            progress.update(docs=len(texts[0]), nbytes=nbytes, tokens=tokens)
    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files, read in the order given")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize (default: text)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads (default: one per core)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys repeats a key: {args.json_keys}")
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"input file not found: {path}")

    # The quickstart writes under a fresh data/ directory; create it rather than fail.
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        progress = preprocess(
            args.input,
            output_prefix=args.output_prefix,
            tokenizer=tokenizer,
            keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: {progress.line(time.perf_counter())}", file=sys.stderr)
    for key in args.json_keys:
        print(f"wrote {args.output_prefix}_{key}_document.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
