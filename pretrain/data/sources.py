"""The inputs of `tools/preprocess_data.py`: which files, how they are split between partitions,
and how each is read in bounded pieces ("chunks") in input order.

Three kinds of file:
- JSONL, plain, `.gz` or `.zst`: one JSON object per line, read in chunks of whole lines;
- Parquet (`*.parquet`): read with pyarrow in record batches of about `chunk_bytes` of text,
  only the `--json-keys` columns;
- Arrow IPC files (`*.arrow`), as `datasets.save_to_disk` writes them (stream format) or in the
  IPC file format, memory-mapped and read batch by batch.

An input is a file, a glob pattern, or a directory: a directory written by `save_to_disk`
(`state.json` lists its `data-*.arrow` files, in order) or any directory of shards (its
`.parquet`, `.arrow` and JSONL files, recursively, in sorted path order). Rows of columnar
files are numbered from 0 within their file, as `datasets` and pandas number them.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pretrain.data import parquet_pages
from pretrain.data.huge_records import HUGE_BYTES, LongText

_COMPRESSED = (".gz", ".zst", ".zstd")
_JSONL = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".json.gz", ".json.zst")
_MAX_BATCH_ROWS = 65536


class PreprocessError(ValueError):
    """Bad input or arguments; the message names the file and line (or row) where there is one."""


@dataclass(frozen=True)
class Source:
    """One input file. `kind` is "jsonl", "parquet" or "arrow"."""

    path: str
    kind: str

    @property
    def columnar(self) -> bool:
        return self.kind != "jsonl"


def source_kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    return "jsonl"


# -- finding the files -----------------------------------------------------------------------------


def _save_to_disk_files(directory: str) -> list[str] | None:
    """The data files of a `datasets.save_to_disk` directory, in order; None if it is not one."""
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        return None
    try:
        with open(state, encoding="utf-8") as f:
            files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreprocessError(f"{state}: not a datasets state.json ({exc}); pass the .arrow files instead") from None
    paths = [os.path.join(directory, name) for name in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise PreprocessError(f"{state} lists {missing[0]}, which does not exist: the dataset is incomplete")
    return paths


def _directory_files(directory: str) -> list[str]:
    listed = _save_to_disk_files(directory)
    if listed is not None:
        return listed
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
        raise PreprocessError(
            f"{directory} holds several splits ({', '.join(splits)}); pass one split's directory, "
            f"e.g. {os.path.join(directory, splits[0] if splits else 'train')}"
        )
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .cache/ and the like
        found += [os.path.join(root, f) for f in files if f.endswith((".parquet", ".arrow", *_JSONL))]
    if not found:
        raise PreprocessError(f"directory {directory} holds no .parquet, .arrow or .jsonl files")
    return sorted(found)


def expand_inputs(patterns: Sequence[str | Source]) -> list[Source]:
    """Files, glob patterns and directories -> input files, in the order given (each pattern's or
    directory's files sorted). Sources found before pass through as they are."""
    paths: list[str] = []
    for pattern in patterns:
        if isinstance(pattern, Source):
            paths.append(pattern.path)
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"no input file matches {pattern!r}")
            paths.extend(matches)
        elif os.path.isdir(pattern):
            paths.extend(_directory_files(pattern))
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise PreprocessError(f"input file not found: {pattern}")
    return [Source(p, source_kind(p)) for p in paths]


def is_compressed(path: str) -> bool:
    return path.endswith(_COMPRESSED)


# -- units: what one partition reads ---------------------------------------------------------------


@dataclass
class Unit:
    """A piece of one input file. JSONL: lines starting at decompressed byte offsets [start, end);
    columnar: row groups (Parquet) or record batches (Arrow) [start, end), whose first row is
    `first_row`."""

    file_index: int
    path: str
    start: int = 0
    end: int | None = None  # None: to the end of the file
    kind: str = "jsonl"
    first_row: int = 0


def piece_rows(source: Source) -> list[int]:
    """Rows of each row group (Parquet) or record batch (Arrow): the places a columnar file can be
    split between partitions."""
    if source.kind == "parquet":
        metadata = _parquet(source.path).metadata
        return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    with _arrow_batches(source.path) as batches:
        return [b.num_rows for b in batches]


def _columnar_units(index: int, source: Source, lo: int, edges: Sequence[int], plan: list[list[Unit]]) -> None:
    """Row groups or batches go to the partition their share of the file's bytes starts in."""
    rows = piece_rows(source)
    total, size = max(1, sum(rows)), os.path.getsize(source.path)
    row = 0
    for j, n in enumerate(rows):
        at = lo + size * row // total
        k = max(i for i in range(len(edges) - 1) if edges[i] <= at) if at < edges[-1] else len(edges) - 2
        units = plan[k]
        if units and units[-1].file_index == index and units[-1].end == j:
            units[-1].end = j + 1
        else:
            units.append(Unit(index, source.path, j, j + 1, source.kind, row))
        row += n


