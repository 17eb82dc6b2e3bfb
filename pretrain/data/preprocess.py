"""JSONL -> tokenized `.bin/.idx`: the engine behind `tools/preprocess_data.py`.

Pipeline: the input (plain, `.gz` or `.zst` JSONL) is read in chunks of whole lines; worker
processes each decode, parse, check and tokenize whole chunks (one tokenizer thread each, so
JSON parsing and the building of id lists run in parallel too, not under one process's GIL)
and send back flat token arrays; the main process writes them in input order. The output is
byte-identical whatever the number of workers or partitions.

`partitions` > 1 splits the input byte space into that many contiguous ranges (plain files at
line boundaries, compressed files whole), each processed by its own process with its own
workers into a temporary dataset; the results are concatenated in order at the end, as
megatron's `--partitions` does. It helps when one reading/writing process is the bottleneck
(many dozens of cores).

Bad input (a line that is not valid UTF-8 or JSON, not an object, missing a key, a non-string
value, or a document that is empty or only whitespace) stops the run with `path:line: reason`,
unless `skip_bad_lines` is set: then such lines are counted and left out of every key's
dataset. Blank lines are skipped silently. Outputs are written under temporary names and
renamed at the end, so a failed run leaves nothing under the output names.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import itertools
import json
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pretrain.data.indexed import IndexedDatasetWriter, dtype_for_vocab, merge_datasets
from pretrain.data.tokenizer import Tokenizer

_COMPRESSED = (".gz", ".zst", ".zstd")
_MIN_CHUNK, _MAX_CHUNK = 64 << 10, 8 << 20
_EXAMPLES = 5  # bad lines quoted in the summary of a --skip-bad-lines run


class PreprocessError(ValueError):
    """Bad input or arguments; the message names the file and line where there is one."""


# -- input ----------------------------------------------------------------------------------------


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


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files and glob patterns -> files, in the order given (each pattern's matches sorted)."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"no input file matches {pattern!r}")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise PreprocessError(f"input file not found: {pattern}")
    return paths


def is_compressed(path: str) -> bool:
    return path.endswith(_COMPRESSED)


def open_input(path: str) -> tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """(decompressed stream, raw file): the raw file's position measures progress."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise PreprocessError(f"{path}: reading .zst input needs the zstandard package") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=1 << 20), raw
    return raw, raw


@dataclass
class Unit:
    """A piece of one input file: lines starting at decompressed offsets [start, end)."""

    file_index: int
    path: str
    start: int = 0
    end: int | None = None  # None: to the end of the file


@dataclass
class Chunk:
    """Whole lines of one file. `line` is the number of the first one, when known."""

    file_index: int
    offset: int
    line: int | None
    data: bytes


def iter_chunks(unit: Unit, *, chunk_bytes: int, on_read: Callable[[int], None] | None = None) -> Iterator[Chunk]:
    stream, raw = open_input(unit.path)
    with contextlib.closing(stream), contextlib.closing(raw):
        pos, line = unit.start, 1 if unit.start == 0 else None
        if unit.start > 0:  # plain files only: skip the line that began in the previous unit
            raw.seek(unit.start - 1)
            if raw.read(1) != b"\n":
                raw.readline()
            pos = raw.tell()
        carry = b""
        last_raw = raw.tell()
        while unit.end is None or pos < unit.end:
            block = stream.read(chunk_bytes)
            if on_read is not None:
                now = raw.tell()
                on_read(now - last_raw)
                last_raw = now
            if not block:
                if carry:  # a last line without a newline
                    yield Chunk(unit.file_index, pos, line, carry)
                return
            data = carry + block if carry else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than the block: keep reading
                carry = data
                continue
            if unit.end is not None and pos + cut > unit.end:
                # Lines that start at or after `end` belong to the next unit.
                cut = data.find(b"\n", unit.end - pos - 1) + 1
                yield Chunk(unit.file_index, pos, line, data[:cut])
                return
            piece = data[:cut]
            yield Chunk(unit.file_index, pos, line, piece)
            if line is not None:
                line += piece.count(b"\n")
            carry = data[cut:]
            pos += cut


def plan_partitions(paths: Sequence[str], partitions: int) -> list[list[Unit]]:
    """Split the inputs into `partitions` contiguous runs of about equal (on-disk) bytes."""
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    plan: list[list[Unit]] = [[] for _ in range(partitions)]
    if total == 0:
        plan[0] = [Unit(i, p) for i, p in enumerate(paths)]
        return plan
    edges = [round(k * total / partitions) for k in range(partitions + 1)]
    offset = 0
    for i, (path, size) in enumerate(zip(paths, sizes, strict=True)):
        lo, hi = offset, offset + size
        offset = hi
        if is_compressed(path) or size == 0:  # cannot seek into it: the partition of its start
            k = max(j for j in range(partitions) if edges[j] <= lo) if lo < total else partitions - 1
            plan[k].append(Unit(i, path))
            continue
        for k in range(partitions):
            a, b = max(lo, edges[k]), min(hi, edges[k + 1])
            if a < b:
                plan[k].append(Unit(i, path, a - lo, None if b == hi else b - lo))
    return plan


