"""Rows of a Parquet row group of huge documents, read page by page without pyarrow's decoder.

pyarrow reading one 200 MB value peaks at 3.5x the value (the compressed column chunk, the
decompressed page, the dictionary array and its dense copy) and keeps 2.4x resident after it
returns (bench/RESULTS.md). Here each page is read into memory, decompressed with pyarrow's
codec (`pyarrow.decompress`) and its values are handed out as zero-copy views of the
decompressed buffer: the peak is the compressed page plus the decompressed one, and what stays
is the page being read.

Covered: a flat text column (BYTE_ARRAY, optional or required), data pages v1 and v2, values
PLAIN or dictionary-encoded (as pyarrow writes them), codecs pyarrow can decompress. Anything
else (`supported` says no) is read by pyarrow as before. The page header is Thrift's compact
protocol, read by `_Thrift` below (only what a page header holds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _PLAIN_DICTIONARY, _RLE, _BIT_PACKED, _RLE_DICTIONARY = 0, 2, 3, 4, 8
_CODECS = {
    "UNCOMPRESSED": None,
    "SNAPPY": "snappy",
    "GZIP": "gzip",
    "BROTLI": "brotli",
    "ZSTD": "zstd",
    "LZ4_RAW": "lz4_raw",
}
_ENCODINGS = {"PLAIN", "PLAIN_DICTIONARY", "RLE_DICTIONARY", "RLE", "BIT_PACKED"}
_HEADER_BYTES = 64 << 10  # a page header with its statistics; read again larger if it is longer


class PageError(ValueError):
    """A page this reader does not follow (the caller names the file)."""


class _Thrift:
    """Thrift compact protocol: structs as {field id: value}, the types a page header uses."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _byte(self) -> int:
        if self.pos >= len(self.data):
            raise IndexError("page header runs past the bytes read")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self._byte()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    def _int(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)  # zigzag

    def _value(self, kind: int):
        if kind in (1, 2):  # booleans inside a struct: the type is the value
            return kind == 1
        if kind == 3:
            return self._byte()
        if kind in (4, 5, 6):
            return self._int()
        if kind == 7:
            self.pos += 8
            return None
        if kind == 8:
            n = self.varint()
            self.pos += n
            return self.data[self.pos - n : self.pos]
        if kind in (9, 10):
            head = self._byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return [self._byte() == 1 if elem in (1, 2) else self._value(elem) for _ in range(size)]
        if kind == 11:
            size = self.varint()
            types = self._byte() if size else 0
            return {self._value(types >> 4): self._value(types & 0x0F) for _ in range(size)}
        if kind == 12:
            return self.struct()
        raise PageError(f"unknown Thrift type {kind}")

    def struct(self) -> dict[int, object]:
        fields: dict[int, object] = {}
        last = 0
        while (head := self._byte()) != 0:
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self._int()
            fields[last] = self._value(kind)
        return fields


def supported(parquet, group: int, keys: Sequence[str]) -> bool:
    """True when every key column of the row group is one this reader follows."""
    names = {parquet.schema.column(i).path: i for i in range(parquet.metadata.num_columns)}
    for key in keys:
        column = parquet.schema.column(names[key])
        chunk = parquet.metadata.row_group(group).column(names[key])
        if column.physical_type != "BYTE_ARRAY" or column.max_repetition_level or column.max_definition_level > 1:
            return False
        if chunk.compression not in _CODECS or not set(chunk.encodings) <= _ENCODINGS:
            return False
    return True


def iter_rows(path: str, parquet, group: int, keys: Sequence[str]) -> Iterator[list]:
    """Per row of the group: per key, None (null) or the value's bytes as a uint8 view."""
    names = {parquet.schema.column(i).path: i for i in range(parquet.metadata.num_columns)}
    with open(path, "rb") as f:
        columns = [_column_rows(f, parquet, group, names[key]) for key in keys]
        for _ in range(parquet.metadata.row_group(group).num_rows):
            yield [next(c) for c in columns]


def _column_rows(f, parquet, group: int, index: int) -> Iterator:
    chunk = parquet.metadata.row_group(group).column(index)
    optional = parquet.schema.column(index).max_definition_level == 1
    codec = _CODECS[chunk.compression]
    pos = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = pos + chunk.total_compressed_size
    dictionary = None
    while pos < end:
        header, pos = _page_header(f, pos)
        size = header[3]
        kind = header[1]
        if kind == _DICTIONARY_PAGE:
            dictionary = _plain_values(_read_page(f, pos, size, header[2], codec, 0), header[7][1])
        elif kind in (_DATA_PAGE, _DATA_PAGE_V2):
            yield from _data_page(f, pos, header, codec, optional, dictionary)
        pos += size


