"""Train a tokenizer on JSONL text, with settings that suit source code: a sentencepiece model
(the default) or a Hugging Face byte-level BPE `tokenizer.json` (as GPT-2 and Llama 3 use).

    python tools/train_tokenizer.py --input corpus.jsonl --output tokenizer --vocab-size 8000
    python tools/train_tokenizer.py --kind byte-level-bpe --input corpus.jsonl \
        --output tokenizer_dir --vocab-size 128000

The first writes tokenizer.model and tokenizer.vocab; the second the directory tokenizer_dir
with tokenizer.json and tokenizer_config.json, which `data.tokenizer` names (the directory or its
tokenizer.json) and transformers' AutoTokenizer loads as it is. Byte-level BPE training is
deterministic: the same input gives the same file whatever the thread count (for one version of
the `tokenizers` library).

Both kinds give the same special ids: unk=0, bos=1, eos=2, pad=3, <mask>=4; eos is the
end-of-document token that `preprocess_data.py --append-eod` appends, <mask> the masked-LM mask
token (`pretrain/data/masking.py`). `--vocab-size` counts them: the model's `model.vocab_size`
is the number printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Special pieces of both kinds, in id order (tools and configs may rely on eos=2, <mask>=4).
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>", "<mask>")
# Options that only sentencepiece training reads, with their defaults.
SENTENCEPIECE_DEFAULTS = {
    "model_type": "bpe",
    "max_sentence_length": 4096,
    "input_sentence_size": 200_000,
    "character_coverage": 0.9995,
    "seed": 0,
}


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


def byte_level_bpe(*, vocab_size: int, min_frequency: int):
    """An untrained byte-level BPE pipeline and its trainer.

    No normalizer, so text is kept exactly as written (decode(encode(x)) == x). Digits are split
    one by one before GPT-2's word split, as the sentencepiece kind does (split_digits): numbers
    are spelled from ten pieces rather than memorised one by one. The byte-level alphabet puts
    all 256 bytes in the vocabulary, so any text encodes and <unk> never appears.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_PIECES),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def write_tokenizer_dir(tokenizer, output: str) -> int:
    """Save tokenizer.json and the tokenizer_config.json that names its special tokens into the
    directory `output`; returns the vocabulary size. Both files are written beside it first and
    then moved in, so a stale tokenizer_config.json of an earlier run is never read for the new
    file, and an interrupted run leaves the old pair whole."""
    from pretrain.data.tokenizer import HFTokenizer

    os.makedirs(output, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=os.path.dirname(os.path.abspath(output)))
    try:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        ours = HFTokenizer(tmp)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(ours.tokenizer_config(), indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(output, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ours.vocab_size


def train_byte_level_bpe(args: argparse.Namespace) -> int:
    if args.threads is not None:  # read when the Rust thread pool starts, i.e. on first use
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    tokenizer, trainer = byte_level_bpe(vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    start = time.perf_counter()
    try:
        tokenizer.train_from_iterator(iter_texts(args.input, json_key=args.json_key), trainer=trainer)
    except ValueError as exc:  # our own file:line errors from the iterator
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    reached = tokenizer.get_vocab_size(with_added_tokens=True)
    if reached < args.vocab_size:
        # BPE stops once every word of the corpus is one piece (or no pair is frequent enough).
        print(
            f"error: the corpus yields only {reached} pieces, not --vocab-size {args.vocab_size} "
            f"(BPE stops when no pair of pieces occurs at least --min-frequency {args.min_frequency} "
            f"times); train on more text, lower --min-frequency, or ask for --vocab-size {reached}; "
            "nothing was written",
            file=sys.stderr,
        )
        return 1
    vocab_size = write_tokenizer_dir(tokenizer, args.output)
    print(
        f"trained a byte-level BPE tokenizer of {vocab_size} pieces in {elapsed:.1f}s: "
        f"{args.output}/tokenizer.json, {args.output}/tokenizer_config.json",
        file=sys.stderr,
    )
    return 0


def train_sentencepiece(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files")
    parser.add_argument(
        "--kind",
        choices=["sentencepiece", "byte-level-bpe"],
        default="sentencepiece",
        help="sentencepiece: PREFIX.model; byte-level-bpe: a Hugging Face tokenizer.json",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="sentencepiece: output prefix, writes PREFIX.model, PREFIX.vocab; "
        "byte-level-bpe: a directory, gets tokenizer.json and tokenizer_config.json",
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="pieces, special ones included")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--threads", type=int, default=None, help="threads to train with (default: all cores)")
    bpe = parser.add_argument_group("byte-level-bpe only")
    bpe.add_argument(
        "--min-frequency",
        type=int,
        default=None,
        help="learn a merge only from a pair seen at least this often (default 2: a pair seen once "
        "would spend a piece on memorising one spot of the corpus)",
    )
    sp = parser.add_argument_group("sentencepiece only")
    sp.add_argument("--model-type", choices=["bpe", "unigram"], default=None, help="default bpe")
    sp.add_argument(
        "--max-sentence-length",
        type=int,
        default=None,
        help="documents are cut on line boundaries into training sentences of at most this many bytes (default 4096)",
    )
    sp.add_argument(
        "--input-sentence-size",
        type=int,
        default=None,
        help="train on a random sample of at most this many sentences (0: all; default 200000)",
    )
    sp.add_argument(
        "--character-coverage",
        type=float,
        default=None,
        help="share of characters given their own piece; rarer ones become byte pieces (default 0.9995)",
    )
    sp.add_argument("--seed", type=int, default=None, help="seed of the sentence sampling (default 0)")
    return parser


def check_kind_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the other kind's options (a silently ignored option misleads), then fill defaults."""
    if args.kind == "byte-level-bpe":
        for name in SENTENCEPIECE_DEFAULTS:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag} is a sentencepiece option; --kind byte-level-bpe does not use it")
        args.min_frequency = 2 if args.min_frequency is None else args.min_frequency
        if args.min_frequency < 1:
            parser.error("--min-frequency must be at least 1")
        smallest = 256 + len(SPECIAL_PIECES)
        if args.vocab_size < smallest:
            parser.error(f"--vocab-size must be at least {smallest} (256 bytes plus the special pieces)")
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            parser.error(f"--output {args.output} is a file; byte-level-bpe writes a directory")
        return
    if args.min_frequency is not None:
        parser.error("--min-frequency is a byte-level-bpe option; sentencepiece does not use it")
    for name, default in SENTENCEPIECE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.vocab_size < 8:
        parser.error("--vocab-size must be at least 8 (4 special pieces plus the text's characters)")
    if not 0 < args.character_coverage <= 1:
        parser.error("--character-coverage must lie in (0, 1]")
    if args.max_sentence_length < 16:
        parser.error("--max-sentence-length must be at least 16 bytes")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_kind_options(parser, args)
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"input file not found: {path}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        parser.error(f"the directory of --output does not exist: {out_dir}")
    if args.kind == "byte-level-bpe":
        return train_byte_level_bpe(args)
    return train_sentencepiece(args)


if __name__ == "__main__":
    sys.exit(main())
