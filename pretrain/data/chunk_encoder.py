"""One chunk of input -> its documents' tokens: the work each preprocessing worker process does.

A chunk is whole JSONL lines or rows of the key columns of a columnar file (`sources.py`). The
encoder decodes and parses them, checks each record (a malformed one stops the chunk or is
skipped; an empty document is skipped or stops it), hashes the kept records for `--dedup`, and
tokenizes them into flat arrays, documents over `PIECE_CHARS` a piece at a time
(`long_documents.py`). Long lines and texts are released as soon as they are used, so one huge
document is held once, not three times.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pretrain.data.dedup import as_hashes, record_hash
from pretrain.data.huge_records import HUGE_BYTES, LongText, parse_huge_line
from pretrain.data.indexed import dtype_for_vocab
from pretrain.data.long_documents import PIECE_CHARS, encode_long, split_mode
from pretrain.data.sources import INVALID_UTF8, Chunk, PreprocessError, read_row_chunk
from pretrain.data.tokenizer import Tokenizer

EXAMPLES = 5  # skipped records quoted in the summary, per kind
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    # (kind, index of the line or row in the chunk, its byte offset or -1, reason): the first
    # few skipped records of each kind, then, when `stopped`, the one that stops the run.
    problems: list[tuple[str, int, int, str]] = field(default_factory=list)
    skips: Counter = field(default_factory=Counter)
    stopped: bool = False
    rows: bool = False
    hashes: np.ndarray | None = None  # per document, with dedup


class _Records:
    """What parsing one chunk found: the texts of good records, and what was skipped."""

    def __init__(self, keys: int, *, skip_bad: bool, empty_is_error: bool) -> None:
        self.texts: list[list[str]] = [[] for _ in range(keys)]
        self.problems: list[tuple[str, int, int, str]] = []
        self.skips: Counter = Counter()
        self.stopped = False
        self._skip_bad = skip_bad
        self._empty_is_error = empty_is_error

    def add(self, values: list[str]) -> None:
        for texts, value in zip(self.texts, values):
            texts.append(value)

    def skip(self, kind: str, index: int, reason: str = "") -> None:
        """A record left out; stops the chunk when it is an error and errors are not skipped."""
        if kind == "bad" or (kind == "empty" and self._empty_is_error):
            if not self._skip_bad:
                self.problems.append(("error", index, -1, reason))
                self.stopped = True
                return
            kind = "bad"
        self.skips[kind] += 1
        if kind != "blank" and sum(p[0] == kind for p in self.problems) < EXAMPLES:
            self.problems.append((kind, index, -1, reason))


def _newline_offsets(data: bytes | bytearray, block: int = 16 << 20) -> np.ndarray:
    """Positions of the newlines in `data`, found a block at a time (no copy of a long line)."""
    view = memoryview(data)
    found = [
        np.flatnonzero(np.frombuffer(view[a : a + block], dtype=np.uint8) == 10) + a for a in range(0, len(data), block)
    ]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _check_long(key: str, value: LongText) -> tuple[str, str] | None:
    """`_check_text` for a huge value, a window at a time (every window: each is decoded here)."""
    blank = True
    try:
        for window in value.windows():
            blank = blank and window.isspace()
            if not window.isascii() and (found := _SURROGATE.search(window)) is not None:
                return "bad", f"{key!r} is not valid Unicode text (a lone surrogate: {found.group()!r})"
    except UnicodeDecodeError as exc:
        return "bad", f"{key!r} is not valid UTF-8 ({exc.reason})"
    except ValueError as exc:  # a bad escape in a huge JSON string
        return "bad", f"invalid JSON ({exc})"
    return ("empty", f"empty document: {key!r} holds no text") if blank else None


def _check_text(key: str, value: object) -> tuple[str, str] | None:
    """(kind, reason) when `value` cannot be a document, else None."""
    if value is None:
        return "bad", f"{key!r} is null"
    if value is INVALID_UTF8:
        return "bad", f"{key!r} is not valid UTF-8"
    if isinstance(value, LongText):
        return _check_long(key, value)
    if not isinstance(value, str):
        return "bad", f"{key!r} holds {type(value).__name__}, not a string"
    if not value or value.isspace():
        return "empty", f"empty document: {key!r} holds no text"
    # JSON escapes can spell lone surrogates, which no tokenizer accepts.
    if not value.isascii() and (found := _SURROGATE.search(value)) is not None:
        return "bad", f"{key!r} is not valid Unicode text (a lone surrogate at character {found.start()})"
    return None


class ChunkEncoder:
    """Decode, parse, check and tokenize one chunk (picklable; one per worker process)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        keys: Sequence[str],
        append_eod: bool,
        skip_bad_lines: bool,
        empty: str = "skip",
        dedup: bool = False,
    ) -> None:
        if empty not in ("skip", "error"):
            raise PreprocessError(f"empty must be 'skip' or 'error', got {empty!r}")
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.append_eod = append_eod
        self.skip_bad_lines = skip_bad_lines
        self.empty = empty
        self.dedup = dedup
        self.dtype = dtype_for_vocab(tokenizer.vocab_size)
        self.split_mode = split_mode(tokenizer)  # probed once here, not in every worker

    def __call__(self, chunk: Chunk) -> ChunkResult:
        records = _Records(len(self.keys), skip_bad=self.skip_bad_lines, empty_is_error=self.empty == "error")
        nbytes = chunk.nbytes
        if chunk.rows:
            self._parse_rows(chunk, records)
        else:
            self._parse_lines(chunk, records)
        result = ChunkResult(chunk.file_index, chunk.offset, chunk.line, len(records.texts[0]), nbytes, [], [])
        result.problems, result.skips, result.stopped, result.rows = (
            records.problems,
            records.skips,
            records.stopped,
            chunk.rows,
        )
        if not records.stopped:
            if self.dedup:
                result.hashes = as_hashes([record_hash(values) for values in zip(*records.texts)])
            for texts in records.texts:
                tokens, lengths = self._tokenize(texts)
                result.tokens.append(tokens)
                result.lengths.append(lengths)
        return result

    # -- parsing ------------------------------------------------------------------------------

    def _parse_lines(self, chunk: Chunk, records: _Records) -> None:
        data = chunk.data
        chunk.data = b""  # a long line's bytes are freed once decoded (the caller holds no copy)
        newlines = _newline_offsets(data) if chunk.line is None else None
        if len(data) > HUGE_BYTES:
            self._parse_huge_chunk(data, records)
            self._number_problems(chunk, records, newlines)
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            lines: list = data.split(b"\n")
        else:
            del data
            lines = text.split("\n")
            del text
        last = len(lines) - 1
        for i in range(len(lines)):
            self._parse_line(lines, i, records, final=i == last)
        self._number_problems(chunk, records, newlines)

    def _number_problems(self, chunk: Chunk, records: _Records, newlines: np.ndarray | None) -> None:
        if newlines is not None:  # byte offsets of the bad lines, for line numbers in split files
            records.problems = [
                (kind, i, chunk.offset + (0 if i == 0 else int(newlines[i - 1]) + 1), why)
                for kind, i, _, why in records.problems
            ]

    def _parse_huge_chunk(self, data: bytes | bytearray, records: _Records) -> None:
        """A chunk over HUGE_BYTES (usually one line: sources.iter_chunks makes a long line a
        chunk of its own), line by line; a huge line is scanned, not decoded whole."""
        start, i = 0, 0
        while start < len(data) and not records.stopped:
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end
            line = data if start == 0 and end >= len(data) - 1 else bytes(data[start:end])
            values = None
            if len(line) > HUGE_BYTES:
                try:
                    values = parse_huge_line(line, self.keys)
                except KeyError as exc:
                    why = f"no key (keys present: {exc.args[0]}); choose the field with --json-keys"
                    records.skip("bad", i, why)
                    start, i = end + 1, i + 1
                    continue
            if values is None:  # an ordinary line, or one the scanner does not follow
                self._parse_line([line], 0, records, final=False, index=i)
            else:
                problem = next(filter(None, (_check_text(k, v) for k, v in zip(self.keys, values))), None)
                if problem is not None:
                    records.skip(problem[0], i, problem[1])
                else:
                    records.add(values)
            del line, values
            start, i = end + 1, i + 1

    def _parse_line(self, lines: list, i: int, records: _Records, *, final: bool, index: int | None = None) -> None:
        line = lines[i]
        lines[i] = ""  # so that a long line is freed as soon as it is parsed
        i = i if index is None else index
        if isinstance(line, (bytes, bytearray)):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                records.skip("bad", i, f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)")
                return
        if not line or line.isspace():
            if line or not final:  # the "" after a chunk's last newline is no line
                records.skip("blank", i)
            return
        values, problem = self._values(line)
        del line
        if problem is not None:
            records.skip(problem[0], i, problem[1])
        else:
            records.add(values)

    def _values(self, line: str) -> tuple[list[str], tuple[str, str] | None]:
        try:
            record = json.loads(line)
        except ValueError as exc:
            msg = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            return [], ("bad", f"invalid JSON ({msg})")
        if not isinstance(record, dict):
            return [], ("bad", f"expected a JSON object, got {type(record).__name__}")
        values = []
        for key in self.keys:
            if key not in record:
                present = ", ".join(repr(k) for k in list(record)[:10])
                return [], ("bad", f"no key {key!r} (keys present: {present}); choose the field with --json-keys")
            problem = _check_text(key, record[key])
            if problem is not None:
                return [], problem
            values.append(record[key])
        return values, None

    def _parse_rows(self, chunk: Chunk, records: _Records) -> None:
        data = chunk.data
        chunk.data = b""
        columns = read_row_chunk(data, self.keys)
        del data
        for i in range(len(columns[0])):
            values = [column[i] for column in columns]
            for column in columns:
                column[i] = None  # freed as it is taken
            problem = next(filter(None, (_check_text(k, v) for k, v in zip(self.keys, values))), None)
            if problem is not None:
                records.skip(problem[0], i, problem[1])
                if records.stopped:
                    return
            else:
                records.add(values)

    # -- tokenizing ---------------------------------------------------------------------------

    def _tokenize(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
        """(flat tokens, tokens per document) of `texts`, documents over PIECE_CHARS (and every
        LongText) a piece at a time."""
        long = [j for j, t in enumerate(texts) if not isinstance(t, str) or len(t) > PIECE_CHARS]
        short = texts if not long else [t for t in texts if isinstance(t, str) and len(t) <= PIECE_CHARS]
        ids = self.tokenizer.encode_batch(short, num_threads=1)
        if self.append_eod:
            for doc in ids:
                doc.append(self.tokenizer.eod)
        if not long:
            n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            return np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(n.sum())), n
        parts: list[np.ndarray] = []
        shorts = iter(ids)
        for j, text in enumerate(texts):
            if long and j == long[0]:
                long.pop(0)
                texts[j] = ""  # the caller's copy of a long text is its last reference
                parts.append(self._encode_long(text))
                del text
            else:
                parts.append(np.asarray(next(shorts), dtype=self.dtype))
        n = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        return (np.concatenate(parts) if len(parts) > 1 else parts[0]), n

    def _encode_long(self, text: str) -> np.ndarray:
        suffix = [self.tokenizer.eod] if self.append_eod else []
        return encode_long(self.tokenizer, text, mode=self.split_mode, dtype=self.dtype, suffix=suffix)
