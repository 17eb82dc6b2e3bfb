"""A preprocessing run split into partitions (`--partitions`), as megatron's tool splits it:
contiguous ranges of the inputs, each tokenized by its own process with its own workers into a
temporary dataset, concatenated in order at the end. With dedup, each partition drops its own
repeats and the merge drops what an earlier partition kept, which gives the output of one
partition reading everything."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
from collections.abc import Callable, Sequence

import numpy as np

from pretrain.data.chunk_encoder import ChunkEncoder
from pretrain.data.dedup import HASH_DTYPE, SeenSet
from pretrain.data.encode_pipeline import process_context, tokenize_into
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from pretrain.data.run_stats import Stats, require_documents, sum_stats
from pretrain.data.sources import PreprocessError, Source, plan_partitions


def _partition_main(args: tuple) -> None:
    """Entry of a partition process: write its own temporary datasets, report through a queue."""
    index, units, sources, prefixes, encoder, workers, chunk_bytes, hash_path, counters, queue = args

    def report(docs: int, nbytes: int, tokens: int, read: int) -> None:
        with counters.get_lock():
            for j, v in enumerate((docs, nbytes, tokens, read)):
                counters[4 * index + j] += v

    try:
        stats = tokenize_into(
            prefixes,
            units,
            sources,
            encoder,
            workers=workers,
            chunk_bytes=chunk_bytes,
            on_progress=report,
            hash_path=hash_path,
            allow_empty=True,
        )
        queue.put((index, None, stats))
    except PreprocessError as exc:
        queue.put((index, str(exc), None))
    except BaseException as exc:
        queue.put((index, f"partition {index} failed: {type(exc).__name__}: {exc}", None))


def _forward_progress(counters, seen: list[int], update: Callable[[int, int, int, int], None]) -> list[int]:
    """Pass on what the partitions counted since `seen` (the totals last passed on); returns the new totals."""
    partitions = len(counters) // 4
    with counters.get_lock():
        now = [sum(counters[4 * k + j] for k in range(partitions)) for j in range(4)]
    update(*(a - b for a, b in zip(now, seen, strict=True)))
    return now


def _await_partitions(
    procs: Sequence[mp.process.BaseProcess],
    queue,
    counters,
    update: Callable[[int, int, int, int], None] | None,
) -> list[Stats]:
    """Each partition's Stats, in order, once all have finished; raises the first failure."""
    outcomes: dict[int, tuple[str | None, Stats | None]] = {}
    seen = [0] * 4
    while len(outcomes) < len(procs):
        try:
            k, error, stats = queue.get(timeout=0.2)
            outcomes[k] = (error, stats)
        except queue_module.Empty:
            dead = [k for k, p in enumerate(procs) if p.exitcode not in (None, 0) and k not in outcomes]
            if dead:
                outcomes[dead[0]] = (f"partition {dead[0]} died (exit code {procs[dead[0]].exitcode})", None)
        failed = sorted(k for k, (error, _) in outcomes.items() if error)
        # Report the first error in input order as soon as no earlier partition can fail.
        if failed and all(j in outcomes for j in range(failed[0])):
            raise PreprocessError(outcomes[failed[0]][0])
        if update is not None:
            seen = _forward_progress(counters, seen, update)
    parts = [outcomes[k][1] for k in range(len(procs))]
    assert all(s is not None for s in parts)  # any failure was raised above
    return parts


def _append_kept(writer: IndexedDatasetWriter, part: IndexedDataset, keep: np.ndarray, block: int = 1 << 24) -> None:
    """Append the documents of `part` where `keep`, about `block` tokens at a time."""
    if keep.all():
        writer.add_dataset(part)
        return
    lengths = part.sequence_lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    start = 0
    while start < len(lengths):
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + block, side="right")))
        tokens = part.tokens[base : int(ends[stop - 1])]
        mask = keep[start:stop]
        writer.add_documents(np.asarray(tokens[np.repeat(mask, lengths[start:stop])]), lengths[start:stop][mask])
        start = stop


def _merge_partitions(
    part_prefixes: Sequence[Sequence[str]], prefixes: Sequence[str], hash_paths: Sequence[str] | None, total: Stats
) -> None:
    """Concatenate the partitions' datasets into `prefixes`, in order. With dedup, a document is
    left out when an earlier partition kept the same text (each partition has dropped its own
    repeats already), which gives what one partition reading everything would have kept."""
    keeps = []
    seen = SeenSet()
    for k in range(len(part_prefixes)):
        hashes = np.fromfile(hash_paths[k], dtype=HASH_DTYPE) if hash_paths else None
        keeps.append(seen.add_new(hashes) if hashes is not None else None)
    for j, prefix in enumerate(prefixes):
        parts = [IndexedDataset(p[j]) for p in part_prefixes]
        with IndexedDatasetWriter(prefix, dtype=parts[0].dtype) as writer:
            for part, keep in zip(parts, keeps):
                if keep is None:
                    writer.add_dataset(part)
                    continue
                _append_kept(writer, part, keep)
                total.tokens -= int(part.sequence_lengths[~keep].astype(np.int64).sum())
    if hash_paths:
        dropped = sum(int((~keep).sum()) for keep in keeps)
        total.docs -= dropped
        total.skips["duplicate"] += dropped


def run_partitions(
    sources: Sequence[Source],
    prefixes: Sequence[str],
    encoder: ChunkEncoder,
    scratch: str,
    *,
    workers: int,
    partitions: int,
    chunk_bytes: int,
    update: Callable[[int, int, int, int], None] | None,
) -> Stats:
    """Tokenize each partition in its own process into datasets under `scratch`, then merge
    them in order into `prefixes`."""
    plan = plan_partitions(sources, partitions)
    share = [workers // partitions + (k < workers % partitions) for k in range(partitions)]
    ctx = process_context()
    counters = ctx.Array("q", 4 * partitions)
    queue = ctx.Queue()
    part_prefixes = [[os.path.join(scratch, f"p{k}_{j}") for j in range(len(prefixes))] for k in range(partitions)]
    hash_paths = [os.path.join(scratch, f"p{k}.hashes") for k in range(partitions)] if encoder.dedup else None
    procs = [
        ctx.Process(
            target=_partition_main,
            args=(
                (
                    k,
                    plan[k],
                    sources,
                    part_prefixes[k],
                    encoder,
                    share[k],
                    chunk_bytes,
                    hash_paths[k] if hash_paths else None,
                    counters,
                    queue,
                ),
            ),
        )
        for k in range(partitions)
    ]
    try:
        for p in procs:
            p.start()
        total = sum_stats(_await_partitions(procs, queue, counters, update))
        require_documents(total)
        _merge_partitions(part_prefixes, prefixes, hash_paths, total)
        return total
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