def plan_partitions(sources: Sequence[Source], partitions: int) -> list[list[Unit]]:
    """Split the inputs into `partitions` contiguous runs of about equal (on-disk) bytes: plain
    JSONL at any line, Parquet between row groups, Arrow between record batches, compressed JSONL
    not at all."""
    sizes = [os.path.getsize(s.path) for s in sources]
    total = sum(sizes)
    plan: list[list[Unit]] = [[] for _ in range(partitions)]
    if total == 0:
        plan[0] = [Unit(i, s.path, kind=s.kind) for i, s in enumerate(sources)]
        return plan
    edges = [round(k * total / partitions) for k in range(partitions + 1)]
    offset = 0
    for i, (source, size) in enumerate(zip(sources, sizes)):
        lo, hi = offset, offset + size
        offset = hi
        if source.columnar and size:
            _columnar_units(i, source, lo, edges, plan)
        elif is_compressed(source.path) or size == 0:  # cannot seek into it: the partition of its start
            k = max(j for j in range(partitions) if edges[j] <= lo) if lo < total else partitions - 1
            plan[k].append(Unit(i, source.path))
        else:
            for k in range(partitions):
                a, b = max(lo, edges[k]), min(hi, edges[k + 1])
                if a < b:
                    plan[k].append(Unit(i, source.path, a - lo, None if b == hi else b - lo))
    return plan


# -- chunks: what one worker encodes ---------------------------------------------------------------


@dataclass
class Chunk:
    """Whole lines of one JSONL file (`data`: bytes), or rows of one columnar file (`data`: an
    Arrow IPC stream of the key columns). `line` is the number of the first line (1-based) when
    known, or the first row's (0-based)."""

    file_index: int
    offset: int
    line: int | None
    data: bytes | bytearray
    rows: bool = False  # True: columnar rows
    nbytes: int = 0  # text bytes, for progress (JSONL: len(data))


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


def _skip_partial_line(raw: io.BufferedIOBase, start: int) -> int:
    """Plain files only: skip the line that began in the previous unit; the position after it."""
    raw.seek(start - 1)
    if raw.read(1) != b"\n":
        raw.readline()
    return raw.tell()


def iter_chunks(unit: Unit, *, chunk_bytes: int, on_read: Callable[[int], None] | None = None) -> Iterator[Chunk]:
    """Whole lines of a JSONL unit, about `chunk_bytes` at a time; a longer line is one chunk of its
    own, gathered in one growing buffer (never copied whole while it grows)."""
    stream, raw = open_input(unit.path)
    with contextlib.closing(stream), contextlib.closing(raw):
        pos, line = unit.start, 1 if unit.start == 0 else None
        if unit.start > 0:
            pos = _skip_partial_line(raw, unit.start)
        carry = bytearray()
        last_raw = raw.tell()
        while unit.end is None or pos < unit.end:
            block = stream.read(chunk_bytes)
            if on_read is not None:
                now = raw.tell()
                on_read(now - last_raw)
                last_raw = now
            if not block:
                if carry:  # a last line without a newline
                    chunk, carry = Chunk(unit.file_index, pos, line, carry, nbytes=len(carry)), bytearray()
                    yield chunk
                return
            searched = len(carry)
            carry += block
            # After a line longer than a chunk, cut at its end: it is a chunk of its own, so
            # that the encoder can take it without copying it out of a larger chunk.
            cut = (carry.find(b"\n", searched) if searched >= chunk_bytes else carry.rfind(b"\n", searched)) + 1
            if cut == 0:  # a line longer than the block: keep reading
                continue
            if unit.end is not None and pos + cut > unit.end:
                # Lines that start at or after `end` belong to the next unit.
                cut = carry.find(b"\n", unit.end - pos - 1) + 1
                yield Chunk(unit.file_index, pos, line, bytes(carry[:cut]), nbytes=cut)
                return
            rest = bytes(carry[cut:])
            del carry[cut:]  # in place: a long line is not copied
            chunk, carry = Chunk(unit.file_index, pos, line, carry, nbytes=cut), bytearray(rest)
            if line is not None:
                line += chunk.data.count(b"\n")
            pos += cut
            yield chunk  # the generator keeps no reference: the consumer may free the data


# -- columnar files --------------------------------------------------------------------------------


def _parquet(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow's own allocator keeps memory it freed (a huge document's decompressed page) for
    # itself; the system allocator hands large blocks back, to the OS or to numpy's arrays.
    pa.set_memory_pool(pa.system_memory_pool())

    try:
        return pq.ParquetFile(path, memory_map=True)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with its own text
        raise PreprocessError(f"{path}: not a readable Parquet file ({exc})") from None


