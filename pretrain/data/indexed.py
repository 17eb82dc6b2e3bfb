"""Token files in megatron-core's `MMIDIDX` indexed-dataset format (`PREFIX.bin` + `PREFIX.idx`).

Byte-compatible with megatron-core 0.16.1 (`megatron/core/datasets/indexed_dataset.py`), so
data preprocessed here trains there and the reverse. Layout, all little-endian:

`.bin`: the tokens of every sequence, back to back, in the dataset's dtype.

`.idx`:
    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code (see _DTYPE_BY_CODE)
    uint64    sequence count N
    uint64    document count D (length of document_indices; it starts with 0, so D-1 documents)
    int32[N]  sequence lengths, in tokens
    int64[N]  sequence pointers, byte offsets into .bin
    int64[D]  document indices: document j is sequences [doc[j], doc[j+1])
   (int8[N]   sequence modes, only in megatron's multimodal variant; ignored here)

Our writer stores one sequence per document, as megatron's GPT preprocessing does; appending
another dataset (merging) keeps that dataset's grouping of sequences into documents.
"""

from __future__ import annotations

import mmap
import operator
import os
import struct
import tempfile
from array import array
from types import TracebackType

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
HEADER_SIZE = _HEADER.size  # 34 bytes

_DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_BY_DTYPE: dict[np.dtype, int] = {dt: code for code, dt in _DTYPE_BY_CODE.items()}

# Sequence lengths are int32 on disk.
_MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max
# Index arrays are validated in cache-sized blocks, so that opening a huge index allocates nothing
# of its size.
_VALIDATE_CHUNK = 1 << 16


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair is missing, foreign, truncated or inconsistent."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token dtype megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _code_for(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        raise ValueError(f"big-endian dtype {dt} is not part of the format; use the little-endian one")
    code = _CODE_BY_DTYPE.get(dt.newbyteorder("="))
    if code is None:
        names = ", ".join(str(d) for d in _CODE_BY_DTYPE)
        raise ValueError(f"dtype {dt} cannot be stored in an indexed dataset; use one of: {names}")
    return code


