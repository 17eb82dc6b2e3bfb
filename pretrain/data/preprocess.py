"""Documents -> tokenized `.bin/.idx`: the engine behind `tools/preprocess_data.py`.

Pipeline: the inputs (JSONL, plain, `.gz` or `.zst`; Parquet; Arrow, see `sources.py`) are read
in chunks (whole lines, or rows of the key columns); worker processes each decode, parse, check
and tokenize whole chunks (one tokenizer thread each, so JSON parsing and the building of id
lists run in parallel too, not under one process's GIL) and send back flat token arrays; the
main process writes them in input order. The output is byte-identical whatever the number of
workers or partitions, and whatever the format the same documents came in.

`partitions` > 1 splits the inputs into that many contiguous ranges (plain JSONL at line
boundaries, Parquet at row groups, Arrow at record batches, compressed JSONL files whole), each
processed by its own process with its own workers into a temporary dataset; the results are
concatenated in order at the end, as megatron's `--partitions` does.

What is left out, and counted in the summary:
- empty documents (the text under a key is "" or only whitespace; the whole record is left out,
  so that the datasets of several keys stay aligned), unless `empty="error"`;
- blank lines of JSONL files;
- with `dedup=True`, records whose normalised text was seen before (`dedup.py`), across files,
  workers and partitions: the first occurrence in input order is kept;
- with `skip_bad_lines`, malformed records: a line that is not valid UTF-8 or JSON, not an
  object, missing a key, a non-string or null value, text that is not valid Unicode. Without it
  (the default) the first one stops the run with `path:line: reason` (`path: row N: reason` for
  columnar files, rows counted from 0).
An input with no document left is an error. Outputs are written under temporary names and
renamed at the end, so a failed run leaves nothing under the output names.

Memory: a chunk of ordinary documents is at most 8 MB; one document longer than 1 MiB is
tokenized a piece at a time (`long_documents.py`), and a JSONL line or row over 16 MiB is parsed
in the main process, so that it is never copied to a worker. Such a document costs about twice
its size while it is parsed (the line's bytes, then its text), then its text plus 2 or 4 bytes
per token; see README ("Data") for the bound.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pretrain.data.chunk_encoder import EXAMPLES, ChunkEncoder, ChunkResult
from pretrain.data.dedup import HASH_DTYPE, SeenSet
from pretrain.data.huge_records import HUGE_BYTES
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from pretrain.data.sources import (
    Chunk,
    PreprocessError,
    Source,
    Unit,
    check_columns,
    expand_inputs,
    iter_chunks,
    iter_row_chunks,
    plan_partitions,
)
from pretrain.data.tokenizer import Tokenizer

__all__ = ["NoDocumentsError", "PreprocessError", "Progress", "Stats", "expand_inputs", "preprocess"]

_MIN_CHUNK, _MAX_CHUNK = 64 << 10, 8 << 20
_HUGE_CHUNK = HUGE_BYTES  # encoded in the main process: pickling it to a worker would copy it twice
# Kinds of skipped input, in the order the summary lists them.
SKIP_KINDS = ("empty", "duplicate", "bad", "blank")


class NoDocumentsError(PreprocessError):
    """The input held no document to write (nothing, or only skipped records)."""


# -- output ----------------------------------------------------------------------------------------


def check_output_directory(output_prefix: str) -> str:
    """The directory of `output_prefix`, created if missing; raises PreprocessError unless a file
    can be created in it. Checked before tokenizing, so a read-only or full destination fails
    at once instead of after hours of work (or as a traceback from the writer)."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    what = f"--output-prefix {output_prefix}: cannot write in the directory {directory}"
    try:
        os.makedirs(directory, exist_ok=True)
        # A real file, not os.access(): root passes os.access on read-only mounts, and a full
        # disk or a quota only shows when something is written.
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as exc:
        raise PreprocessError(
            f"{what} ({exc.strerror or exc}); choose a writable location, or fix the directory's permissions"
        ) from None
    return directory


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


# -- driving one partition -----------------------------------------------------------------------


@dataclass
class Stats:
    docs: int = 0
    bytes: int = 0
    tokens: int = 0
    skips: Counter = field(default_factory=Counter)  # kind (SKIP_KINDS) -> records left out
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> "path:line: reason" of the first

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def note(self, kind: str, example: str) -> None:
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(example)


def _context() -> mp.context.BaseContext:
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
    pool = _context().Pool(workers, initializer=_init_worker, initargs=(encoder,))
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


def skip_summary(stats: Stats) -> str:
    """ "3 empty documents, 1 blank line" (or "nothing")."""
    names = {"empty": "empty document", "duplicate": "duplicate", "bad": "bad record", "blank": "blank line"}
    parts = [f"{stats.skips[k]} {names[k]}{'s' if stats.skips[k] != 1 else ''}" for k in SKIP_KINDS if stats.skips[k]]
    return ", ".join(parts) if parts else "nothing"


def _require_documents(stats: Stats) -> None:
    if stats.docs == 0:
        raise NoDocumentsError(
            f"the input holds no document to write (skipped: {skip_summary(stats)}); check --input and --json-keys"
        )