@contextlib.contextmanager
def _arrow_batches(path: str, *, schema_only: bool = False):
    """The record batches of an Arrow IPC file (stream or file format), memory-mapped."""
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
        if source.read(6) == b"ARROW1":
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
    except Exception as exc:
        raise PreprocessError(f"{path}: not a readable Arrow IPC file ({exc})") from None
    with contextlib.closing(source):
        yield reader.schema if schema_only else batches


def _string_column(path: str, schema, key: str) -> None:
    import pyarrow as pa

    if key not in schema.names:
        shown = ", ".join(repr(n) for n in schema.names[:10])
        raise PreprocessError(f"{path}: no column {key!r} (columns: {shown}); choose the column with --json-keys")
    kind = schema.field(key).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise PreprocessError(f"{path}: column {key!r} holds {kind}, not text; choose a string column with --json-keys")


def check_columns(source: Source, keys: Sequence[str]) -> None:
    """Raises PreprocessError unless every key is a string column of `source`."""
    if source.kind == "parquet":
        schema = _parquet(source.path).schema_arrow
    else:
        with _arrow_batches(source.path, schema_only=True) as schema:
            pass
    for key in keys:
        _string_column(source.path, schema, key)


def _plain_strings(column):
    """A string column as string or large_string (dictionary and view columns decoded)."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    return column


def _string_buffers(column) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(offsets [n + 1] into data, data bytes, validity [n] or None) of a string column, as
    zero-copy numpy views of Arrow's buffers (pyarrow.compute, 0.2 s to import, is not needed)."""
    column = _plain_strings(column)
    validity, offsets_buffer, data_buffer = column.buffers()
    wide = str(column.type) == "large_string"
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if wide else np.int32)
    offsets = offsets[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    valid = None
    if column.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        valid = bits[column.offset : column.offset + len(column)].astype(bool)
    return offsets, data, valid


def _row_bytes(batch, keys: Sequence[str]) -> np.ndarray:
    """Text bytes of each row, over the key columns."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for key in keys:
        total += np.diff(_string_buffers(batch.column(key))[0])
    return total


def _pack(batches: list, keys: Sequence[str], *, copy: bool) -> list[tuple]:
    """Per key: (offsets from 0, the text bytes, validity or None) of the rows of `batches`.
    Copied into one bytes object each to go to a worker (a slice of Arrow's buffer would pickle
    the whole buffer); left as views for a huge chunk, which stays in this process."""
    packed = []
    for key in keys:
        parts = [_string_buffers(b.column(key)) for b in batches]
        offsets, base = [np.zeros(1, dtype=np.int64)], 0
        for o, _, _ in parts:
            offsets.append(o[1:].astype(np.int64) - int(o[0]) + base)
            base += int(o[-1]) - int(o[0])
        spans = [d[int(o[0]) : int(o[-1])] for o, d, _ in parts]
        if copy or len(spans) != 1:
            data = b"".join(x.tobytes() for x in spans)
        else:
            data = spans[0]
        valid = None
        if any(v is not None for _, _, v in parts):
            valid = np.concatenate([v if v is not None else np.ones(len(o) - 1, bool) for o, _, v in parts])
        packed.append((np.concatenate(offsets), data, valid))
    return packed


def _unit_batches(unit: Unit, keys: Sequence[str], chunk_bytes: int) -> Iterator:
    """The record batches of a columnar unit, in order, with the key columns only."""
    if unit.kind == "parquet":
        parquet = _parquet(unit.path)
        metadata = parquet.metadata
        groups = list(range(unit.start, metadata.num_row_groups if unit.end is None else unit.end))
        rows = sum(metadata.row_group(g).num_rows for g in groups)
        names = (
            {metadata.row_group(0).column(c).path_in_schema: c for c in range(metadata.num_columns)} if groups else {}
        )
        size = sum(metadata.row_group(g).column(names[k]).total_uncompressed_size for g in groups for k in keys)
        # Rows per batch from the average row: a file of huge documents is read a few rows at a time.
        batch_rows = int(min(_MAX_BATCH_ROWS, max(1, chunk_bytes * max(1, rows) // max(1, size))))
        for g in groups:
            group = metadata.row_group(g)
            if sum(group.column(names[k]).total_uncompressed_size for k in keys) > HUGE_BYTES * group.num_rows:
                yield from _huge_row_group(unit.path, parquet, g, keys)
            else:
                yield from parquet.iter_batches(
                    batch_size=batch_rows, row_groups=[g], columns=list(keys), use_threads=False
                )
        return
    with _arrow_batches(unit.path) as batches:
        for j, batch in enumerate(batches):
            if j >= unit.start and (unit.end is None or j < unit.end):
                yield batch.select(list(keys))


def _huge_row_group(path: str, parquet, group: int, keys: Sequence[str]) -> Iterator:
    """A row group of huge documents, one row per batch: read page by page where
    `parquet_pages` follows the column (values are views of the decompressed page), else
    whole by pyarrow (which peaks at 3.5x the text; iter_batches would hold one more copy)."""
    import pyarrow as pa

    if not parquet_pages.supported(parquet, group, keys):
        yield from parquet.read_row_group(group, columns=list(keys), use_threads=False).to_batches()
        return
    try:
        for row in parquet_pages.iter_rows(path, parquet, group, keys):
            columns = [_one_value(v) for v in row]
            yield pa.RecordBatch.from_arrays(columns, names=list(keys))
    except parquet_pages.PageError as exc:
        raise PreprocessError(f"{path}: row group {group}: {exc}") from None


def _one_value(value):
    """A one-row large_string array over `value`'s bytes (no copy), or a null."""
    import pyarrow as pa

    if value is None:
        return pa.array([None], type=pa.large_string())
    offsets = pa.py_buffer(np.array([0, len(value)], dtype=np.int64))
    return pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(value)])