def _page_header(f, pos: int) -> tuple[dict, int]:
    length = _HEADER_BYTES
    while True:
        f.seek(pos)
        data = f.read(length)
        reader = _Thrift(data)
        try:
            return reader.struct(), pos + reader.pos
        except IndexError:
            if len(data) < length:
                raise PageError("the file ends inside a page header") from None
            length *= 4


def _read_page(f, pos: int, size: int, plain_size: int, codec: str | None, skip: int) -> np.ndarray:
    """The page's bytes after its first `skip` (uncompressed level) bytes, decompressed."""
    import pyarrow as pa

    raw = np.empty(size, dtype=np.uint8)
    f.seek(pos)
    if f.readinto(memoryview(raw)) != size:
        raise PageError("the file ends inside a page")
    if codec is None:
        return raw[skip:]
    body = pa.decompress(pa.py_buffer(raw[skip:]), plain_size - skip, codec=codec, asbytes=False)
    del raw  # the compressed page goes before its values are handed out
    return np.frombuffer(body, dtype=np.uint8)


def _data_page(f, pos: int, header: dict, codec, optional: bool, dictionary) -> Iterator:
    if header[1] == _DATA_PAGE:
        info = header[5]
        count, encoding = info[1], info[2]
        page = _read_page(f, pos, header[3], header[2], codec, 0)
        levels = None
        if optional:
            if info[3] != _RLE:
                raise PageError(f"definition levels encoded {info[3]}, not RLE")
            n = int(page[:4].view("<u4")[0])
            levels, page = _hybrid(page[4 : 4 + n], 1, count), page[4 + n :]
    else:
        info = header[8]
        count, encoding = info[1], info[4]
        skip = info[5] + info[6]
        compressed = codec if info.get(7, True) else None
        page = _read_page(f, pos, header[3], header[2], compressed, skip)
        if info[6]:
            raise PageError("repetition levels in a flat column")
        levels = _levels_v2(f, pos, info[5], count) if optional else None
    present = count if levels is None else int(levels.sum())
    if encoding == _PLAIN:
        values = _plain_values(page, present)
    elif encoding in (_PLAIN_DICTIONARY, _RLE_DICTIONARY) and dictionary is not None:
        width = int(page[0])
        values = [dictionary[i] for i in _hybrid(page[1:], width, present).tolist()]
    else:
        raise PageError(f"page encoding {encoding}")
    it = iter(values)
    for i in range(count):
        yield next(it) if levels is None or levels[i] else None


def _levels_v2(f, pos: int, length: int, count: int) -> np.ndarray:
    f.seek(pos)
    return _hybrid(np.frombuffer(f.read(length), dtype=np.uint8), 1, count)


def _plain_values(page: np.ndarray, count: int) -> list[np.ndarray]:
    """PLAIN BYTE_ARRAY: each value a 4-byte little-endian length and its bytes; views."""
    values, at = [], 0
    for _ in range(count):
        n = int(page[at : at + 4].view("<u4")[0])
        values.append(page[at + 4 : at + 4 + n])
        at += 4 + n
    if at > len(page):
        raise PageError("values run past the end of the page")
    return values


def _hybrid(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """`count` values of the RLE / bit-packed hybrid encoding, `width` bits each."""
    out, total, reader = [], 0, _Thrift(data.tobytes())
    weights = 1 << np.arange(width, dtype=np.int64)
    while total < count:
        head = reader.varint()
        at = reader.pos
        if head & 1:  # bit-packed: (head >> 1) groups of 8 values
            nbytes = (head >> 1) * width
            bits = np.unpackbits(data[at : at + nbytes], bitorder="little").reshape(-1, width)
            values = bits @ weights if width else np.zeros(8 * (head >> 1), np.int64)
            reader.pos = at + nbytes
        else:  # a run of one value
            size = (width + 7) // 8
            values = np.full(head >> 1, int.from_bytes(reader.data[at : at + size], "little"), dtype=np.int64)
            reader.pos = at + size
        if not len(values):
            raise PageError("an empty run in the RLE / bit-packed encoding")
        out.append(values)
        total += len(values)
    return np.concatenate(out)[:count] if out else np.zeros(0, np.int64)
