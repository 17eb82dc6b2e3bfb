"""Look inside token files (`PREFIX.bin/.idx`) or a run's data stream.

    python tools/inspect_data.py PREFIX                     # documents, tokens, length percentiles
    python tools/inspect_data.py "0.7 data/web 0.3 data/code" --histogram lengths.png
    python tools/inspect_data.py PREFIX --document 12 --tokenizer tokenizer.model
    python tools/inspect_data.py PREFIX --check-vocab 32000  # exit 1 at the first id >= 32000
    python tools/inspect_data.py --config run.yaml [key=value ...] --step 500 --dp-rank 3 --world-size 64

The summary has a row per prefix: its token dtype, documents, tokens, and the 50th, 90th and
99th percentile and the maximum of the document lengths in tokens (with weights normalised to 1
and a total for a blend). `--histogram` writes those lengths as a PNG (log-spaced bins).
`--document I` prints document I of a single prefix as text. `--check-vocab N` scans every
token: exit 1 naming the first document and position whose id is not below N.

`--config` reads a run config (with overrides, as `python -m pretrain.train` takes them): without
a path the summary covers its data (data.path, or every stage of data.stages). `--step S` prints
the micro-batches data-parallel rank `--dp-rank` reads at step S of that run on `--world-size`
ranks: the stage, each sample's stream position, dataset index and origin (file, document,
token), and its tokens decoded (end-of-document tokens shown as <eod>). A divergence rollback
skips the data that led to it, so the positions follow the run's rollbacks as its metrics.jsonl
records them (`--metrics`, default: the one in the config's logging.dir; without the file, no
rollback is assumed, and the output says so). The index caches are built when missing, as the
run's rank 0 would build them.

Exit codes: 0 done; 1 --check-vocab found an id out of range; 2 a mistake (a missing or
truncated prefix, a bad blend, a bad config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import load_config
from pretrain.data.blend import parse_data_path
from pretrain.data.inspect import (
    PrefixStats,
    decode_with_boundaries,
    first_out_of_vocab,
    last_rollback_before,
    length_histogram,
    micro_batches_at,
    open_blend,
    summary_table,
)
from pretrain.data.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="a prefix or 'w1 p1 w2 p2 ...'; with --config: key=value overrides")
    parser.add_argument("--config", help="a run config: its data, and --step's loader")
    parser.add_argument("--histogram", metavar="PNG", help="write a histogram of document lengths")
    parser.add_argument("--bins", type=int, default=60, help="histogram bins (default 60)")
    parser.add_argument("--document", type=int, metavar="I", help="print document I (a single prefix) as text")
    parser.add_argument("--check-vocab", type=int, metavar="N", help="every token id must be below N")
    parser.add_argument("--step", type=int, help="with --config: the step whose micro-batches to print")
    parser.add_argument("--dp-rank", type=int, default=0, help="data-parallel rank for --step (default 0)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the run for --step (default 1)")
    parser.add_argument(
        "--metrics", help="the run's metrics.jsonl, for its rollbacks (default: LOGGING_DIR/metrics.jsonl)"
    )
    parser.add_argument("--tokenizer", help="tokenizer to decode with (default: the config's data.tokenizer)")
    args = parser.parse_args(argv)
    if args.config is None and len(args.targets) != 1:
        parser.error("give one prefix or blend (quote a blend: 'w1 p1 w2 p2'), or --config RUN.yaml")
    if args.step is not None and args.config is None:
        parser.error("--step needs --config: which run's data and batch sizes")
    if args.check_vocab is not None and args.check_vocab < 1:
        parser.error(f"--check-vocab must be a positive vocabulary size, got {args.check_vocab}")
    if args.bins < 1:
        parser.error(f"--bins must be at least 1, got {args.bins}")
    return args


def blends_of(args: argparse.Namespace, config) -> list[list[tuple[float, str]]]:
    """The blends to summarise: the path given, or each stage of the config's run."""
    if config is None:
        return [parse_data_path(args.targets[0])]
    return [parse_data_path(path) for _, path in config.data.stage_plan(config.train.steps)]