# -- encoding (runs in worker processes) ---------------------------------------------------------


@dataclass
class ChunkResult:
    file_index: int
    offset: int
    line: int | None
    docs: int
    nbytes: int
    tokens: list[np.ndarray]  # per key, flat
    lengths: list[np.ndarray]  # per key, one per document
    bad: list[tuple[int, int, str]] = field(default_factory=list)  # (line index, byte offset, reason)
    stopped: bool = False


class ChunkEncoder:
    """Decode, parse, check and tokenize one chunk (picklable; one per worker process)."""

    def __init__(self, tokenizer: Tokenizer, *, keys: Sequence[str], append_eod: bool, skip_bad_lines: bool) -> None:
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.append_eod = append_eod
        self.skip_bad_lines = skip_bad_lines
        self.dtype = dtype_for_vocab(tokenizer.vocab_size)

    def __call__(self, chunk: Chunk) -> ChunkResult:
        data = chunk.data
        try:
            lines: list = data.decode("utf-8").split("\n")
            raw_lines = None
        except UnicodeDecodeError:
            raw_lines = data.split(b"\n")
            lines = raw_lines
        texts: list[list[str]] = [[] for _ in self.keys]
        bad: list[tuple[int, int, str]] = []
        stopped = False
        for i, line in enumerate(lines):
            if raw_lines is not None:
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad.append((i, -1, f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)"))
                    if not self.skip_bad_lines:
                        stopped = True
                        break
                    continue
            if not line or line.isspace():
                continue
            values, reason = self._values(line)
            if reason is not None:
                bad.append((i, -1, reason))
                if not self.skip_bad_lines:
                    stopped = True
                    break
                continue
            for k, value in enumerate(values):
                texts[k].append(value)
        tokens, lengths = [], []
        if not stopped:
            for batch in texts:
                ids = self.tokenizer.encode_batch(batch, num_threads=1)
                if self.append_eod:
                    eod = self.tokenizer.eod
                    for doc in ids:
                        doc.append(eod)
                n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                tokens.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(n.sum())))
                lengths.append(n)
        if bad:  # byte offsets of the bad lines, for line numbers in split files
            starts = np.cumsum([0] + [len(x) + 1 for x in (raw_lines or data.split(b"\n"))])
            bad = [(i, chunk.offset + int(starts[i]), why) for i, _, why in bad]
        return ChunkResult(
            chunk.file_index, chunk.offset, chunk.line, len(texts[0]), len(data), tokens, lengths, bad, stopped
        )

    def _values(self, line: str) -> tuple[list[str], str | None]:
        try:
            record = json.loads(line)
        except ValueError as exc:
            msg = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            return [], f"invalid JSON ({msg})"
        if not isinstance(record, dict):
            return [], f"expected a JSON object, got {type(record).__name__}"
        values = []
        for key in self.keys:
            if key not in record:
                present = ", ".join(repr(k) for k in list(record)[:10])
                return [], f"no key {key!r} (keys present: {present}); choose the field with --json-keys"
            value = record[key]
            if not isinstance(value, str):
                return [], f"{key!r} holds {type(value).__name__}, not a string"
            if not value or value.isspace():
                return [], f"empty document: {key!r} holds no text"
            if not value.isascii():
                try:  # JSON escapes can spell lone surrogates, which no tokenizer accepts
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return [], f"{key!r} is not valid Unicode text ({exc.reason} at character {exc.start})"
            values.append(value)
        return values, None


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
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # "path:line: reason" of the first skips


def _context() -> mp.context.BaseContext:
    # fork shares the loaded tokenizer with the workers for free; spawn elsewhere.
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")