def _tokenize_into(
    prefixes: Sequence[str],
    units: Sequence[Unit],
    sources: Sequence[Source],
    encoder: ChunkEncoder,
    *,
    workers: int,
    chunk_bytes: int,
    on_progress: Callable[[int, int, int, int], None] | None,
    hash_path: str | None = None,
    require_documents: bool = True,
) -> Stats:
    """`run_partition` into new datasets at `prefixes` (one per key), which appear only if it
    succeeds. An empty result is an error with `require_documents` (a partition may be empty)."""
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
        if require_documents:
            _require_documents(stats)
        return stats


# -- the whole job --------------------------------------------------------------------------------


class Progress:
    """A status line with docs/s and MB/s: redrawn in place on a terminal, else every few seconds."""

    def __init__(self, total_bytes: int, *, interval: float | None = None, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.total = total_bytes
        self.start = self.last = time.perf_counter()
        self.docs = self.bytes = self.tokens = self.read = 0

    def update(self, docs: int, nbytes: int, tokens: int, read: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.tokens += tokens
        self.read += read
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        share = f"{min(100.0, 100.0 * self.read / self.total):5.1f}% | " if self.total else ""
        text = f"{share}{self.line(now)}"
        if self.tty:
            print(f"\r{text}\033[K", end="", file=self.stream, flush=True)
        else:
            print(f"progress: {text}", file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        return (
            f"{self.docs} docs, {self.bytes / 1e6:.1f} MB, {self.tokens} tokens in {elapsed:.1f}s "
            f"({self.docs / elapsed:.0f} docs/s, {self.bytes / 1e6 / elapsed:.2f} MB/s)"
        )

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def output_prefixes(output_prefix: str, keys: Sequence[str]) -> list[str]:
    """One dataset per JSON key, named as megatron names them."""
    return [f"{output_prefix}_{key}_document" for key in keys]


def _partition_main(args: tuple) -> None:
    """Entry of a partition process: write its own temporary datasets, report through a queue."""
    index, units, sources, prefixes, encoder, workers, chunk_bytes, hash_path, counters, queue = args

    def report(docs: int, nbytes: int, tokens: int, read: int) -> None:
        with counters.get_lock():
            for j, v in enumerate((docs, nbytes, tokens, read)):
                counters[4 * index + j] += v

    try:
        stats = _tokenize_into(
            prefixes,
            units,
            sources,
            encoder,
            workers=workers,
            chunk_bytes=chunk_bytes,
            on_progress=report,
            hash_path=hash_path,
            require_documents=False,
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


def _sum_stats(parts: Sequence[Stats]) -> Stats:
    """The partitions' Stats as one run's: counts added, the first few examples in input order."""
    total = Stats()
    for s in parts:
        total.docs += s.docs
        total.bytes += s.bytes
        total.tokens += s.tokens
        total.skips.update(s.skips)
        for kind, examples in s.examples.items():
            for example in examples:
                total.note(kind, example)
    return total


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


def _run_partitions(
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
    ctx = _context()
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
        total = _sum_stats(_await_partitions(procs, queue, counters, update))
        _require_documents(total)
        _merge_partitions(part_prefixes, prefixes, hash_paths, total)
        return total
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def _check_arguments(keys: Sequence[str], workers: int, partitions: int) -> None:
    if workers < 1 or partitions < 1:
        raise PreprocessError("workers and partitions must be at least 1")
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"json keys must be distinct and at least one, got {list(keys)}")


def _default_chunk_bytes(sources: Sequence[Source], workers: int) -> int:
    """Enough chunks per worker that the last ones finish together."""
    total = sum(os.path.getsize(s.path) for s in sources)
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, total // max(1, workers * 64))))


def _output_directory(output_prefix: str) -> str:
    """The directory of `output_prefix`; it must exist already, and is checked writable before any work."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise PreprocessError(f"output directory {directory!r} does not exist")
    check_output_directory(output_prefix)
    return directory


def preprocess(
    inputs: Sequence[str],
    *,
    output_prefix: str,
    tokenizer: Tokenizer,
    keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    skip_bad_lines: bool = False,
    empty: str = "skip",
    dedup: bool = False,
    chunk_bytes: int | None = None,
    progress: Progress | None = None,
) -> Stats:
    """Tokenize `inputs` (files, globs, directories; JSONL, Parquet or Arrow) into
    `{output_prefix}_{key}_document.bin/.idx`."""
    _check_arguments(keys, workers, partitions)
    sources = expand_inputs(inputs)
    for source in sources:
        if source.columnar:
            check_columns(source, keys)
    if chunk_bytes is None:
        chunk_bytes = _default_chunk_bytes(sources, workers)
    encoder = ChunkEncoder(
        tokenizer, keys=keys, append_eod=append_eod, skip_bad_lines=skip_bad_lines, empty=empty, dedup=dedup
    )
    prefixes = output_prefixes(output_prefix, keys)
    directory = _output_directory(output_prefix)
    update = progress.update if progress is not None else None

    partitions = min(partitions, workers)  # every partition needs a worker
    if partitions == 1:
        units = [Unit(i, s.path, kind=s.kind) for i, s in enumerate(sources)]
        return _tokenize_into(
            prefixes, units, sources, encoder, workers=workers, chunk_bytes=chunk_bytes, on_progress=update
        )
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(output_prefix)}.partitions.", dir=directory)
    try:
        return _run_partitions(
            sources,
            prefixes,
            encoder,
            scratch,
            workers=workers,
            partitions=partitions,
            chunk_bytes=chunk_bytes,
            update=update,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
