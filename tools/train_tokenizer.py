"""Train a sentencepiece tokenizer on JSONL text, with settings that suit source code.

    python tools/train_tokenizer.py --input corpus.jsonl --output tokenizer --vocab-size 8000

writes tokenizer.model and tokenizer.vocab. Special ids: unk=0, bos=1, eos=2, pad=3, <mask>=4;
eos is the end-of-document token that `preprocess_data.py --append-eod` appends, <mask> the
masked-LM mask token (`pretrain/data/masking.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterator

import sentencepiece as spm


def iter_texts(paths: list[str], *, json_key: str) -> Iterator[str]:
    """Yield the `json_key` field of each line; malformed lines are errors naming file:line."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or json_key not in record:
                    raise ValueError(f"{path}:{lineno}: no key {json_key!r} in this JSON line")
                text = record[json_key]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string")
                yield text


def split_into_sentences(text: str, *, max_bytes: int) -> Iterator[str]:
    """Cut a document into pieces of at most `max_bytes` UTF-8 bytes, on line boundaries.

    sentencepiece trains on "sentences" and silently drops any longer than its
    max_sentence_length, which would drop every whole source file. Newlines stay inside the
    pieces so that the model learns them (and pieces such as ":\\n") as ordinary characters.
    """
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:  # one very long line: cut it by characters (4 bytes at most each)
            step = max(1, max_bytes // 4)
            for i in range(0, len(line), step):
                yield line[i : i + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def trainer_options(args: argparse.Namespace) -> dict:
    """The sentencepiece options; each departure from its defaults is there for code."""
    return dict(
        model_prefix=args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        # Reserved for masked-LM training (id 4). A control symbol, so no text ever encodes to
        # it, not even a literal "<mask>".
        control_symbols=["<mask>"],
        # Keep text exactly as written: no NFKC rewriting, no collapsing of runs of spaces
        # (indentation is syntax), no invented leading space; so decode(encode(x)) == x.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        # Indentation runs ("▁▁▁▁", "▁▁▁▁▁▁▁▁") become single pieces.
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # Rare characters (non-ASCII in strings and comments) fall back to byte pieces instead
        # of <unk>, so nothing is lost.
        byte_fallback=True,
        character_coverage=args.character_coverage,
        max_sentence_length=args.max_sentence_length,
        # A random sample of sentences bounds training time and memory on large corpora.
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=args.threads,
        minloglevel=2,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--json-key", default="text")
    parser.add_argument(
        "--max-sentence-length",
        type=int,
        default=4096,
        help="documents are cut on line boundaries into training sentences of at most this many bytes",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=200_000,
        help="train on a random sample of at most this many sentences (0: all)",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters given their own piece; rarer ones become byte pieces",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence sampling")
    args = parser.parse_args(argv)

    if args.vocab_size < 8:
        parser.error("--vocab-size must be at least 8 (4 special pieces plus the text's characters)")
    if not 0 < args.character_coverage <= 1:
        parser.error("--character-coverage must lie in (0, 1]")
    if args.max_sentence_length < 16:
        parser.error("--max-sentence-length must be at least 16 bytes")
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"input file not found: {path}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        parser.error(f"the directory of --output does not exist: {out_dir}")

    # sentencepiece's own sampling uses an unseeded RNG; seed it so runs are repeatable.
    spm.set_random_generator_seed(args.seed)
    random.seed(args.seed)
    sentences = (
        s
        for text in iter_texts(args.input, json_key=args.json_key)
        for s in split_into_sentences(text, max_bytes=args.max_sentence_length)
    )
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.Train(sentence_iterator=sentences, **trainer_options(args))
    except ValueError as exc:  # our own file:line errors from the iterator
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
        print(f"error: sentencepiece training failed: {str(exc).strip()}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    sp = spm.SentencePieceProcessor(model_file=f"{args.output}.model")
    print(
        f"trained a {args.model_type} tokenizer of {sp.vocab_size()} pieces in {elapsed:.1f}s: "
        f"{args.output}.model, {args.output}.vocab",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