def line_number(paths: Sequence[str], result: ChunkResult, line_index: int, offset: int) -> int:
    """1-based line number of a bad line; counted from the file start when the chunk's is unknown."""
    if result.line is not None:
        return result.line + line_index
    count = 0
    with open(paths[result.file_index], "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


class _Collector:
    """Takes the encoded chunks in input order: writes their tokens, counts them, and turns
    their bad lines into an error or a skip (the line numbers need the input paths)."""

    def __init__(
        self,
        paths: Sequence[str],
        writers: Sequence[IndexedDatasetWriter],
        on_progress: Callable[[int, int, int, int], None] | None,
    ) -> None:
        self.paths = paths
        self.writers = writers
        self.on_progress = on_progress
        self.stats = Stats()
        self.read_bytes = 0  # raw input bytes read since the last progress report

    def count_read(self, n: int) -> None:
        self.read_bytes += n

    def __call__(self, result: ChunkResult) -> None:
        self._bad_lines(result)
        tokens = 0
        for writer, flat, lengths in zip(self.writers, result.tokens, result.lengths, strict=True):
            writer.add_documents(flat, lengths)
            tokens += len(flat)
        self.stats.docs += result.docs
        self.stats.bytes += result.nbytes
        self.stats.tokens += tokens
        if self.on_progress is not None:
            self.on_progress(result.docs, result.nbytes, tokens, self.read_bytes)
            self.read_bytes = 0

    def _bad_lines(self, result: ChunkResult) -> None:
        for line_index, offset, why in result.bad:
            where = f"{self.paths[result.file_index]}:{line_number(self.paths, result, line_index, offset)}"
            if result.stopped:
                raise PreprocessError(f"{where}: {why}")
            self.stats.skipped += 1
            if len(self.stats.examples) < _EXAMPLES:
                self.stats.examples.append(f"{where}: {why}")


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


def run_partition(
    units: Sequence[Unit],
    paths: Sequence[str],
    writers: Sequence[IndexedDatasetWriter],
    encoder: ChunkEncoder,
    *,
    workers: int,
    chunk_bytes: int,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> Stats:
    """Tokenize `units` in order into `writers` (one per key). Raises PreprocessError on bad input."""
    collector = _Collector(paths, writers, on_progress)
    chunks = (c for u in units for c in iter_chunks(u, chunk_bytes=chunk_bytes, on_read=collector.count_read))
    _encode_in_order(chunks, encoder, workers, collector)
    return collector.stats


def _tokenize_into(
    prefixes: Sequence[str],
    units: Sequence[Unit],
    paths: Sequence[str],
    encoder: ChunkEncoder,
    *,
    workers: int,
    chunk_bytes: int,
    on_progress: Callable[[int, int, int, int], None] | None,
) -> Stats:
    """`run_partition` into new datasets at `prefixes` (one per key), which appear only if it succeeds."""
    with contextlib.ExitStack() as stack:
        # Each writer deletes its temporary files if anything below raises.
        writers = [stack.enter_context(IndexedDatasetWriter(p, dtype=encoder.dtype)) for p in prefixes]
        return run_partition(
            units, paths, writers, encoder, workers=workers, chunk_bytes=chunk_bytes, on_progress=on_progress
        )


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
    index, units, paths, prefixes, encoder, workers, chunk_bytes, counters, queue = args

    def report(docs: int, nbytes: int, tokens: int, read: int) -> None:
        with counters.get_lock():
            for j, v in enumerate((docs, nbytes, tokens, read)):
                counters[4 * index + j] += v

    try:
        stats = _tokenize_into(
            prefixes, units, paths, encoder, workers=workers, chunk_bytes=chunk_bytes, on_progress=report
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
        total.skipped += s.skipped
        total.examples.extend(s.examples)
    total.examples = total.examples[:_EXAMPLES]
    return total


def _run_partitions(
    paths: Sequence[str],
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
    plan = plan_partitions(paths, partitions)
    share = [workers // partitions + (k < workers % partitions) for k in range(partitions)]
    ctx = _context()
    counters = ctx.Array("q", 4 * partitions)
    queue = ctx.Queue()
    part_prefixes = [[os.path.join(scratch, f"p{k}_{j}") for j in range(len(prefixes))] for k in range(partitions)]
    procs = [
        ctx.Process(
            target=_partition_main,
            args=((k, plan[k], paths, part_prefixes[k], encoder, share[k], chunk_bytes, counters, queue),),
        )
        for k in range(partitions)
    ]
    try:
        for p in procs:
            p.start()
        total_stats = _sum_stats(_await_partitions(procs, queue, counters, update))
        for j, prefix in enumerate(prefixes):
            merge_datasets([part_prefixes[k][j] for k in range(partitions)], prefix)
        return total_stats
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


def _default_chunk_bytes(paths: Sequence[str], workers: int) -> int:
    """Enough chunks per worker that the last ones finish together."""
    total = sum(os.path.getsize(p) for p in paths)
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
    chunk_bytes: int | None = None,
    progress: Progress | None = None,
) -> Stats:
    """Tokenize JSONL `inputs` (files or globs) into `{output_prefix}_{key}_document.bin/.idx`."""
    _check_arguments(keys, workers, partitions)
    paths = expand_inputs(inputs)
    if chunk_bytes is None:
        chunk_bytes = _default_chunk_bytes(paths, workers)
    encoder = ChunkEncoder(tokenizer, keys=keys, append_eod=append_eod, skip_bad_lines=skip_bad_lines)
    prefixes = output_prefixes(output_prefix, keys)
    directory = _output_directory(output_prefix)
    update = progress.update if progress is not None else None

    partitions = min(partitions, workers)  # every partition needs a worker
    if partitions == 1:
        units = [Unit(i, p) for i, p in enumerate(paths)]
        return _tokenize_into(
            prefixes, units, paths, encoder, workers=workers, chunk_bytes=chunk_bytes, on_progress=update
        )
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(output_prefix)}.partitions.", dir=directory)
    try:
        return _run_partitions(
            paths,
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