def _le(dtype: np.dtype) -> np.dtype:
    """The little-endian version of `dtype` (the format is little-endian on every machine)."""
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; the renamed outputs should get the mode open() would give
    # them, so that other users of a shared cluster can read the data.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class IndexedDatasetWriter:
    """Write `PREFIX.bin` and `PREFIX.idx`, one sequence per document.

    Tokens go to temporary files beside the targets; `finalize()` renames `.bin` and then
    `.idx` into place, so an interrupted write never leaves a file under the final names
    (readers treat the `.idx` as the mark of a complete pair). As a context manager it
    finalizes on a clean exit and deletes the temporary files on an exception.
    """

    def __init__(self, prefix: str, *, dtype: np.dtype | type) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = _code_for(self.dtype)
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise ValueError(f"cannot write {prefix}.bin: directory {directory!r} does not exist")
        base = os.path.basename(prefix)
        fd, self._bin_tmp = tempfile.mkstemp(prefix=f".{base}.bin.", suffix=".tmp", dir=directory)
        os.fchmod(fd, _default_file_mode())
        self._bin = os.fdopen(fd, "wb")
        self._idx_tmp: str | None = None
        # Compact int64 arrays: a Python list of ints costs ~4x more per document.
        self._lengths = array("q")
        # Sequence count at the end of each document; our own writes put one sequence in each
        # document, appended datasets (merging) keep their own grouping.
        self._doc_ends = array("q")
        self._done = False
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._bounds: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._bounds = None

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document (one sequence) of tokens."""
        self._check_open()
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise ValueError(f"a document must be a 1-D token sequence, got shape {ids.shape}")
        if ids.size > _MAX_SEQUENCE_LENGTH:
            raise ValueError(f"a document of {ids.size} tokens exceeds the format's int32 length field")
        if self._bounds is not None and ids.size and ids.dtype.kind not in "iub":
            raise ValueError(f"token ids must be integers for dtype {self.dtype}, got {ids.dtype}")
        # A plain astype would wrap an id that does not fit (70000 -> 4464 in uint16) silently.
        if self._bounds is not None and ids.size and ids.dtype != self.dtype:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < self._bounds[0] or hi > self._bounds[1]:
                raise ValueError(
                    f"token ids in [{lo}, {hi}] do not fit dtype {self.dtype} of {self.prefix}; "
                    f"pick the dtype with dtype_for_vocab(vocab_size)"
                )
        self._bin.write(np.ascontiguousarray(ids, dtype=_le(self.dtype)).tobytes())
        self._lengths.append(int(ids.size))
        self._doc_ends.append(len(self._lengths))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: `tokens` back to back, `lengths[i]` tokens each.

        `tokens` must already have the writer's dtype (the bulk path does no per-id range check).
        """
        self._check_open()
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if tokens.dtype.newbyteorder("=") != self.dtype.newbyteorder("=") or tokens.ndim != 1:
            raise ValueError(f"add_documents needs a 1-D {self.dtype} array, got {tokens.dtype} {tokens.shape}")
        if lengths.ndim != 1 or (lengths.size and (lengths.min() < 0 or lengths.max() > _MAX_SEQUENCE_LENGTH)):
            raise ValueError("document lengths must be a 1-D array of int32-sized non-negative counts")
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"document lengths sum to {int(lengths.sum())}, but {tokens.size} tokens were given")
        self._bin.write(np.ascontiguousarray(tokens, dtype=_le(self.dtype)).data)
        start = len(self._lengths)
        self._lengths.frombytes(lengths.astype(np.int64).tobytes())
        self._doc_ends.frombytes(np.arange(start + 1, start + len(lengths) + 1, dtype=np.int64).tobytes())

    def add_dataset(self, other: IndexedDataset, *, chunk_bytes: int = 64 << 20) -> None:
        """Append every sequence of another dataset of the same dtype, keeping its documents."""
        self._check_open()
        if other.dtype != self.dtype:
            raise ValueError(
                f"cannot append {other.prefix} ({other.dtype}) to {self.prefix} ({self.dtype}): token dtypes differ"
            )
        with open(other.bin_path, "rb") as src:  # the reader validated its size on open
            while block := src.read(chunk_bytes):
                self._bin.write(block)
        start = len(self._lengths)
        self._lengths.frombytes(other.sequence_lengths.astype(np.int64).tobytes())
        self._doc_ends.frombytes((other.document_indices[1:].astype(np.int64) + start).tobytes())

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")

    def __len__(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")
        self._done = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
            documents = np.concatenate([[0], np.frombuffer(self._doc_ends, dtype=np.int64)]).astype(np.int64)
            directory = os.path.dirname(self._bin_tmp)
            fd, self._idx_tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(self.prefix)}.idx.", suffix=".tmp", dir=directory
            )
            os.fchmod(fd, _default_file_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, _VERSION, self._code, len(lengths), len(documents)))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(documents.astype("<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            # A stale .idx from an earlier run must not pair with the new .bin, even briefly.
            if os.path.exists(self.prefix + ".idx"):
                os.remove(self.prefix + ".idx")
            os.replace(self._bin_tmp, self.prefix + ".bin")
            os.replace(self._idx_tmp, self.prefix + ".idx")
        except BaseException:
            self._remove_temporaries()
            raise

    def abort(self) -> None:
        """Drop everything written so far; the final names are left untouched."""
        self._done = True
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


def _read_only(attribute: str, doc: str) -> property:
    """A public, read-only name for one of the reader's own fields: assigning to it could only
    make the reader disagree with its mapped files."""
    return property(operator.attrgetter(attribute), doc=doc)


class IndexedDataset:
    """Read-only, memory-mapped view of `PREFIX.bin` / `PREFIX.idx`.

    Every array handed out is a view into the mapped files (no copy). The whole index is
    validated on open, so no later read can go past the end of `.bin`.
    """

    def __init__(self, prefix: str) -> None:
        self._open(prefix)

    def _open(self, prefix: str) -> None:
        self.prefix = prefix
        self.idx_path = prefix + ".idx"
        self.bin_path = prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path}: file not found (an indexed dataset is PREFIX.bin + PREFIX.idx; "
                    f"pass the prefix without extension, as tools/preprocess_data.py prints it)"
                )
        self._open_index()
        self._open_tokens()
        self._validate()

    def _error(self, path: str, what: str) -> IndexedDatasetError:
        return IndexedDatasetError(f"{path}: {what}")

    def _open_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        if size < HEADER_SIZE:
            raise self._error(path, f"truncated index: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        with open(path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != _MAGIC:
            raise self._error(path, f"not a megatron MMIDIDX index (magic {magic!r}, expected {_MAGIC!r})")
        if version != _VERSION:
            raise self._error(path, f"unsupported index version {version} (only {_VERSION} exists)")
        if code not in _DTYPE_BY_CODE:
            raise self._error(path, f"unknown dtype code {code} (known: {sorted(_DTYPE_BY_CODE)})")
        # Python ints: a garbled count cannot overflow this arithmetic.
        expected = HEADER_SIZE + n_seq * 4 + n_seq * 8 + n_doc * 8
        if size < expected:
            raise self._error(
                path,
                f"truncated index: {size} bytes, but {n_seq} sequences and {n_doc} document "
                f"indices need {expected} bytes",
            )
        if size not in (expected, expected + n_seq):  # + n_seq: megatron's multimodal modes
            raise self._error(path, f"index is {size} bytes, expected {expected}: trailing bytes or garbled counts")
        self._dtype = _DTYPE_BY_CODE[code]
        self._n_seq = n_seq
        self._idx_size = size
        with open(path, "rb") as f:
            self._idx_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = HEADER_SIZE
        self._lengths = np.frombuffer(self._idx_map, dtype="<i4", count=n_seq, offset=offset)
        offset += n_seq * 4
        self._pointers = np.frombuffer(self._idx_map, dtype="<i8", count=n_seq, offset=offset)
        offset += n_seq * 8
        self._documents = np.frombuffer(self._idx_map, dtype="<i8", count=n_doc, offset=offset)

    def _open_tokens(self) -> None:
        self._bin_size = os.path.getsize(self.bin_path)
        itemsize = self._dtype.itemsize
        if self._bin_size % itemsize:
            raise self._error(
                self.bin_path, f"size {self._bin_size} is not a multiple of the {self._dtype} item size {itemsize}"
            )
        if self._bin_size == 0:  # mmap refuses empty files
            self._bin_map = None
            self._tokens = np.empty(0, dtype=_le(self._dtype))
            self._tokens.flags.writeable = False
            return
        with open(self.bin_path, "rb") as f:
            self._bin_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._tokens = np.frombuffer(self._bin_map, dtype=_le(self._dtype))

    def _validate(self) -> None:
        """Check that the index describes the .bin exactly, without reading it whole at once.

        Every megatron writer lays sequences out back to back, so pointer i+1 is pointer i plus
        length i tokens, and the last sequence ends at the end of .bin. Requiring exactly that
        layout catches garbled indices and mismatched .bin/.idx pairs, and guarantees in-bounds
        reads.
        """
        idx, itemsize = self.idx_path, self._dtype.itemsize
        docs = self._documents
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != self._n_seq:
            first = int(docs[0]) if len(docs) else None
            last = int(docs[-1]) if len(docs) else None
            raise self._error(
                idx, f"document indices must run from 0 to the sequence count {self._n_seq}, got {first}..{last}"
            )
        # Blocks small enough to stay in cache, through reused buffers: opening a large index
        # costs a few passes over it at memory speed and no fresh allocations.
        block = min(_VALIDATE_CHUNK, max(1, self._n_seq))
        lengths, expected = np.empty(block, dtype=np.int64), np.empty(block + 1, dtype=np.int64)
        expected_pointer = 0
        for start in range(0, self._n_seq, block):
            n = min(block, self._n_seq - start)
            np.multiply(self._lengths[start : start + n], itemsize, out=lengths[:n], dtype=np.int64)
            if lengths[:n].min() < 0:
                bad = start + int(np.argmax(lengths[:n] < 0))
                raise self._error(idx, f"sequence {bad} has negative length {int(self._lengths[bad])}")
            expected[0] = expected_pointer
            np.cumsum(lengths[:n], out=expected[1 : n + 1])
            expected[1 : n + 1] += expected_pointer
            pointers = self._pointers[start : start + n]
            if not np.array_equal(expected[:n], pointers):
                bad = start + int(np.argmax(expected[:n] != pointers))
                raise self._error(
                    idx,
                    f"sequence {bad} has pointer {int(self._pointers[bad])}, expected {int(expected[bad - start])} "
                    "(sequences must be stored back to back)",
                )
            expected_pointer = int(expected[n])
        if expected_pointer != self._bin_size:
            raise self._error(
                self.bin_path,
                f"size {self._bin_size} bytes, but {idx} describes {expected_pointer} bytes "
                "(the .bin and .idx do not belong together, or one is truncated)",
            )
        decreasing = np.empty(block, dtype=bool)
        for start in range(1, len(docs), block):
            # Each element against its predecessor, across block borders too.
            n = min(block, len(docs) - start)
            np.less(docs[start : start + n], docs[start - 1 : start - 1 + n], out=decreasing[:n])
            if decreasing[:n].any():
                raise self._error(idx, "document indices are not non-decreasing")

    # -- pickling: workers reopen the files instead of copying mapped memory ------------------

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self._open(state["prefix"])

    # -- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n_seq

    def _check_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._n_seq
        if not 0 <= i < self._n_seq:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({self._n_seq} sequences)")
        return i

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence `i` as a read-only view into `.bin`."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `i` (to its end when length is None)."""
        i = self._check_index(i)
        seq_len = int(self._lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"offset {offset} and length {length} exceed sequence {i} of {seq_len} tokens in {self.prefix}"
            )
        start = int(self._pointers[i]) // self._dtype.itemsize + offset
        return self._tokens[start : start + length]

    dtype = _read_only("_dtype", "The token dtype of `.bin`.")
    sequence_lengths = _read_only("_lengths", "int32 [N]: tokens per sequence.")
    sequence_pointers = _read_only("_pointers", "int64 [N]: byte offset of each sequence in `.bin`.")
    document_indices = _read_only(
        "_documents", "int64 [D]: document j is sequences [document_indices[j], document_indices[j+1])."
    )
    tokens = _read_only(
        "_tokens", "All tokens of `.bin` as one flat read-only view; sequence i starts at pointer // itemsize."
    )
    idx_bytes = _read_only("_idx_size", "Size of the `.idx` file: part of what identifies the data for index caches.")

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={self._n_seq}, tokens={self.num_tokens}, dtype={self._dtype})"
        )


def merge_datasets(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Write `output_prefix` as the concatenation of `prefixes` (sequences and documents in
    order) and return it opened. All inputs are validated before anything is written."""
    if not prefixes:
        raise ValueError(f"nothing to merge into {output_prefix}")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise ValueError(f"the output prefix {output_prefix!r} is also an input")
    sources = [IndexedDataset(p) for p in prefixes]
    if len({s.dtype for s in sources}) > 1:
        detail = ", ".join(f"{s.prefix}: {s.dtype}" for s in sources)
        raise ValueError(f"inputs have different token dtypes ({detail}); tokenize them with one tokenizer")
    with IndexedDatasetWriter(output_prefix, dtype=sources[0].dtype) as writer:
        for source in sources:
            writer.add_dataset(source)
    return IndexedDataset(output_prefix)
