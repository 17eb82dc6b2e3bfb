"""One partition of a preprocessing run, in input order: its units read in chunks, the chunks
encoded by a pool of worker processes (or in this process: a single worker, or a huge chunk,
which pickling to a worker would copy twice), the results collected in input order (duplicates
dropped, problems raised or counted) and written. Input order is what makes the output
independent of the number of workers."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pretrain.data.chunk_encoder import ChunkEncoder, ChunkResult
from pretrain.data.dedup import SeenSet
from pretrain.data.huge_records import HUGE_BYTES
from pretrain.data.indexed import IndexedDatasetWriter
from pretrain.data.run_stats import Stats, require_documents
from pretrain.data.sources import Chunk, PreprocessError, Source, Unit, iter_chunks, iter_row_chunks

_HUGE_CHUNK = HUGE_BYTES  # encoded in the main process: pickling it to a worker would copy it twice

_worker_encoder: ChunkEncoder | None = None


def _init_worker(encoder: ChunkEncoder) -> None:
    global _worker_encoder
    # One tokenizer thread per worker process; the Hugging Face backend would otherwise start
    # a thread per core in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


def _encode_in_worker(chunk: Chunk) -> ChunkResult:
    assert _worker_encoder is not None
    return _worker_encoder(chunk)


def process_context() -> mp.context.BaseContext:
    # fork shares the loaded tokenizer with the workers for free; spawn elsewhere.
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")


def line_number(path: str, result: ChunkResult, line_index: int, offset: int) -> int:
    """1-based line number of a bad line; counted from the file start when the chunk's is unknown."""
    if result.line is not None:
        return result.line + line_index
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


def _where(path: str, result: ChunkResult, index: int, offset: int) -> str:
    if result.rows:
        return f"{path}: row {result.line + index}"
    return f"{path}:{line_number(path, result, index, offset)}"


class _Collector:
    """Takes the encoded chunks in input order: drops duplicates (with dedup), writes their
    tokens, counts them, and turns their problems into an error or a counted skip."""

    def __init__(
        self,
        sources: Sequence[Source],
        writers: Sequence[IndexedDatasetWriter],
        on_progress: Callable[[int, int, int, int], None] | None,
        *,
        hash_file=None,
    ) -> None:
        self.sources = sources
        self.writers = writers
        self.on_progress = on_progress
        self.stats = Stats()
        self.read_bytes = 0  # raw input bytes read since the last progress report
        self.seen = SeenSet()
        self.hash_file = hash_file  # partitions: the kept documents' hashes, for the final merge

    def count_read(self, n: int) -> None:
        self.read_bytes += n

    def __call__(self, result: ChunkResult) -> None:
        self._problems(result)
        self.stats.skips.update(result.skips)
        tokens_per_key, lengths_per_key, docs = result.tokens, result.lengths, result.docs
        if result.hashes is not None:
            keep = self.seen.add_new(result.hashes)
            if self.hash_file is not None:
                self.hash_file.write(result.hashes[keep].tobytes())
            if not keep.all():
                docs = int(keep.sum())
                self.stats.skips["duplicate"] += result.docs - docs
                tokens_per_key = [t[np.repeat(keep, n)] for t, n in zip(tokens_per_key, lengths_per_key)]
                lengths_per_key = [n[keep] for n in lengths_per_key]
        tokens = 0
        for writer, flat, lengths in zip(self.writers, tokens_per_key, lengths_per_key, strict=True):
            writer.add_documents(flat, lengths)
            tokens += len(flat)
        self.stats.docs += docs
        self.stats.bytes += result.nbytes
        self.stats.tokens += tokens
        if self.on_progress is not None:
            self.on_progress(docs, result.nbytes, tokens, self.read_bytes)
            self.read_bytes = 0

    def _problems(self, result: ChunkResult) -> None:
        path = self.sources[result.file_index].path
        for kind, index, offset, why in result.problems:
            where = _where(path, result, index, offset)
            if kind == "error":
                raise PreprocessError(f"{where}: {why}")
            self.stats.note(kind, f"{where}: {why}")


def _encode_in_order(
    chunks: Iterator[Chunk], encoder: ChunkEncoder, workers: int, consume: Callable[[ChunkResult], None]
) -> None:
    """Encode `chunks` on `workers` processes (in this one for a single worker) and hand the
    results to `consume` in input order, which is what makes the output independent of `workers`."""
    if workers <= 1:
        for chunk in chunks:
            consume(encoder(chunk))
        return
    pool = process_context().Pool(workers, initializer=_init_worker, initargs=(encoder,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            if chunk.nbytes > _HUGE_CHUNK:  # here, after the chunks before it: no copy to a worker
                while pending:
                    consume(pending.popleft().get())
                consume(encoder(chunk))
                continue
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            # A bounded window: memory stays flat however large the input.
            while len(pending) >= 3 * workers:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _unit_chunks(
    units: Sequence[Unit], keys: Sequence[str], chunk_bytes: int, on_read: Callable[[int], None]
) -> Iterator[Chunk]:
    for unit in units:
        if unit.kind == "jsonl":
            yield from iter_chunks(unit, chunk_bytes=chunk_bytes, on_read=on_read)
        else:
            yield from iter_row_chunks(unit, keys, chunk_bytes=chunk_bytes, on_read=on_read)


def run_partition(
    units: Sequence[Unit],
    sources: Sequence[Source],
    writers: Sequence[IndexedDatasetWriter],
    encoder: ChunkEncoder,
    *,
    workers: int,
    chunk_bytes: int,
    on_progress: Callable[[int, int, int, int], None] | None = None,
    hash_file=None,
) -> Stats:
    """Tokenize `units` in order into `writers` (one per key). Raises PreprocessError on bad input."""
    collector = _Collector(sources, writers, on_progress, hash_file=hash_file)
    chunks = _unit_chunks(units, encoder.keys, chunk_bytes, collector.count_read)
    _encode_in_order(chunks, encoder, workers, collector)
    return collector.stats


def tokenize_into(
    prefixes: Sequence[str],
    units: Sequence[Unit],
    sources: Sequence[Source],
    encoder: ChunkEncoder,
    *,
    workers: int,
    chunk_bytes: int,
    on_progress: Callable[[int, int, int, int], None] | None,
    hash_path: str | None = None,
    allow_empty: bool = False,
) -> Stats:
    """`run_partition` into new datasets at `prefixes` (one per key), which appear only if it
    succeeds. An empty result is an error unless `allow_empty` (a partition may be empty)."""
    with contextlib.ExitStack() as stack:
        # Each writer deletes its temporary files if anything below raises.
        writers = [stack.enter_context(IndexedDatasetWriter(p, dtype=encoder.dtype)) for p in prefixes]
        hash_file = stack.enter_context(open(hash_path, "wb")) if hash_path is not None else None
        stats = run_partition(
            units,
            sources,
            writers,
            encoder,
            workers=workers,
            chunk_bytes=chunk_bytes,
            on_progress=on_progress,
            hash_file=hash_file,
        )
        if not allow_empty:
            require_documents(stats)
        return stats