def tokenizer_for(args: argparse.Namespace, config):
    path = args.tokenizer or (config.data.tokenizer if config is not None else "")
    if not path:
        raise ValueError("decoding needs a tokenizer: pass --tokenizer MODEL (sentencepiece .model or tokenizer.json)")
    if not Path(path).exists():
        raise ValueError(f"tokenizer {path} does not exist; pass --tokenizer MODEL")
    return load_tokenizer(path)


def print_summary(blends: list[list[tuple[float, str]]], args: argparse.Namespace) -> list:
    """The table per blend (one per stage); returns the opened datasets, each once."""
    opened: dict[str, object] = {}
    for i, blend in enumerate(blends):
        datasets = open_blend(blend)
        if len(blends) > 1:
            print(f"data stage {i + 1} of {len(blends)}:")
        print(summary_table([PrefixStats.of(ds, weight) for weight, ds in datasets]))
        opened.update({ds.prefix: ds for _, ds in datasets})
    datasets = list(opened.values())
    if args.histogram:
        length_histogram(datasets, args.histogram, bins=args.bins)
        print(f"wrote {args.histogram}")
    return datasets


def print_document(datasets: list, index: int, tokenizer) -> None:
    if len(datasets) != 1:
        raise ValueError("--document reads one prefix: give a single prefix, not a blend")
    ds = datasets[0]
    if not -len(ds) <= index < len(ds):
        raise ValueError(f"--document {index}: {ds.prefix} has {len(ds)} documents (0..{len(ds) - 1})")
    ids = ds[index]
    print(f"--- document {index} of {ds.prefix}: {len(ids):,} tokens ---")
    print(decode_with_boundaries(tokenizer, ids))


def check_vocab(datasets: list, vocab_size: int) -> int:
    """0 when every id of every prefix is below vocab_size; 1 (with the first offender) otherwise."""
    code = 0
    for ds in datasets:
        bad = first_out_of_vocab(ds, vocab_size)
        if bad is None:
            print(f"{ds.prefix}: all {ds.num_tokens:,} token ids are below {vocab_size}")
        else:
            print(f"error: {bad.describe(vocab_size)}", file=sys.stderr)
            code = 1
    return code


def rollback_for(config, args: argparse.Namespace) -> tuple[int, dict] | None:
    """The last rollback before --step in the run's metrics (None: none, or no metrics file)."""
    path = args.metrics or (str(Path(config.logging.dir) / "metrics.jsonl") if config.logging.dir else None)
    if args.metrics and not Path(args.metrics).is_file():
        raise ValueError(f"--metrics {args.metrics} does not exist")
    if path is None or not Path(path).is_file():
        print(f"(no {path or 'logging.dir'}: positions assume no rollback skipped data before step {args.step})")
        return None
    rollback = last_rollback_before(path, args.step)
    if rollback is None:
        print(f"(no rollback before step {args.step} in {path})")
    else:
        print(f"(after the rollback to step {rollback[0]} in {path}: reading on from where it left the data)")
    return rollback


def print_step(config, args: argparse.Namespace, tokenizer) -> None:
    stage, views = micro_batches_at(
        config,
        step=args.step,
        dp_rank=args.dp_rank,
        world_size=args.world_size,
        rollback=rollback_for(config, args),
    )
    print(f"step {args.step}, data-parallel rank {args.dp_rank}: {stage}")
    for view in views:
        print(
            f"micro-batch {view.index}: positions in the stage's stream {view.positions.tolist()}, "
            f"dataset samples {view.samples.tolist()}"
        )
        for position, origin, tokens in zip(view.positions, view.origins, view.tokens):
            print(f"--- position {int(position)}: {origin} ---")
            print(decode_with_boundaries(tokenizer, tokens))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.targets) if args.config else None
        datasets = print_summary(blends_of(args, config), args)
        if args.document is not None:
            print_document(datasets, args.document, tokenizer_for(args, config))
        if args.step is not None:
            print_step(config, args, tokenizer_for(args, config))
        return check_vocab(datasets, args.check_vocab) if args.check_vocab is not None else 0
    except ValueError as e:  # IndexedDatasetError, ConfigError, a bad blend or index
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