def _file_rows(unit: Unit) -> int:
    if unit.kind == "parquet":
        return _parquet(unit.path).metadata.num_rows
    return sum(piece_rows(Source(unit.path, unit.kind)))


def iter_row_chunks(
    unit: Unit, keys: Sequence[str], *, chunk_bytes: int, on_read: Callable[[int], None] | None = None
) -> Iterator[Chunk]:
    """Rows of a columnar unit, about `chunk_bytes` of text at a time (at least one row), in order.
    `on_read` gets the file's on-disk bytes in proportion to the rows read."""
    row = unit.first_row
    size, rows = (os.path.getsize(unit.path), max(1, _file_rows(unit))) if on_read is not None else (0, 1)
    pending: list = []
    pending_bytes = 0
    for batch in _unit_batches(unit, keys, chunk_bytes):
        ends = np.cumsum(_row_bytes(batch, keys))
        start = 0
        while start < batch.num_rows:
            base = int(ends[start - 1]) if start else 0
            # Rows up to the one that fills the chunk; at least one.
            stop = int(np.searchsorted(ends, base + chunk_bytes - pending_bytes, side="right"))
            stop = min(batch.num_rows, max(stop, start + 1))
            pending.append(batch.slice(start, stop - start))
            pending_bytes += int(ends[stop - 1]) - base
            start = stop
            if pending_bytes >= chunk_bytes:
                chunk = _row_chunk(unit, row, pending, keys, pending_bytes)
                done = row + sum(b.num_rows for b in pending)
                if on_read is not None:
                    on_read(size * done // rows - size * row // rows)
                row, pending, pending_bytes = done, [], 0
                yield chunk
    if pending:
        if on_read is not None:
            done = row + sum(b.num_rows for b in pending)
            on_read(size * done // rows - size * row // rows)
        yield _row_chunk(unit, row, pending, keys, pending_bytes)


def _row_chunk(unit: Unit, row: int, batches: list, keys: Sequence[str], nbytes: int) -> Chunk:
    # A huge chunk is encoded in this process (encode_pipeline._HUGE_CHUNK): no copy of its text.
    data = _pack(batches, keys, copy=nbytes <= HUGE_BYTES)
    return Chunk(unit.file_index, row, row, data, rows=True, nbytes=nbytes)


INVALID_UTF8 = object()  # stands for a value that is not valid UTF-8 in read_row_chunk's lists


def read_row_chunk(data: list[tuple], keys: Sequence[str]) -> list[list]:
    """The key columns of a row chunk (`_pack`) as Python strings: None for a null, INVALID_UTF8
    for bytes that are not UTF-8 (Arrow does not check them on read), a LongText (a view, no
    copy) for a value over HUGE_BYTES."""
    return [_decode_column(*packed) for packed in data]


def _decode_column(offsets: np.ndarray, data, valid: np.ndarray | None) -> list:
    bounds = offsets.tolist()
    is_view = isinstance(data, np.ndarray)
    view = data if is_view else None
    out: list = []
    for i in range(len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        if valid is not None and not valid[i]:
            out.append(None)
        elif end - start > HUGE_BYTES:
            if view is None:
                view = np.frombuffer(data, dtype=np.uint8)
            out.append(LongText(view[start:end], json_escaped=False))
        else:
            raw = data[start:end]
            try:
                out.append((raw.tobytes() if is_view else raw).decode("utf-8"))
            except UnicodeDecodeError:
                out.append(INVALID_UTF8)
    return out
