"""Looking inside token files and a run's data stream (tools/inspect_data.py is the command).

- `prefix_stats`: documents, tokens and document-length percentiles of each prefix of a blend.
- `length_histogram`: a PNG of the document lengths, one series per prefix.
- `first_out_of_vocab`: the first token id at or above a vocabulary size (or negative), with its
  document and position: what a model of that vocabulary would fail on.
- `micro_batches_at`: the samples a data-parallel rank reads at a step of a run, found by the
  run's own data code (its stages, datasets and loader), not recomputed here.

Every prefix is opened by IndexedDataset, which validates .bin against .idx first, so a missing
or truncated file is reported as such before anything is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pretrain.data.indexed import IndexedDataset

# Tokens compared per pass of --check-vocab: 64 MiB of int32, whatever the file's size.
_SCAN_TOKENS = 1 << 24


@dataclass(frozen=True)
class PrefixStats:
    prefix: str
    weight: float
    dtype: str
    documents: int
    tokens: int
    p50: int
    p90: int
    p99: int
    max: int

    @staticmethod
    def of(dataset: IndexedDataset, weight: float = 1.0) -> PrefixStats:
        lengths = np.asarray(dataset.sequence_lengths)
        p50, p90, p99 = (int(round(v)) for v in np.percentile(lengths, [50, 90, 99])) if len(lengths) else (0, 0, 0)
        return PrefixStats(
            prefix=dataset.prefix,
            weight=weight,
            dtype=str(dataset.dtype),
            documents=len(dataset),
            tokens=dataset.num_tokens,
            p50=p50,
            p90=p90,
            p99=p99,
            max=int(lengths.max()) if len(lengths) else 0,
        )


def open_blend(blend: list[tuple[float, str]]) -> list[tuple[float, IndexedDataset]]:
    """Each (weight, prefix) opened and validated (IndexedDatasetError names a bad file)."""
    return [(weight, IndexedDataset(prefix)) for weight, prefix in blend]


def summary_table(stats: list[PrefixStats]) -> str:
    """One row per prefix (weights and a total row when there are several)."""
    blend, total = len(stats) > 1, sum(s.weight for s in stats)
    width = max(len("prefix"), *(len(s.prefix) for s in stats))
    header = f"{'prefix':<{width}} {'weight':>6} {'dtype':>6} {'documents':>11} {'tokens':>14}"
    rows = [header + f" {'p50':>7} {'p90':>7} {'p99':>8} {'max':>9}   (document lengths in tokens)"]
    for s in stats:
        weight = f"{s.weight / total:.3f}" if blend else "-"
        rows.append(
            f"{s.prefix:<{width}} {weight:>6} {s.dtype:>6} {s.documents:>11,} {s.tokens:>14,}"
            f" {s.p50:>7,} {s.p90:>7,} {s.p99:>8,} {s.max:>9,}"
        )
    if blend:
        documents, tokens = sum(s.documents for s in stats), sum(s.tokens for s in stats)
        rows.append(f"{'total':<{width}} {'':>6} {'':>6} {documents:>11,} {tokens:>14,}")
    return "\n".join(rows)


def length_histogram(datasets: list[IndexedDataset], output: str, *, bins: int = 60) -> None:
    """Documents per length bin (log-spaced: lengths span orders of magnitude), one step line
    per prefix, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    longest = max((int(np.max(ds.sequence_lengths)) for ds in datasets if len(ds)), default=1)
    edges = np.unique(np.geomspace(1, max(longest, 2) + 1, bins + 1).astype(np.int64))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for ds in datasets:
        counts, _ = np.histogram(np.maximum(ds.sequence_lengths, 1), bins=edges)
        ax.stairs(counts, edges, label=f"{ds.prefix} ({len(ds):,} documents)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title("document lengths")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class OutOfVocab:
    prefix: str
    document: int
    position: int  # token position within the document
    token_id: int
    count: int  # tokens of this prefix out of range, in all

    def describe(self, vocab_size: int) -> str:
        more = f"; {self.count:,} tokens of it are out of range in all" if self.count > 1 else ""
        return (
            f"{self.prefix}.bin: document {self.document}, token {self.position}: id {self.token_id} is not in "
            f"[0, {vocab_size}){more}"
        )


def first_out_of_vocab(dataset: IndexedDataset, vocab_size: int) -> OutOfVocab | None:
    """The first token outside [0, vocab_size) in file order, or None; a chunked scan, so memory
    stays bounded for any file size."""
    tokens, first, count = dataset.tokens, None, 0
    for start in range(0, len(tokens), _SCAN_TOKENS):
        chunk = tokens[start : start + _SCAN_TOKENS]
        bad = chunk >= vocab_size
        if np.issubdtype(chunk.dtype, np.signedinteger):
            bad |= chunk < 0
        n = int(np.count_nonzero(bad))
        if n and first is None:
            first = start + int(np.argmax(bad))
        count += n
    if first is None:
        return None
    starts = np.asarray(dataset.sequence_pointers) // dataset.dtype.itemsize
    document = int(np.searchsorted(starts, first, side="right")) - 1
    # Empty documents share their pointer with the next one: searchsorted's right side skips them.
    return OutOfVocab(dataset.prefix, document, first - int(starts[document]), int(tokens[first]), count)


def decode_with_boundaries(tokenizer, ids) -> str:
    """Text of `ids` with each end-of-document token shown as `<eod>` on its own line (decoders
    drop it, and a packed sample spans several documents)."""
    ids = [int(i) for i in ids]
    pieces, current = [], []
    for token in ids:
        if token == tokenizer.eod:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    pieces.append(tokenizer.decode(current))
    return "\n<eod>\n".join(pieces)


@dataclass(frozen=True)
class MicroBatchView:
    """One micro-batch of a data-parallel rank at a step, as the run's loader gives it."""

    index: int  # the micro-batch's number within the step (gradient accumulation)
    positions: np.ndarray  # int64 [b]: positions in the stage's sample stream
    samples: np.ndarray  # int64 [b]: indices into the stage's dataset
    origins: list[str]  # where each sample starts: file, document and token
    tokens: np.ndarray  # int64 [b, s]: the model's input


def last_rollback_before(metrics: str, step: int) -> tuple[int, dict] | None:
    """(the checkpoint step it went back to, the data position it continued from) of the last
    rollback in a run's metrics.jsonl that `step` trains after; None when there is none.

    A rollback keeps the loader's place (the batches that led to it are skipped), so the steps
    after it read from there. The file holds the run's final timeline: a rollback or a resume
    drops the records of the steps it abandons."""
    found = None
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            rollback = record.get("rollback") if isinstance(record, dict) else None
            if isinstance(rollback, dict) and isinstance(record.get("step"), int) and record["step"] < step:
                if "data_position" not in rollback:
                    raise ValueError(
                        f"{metrics}: the rollback at step {record['step']} does not record its data position "
                        "(a run from before it was logged); positions after it cannot be told"
                    )
                found = (record["step"], rollback["data_position"])
    return found


def micro_batches_at(
    config, *, step: int, dp_rank: int, world_size: int, rollback: tuple[int, dict] | None = None
) -> tuple[str, list[MicroBatchView]]:
    """(the stage's description, the micro-batches) data-parallel rank `dp_rank` reads at `step`
    of `config`'s run on `world_size` ranks. `rollback` (`last_rollback_before`): the steps after
    it read on from its data position; None: no rollback skipped data before `step`.

    The datasets come from pretrain.data.setup.build_data (the index caches are built here when
    missing, as a run's rank 0 would) and the positions from the stage's own SampleLoader."""
    from pretrain.config import validate_layout
    from pretrain.data.loader import SampleLoader
    from pretrain.data.setup import build_data
    from pretrain.parallel.topology import CPU, Topology

    dp = validate_layout(config, world_size)
    if not 0 <= dp_rank < dp:
        raise ValueError(f"--dp-rank {dp_rank} is not a data-parallel rank of {world_size} ranks (there are {dp})")
    if not 1 <= step <= config.train.steps:
        raise ValueError(f"--step {step} is not a step of this run (1..train.steps={config.train.steps})")
    # One process stands in for the data-parallel group: it builds what rank 0 would (no barrier).
    view = Topology(world_size=1, rank=0, tp=1, pp=1, dp=dp, virtual_stages=1, sequence_parallel=False, device=CPU)
    staged = build_data(config, view).train
    start = 0
    if rollback is not None:
        start = rollback[0]
        staged.load_state_dict(rollback[1])
    for earlier in range(start + 1, step):  # each step reads one global batch of its stage
        staged.loaders[staged.stage_of(earlier)].consumed_samples += config.global_batch(dp)
    k = staged.stage_of(step)
    stage, base = staged.stages[k], staged.loaders[k]
    loader = SampleLoader(
        base.dataset,
        micro_batch_size=base.micro_batch_size,
        seed=base.seed,
        dp_rank=dp_rank,
        dp_size=dp,
        consumed_samples=base.consumed_samples,
        collate=base.collate,
    )
    views = []
    for m in range(config.accumulation_steps(dp)):
        positions, samples = loader.peek()
        origins = [_origin(base.dataset, int(i)) for i in samples]
        views.append(MicroBatchView(m, positions, samples, origins, next(loader)["tokens"].numpy()))
    return stage.describe(len(staged.stages)), views


def _origin(dataset, sample: int) -> str:
    locate = getattr(dataset, "locate", None)
    return locate(sample, 0) if locate is not None else f"sample {sample}"
