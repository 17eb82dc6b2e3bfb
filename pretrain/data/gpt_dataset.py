"""GPT training samples with megatron-core's document, sample and shuffle indices.

For the same `.bin/.idx`, split, seed, sequence length and sample count, sample k here holds
exactly the tokens of sample k of megatron-core 0.16.1's `GPTDataset` (tested against it), so a
run can move between the two frameworks without changing its data order. How megatron builds
them (`gpt_dataset.py`, `helpers.cpp: build_sample_idx`):

- A split is a contiguous range of sequences (one per document for GPT data), bounded by
  round(cumulative split ratio x sequence count).
- Epochs: as many passes over the split as it takes to reach `num_samples` samples (one when
  `num_samples` is None).
- Document index: the split's sequence ids repeated once per epoch, shuffled by
  `np.random.RandomState(seed)`. When more than one epoch is needed and the last one
  contributes under 80% of an epoch's samples, that last epoch is shuffled separately.
- Sample index: the documents are laid end to end in that order; sample k covers the
  `seq_length + 1` tokens starting at position k * seq_length (neighbours share one token). The
  index stores, for each sample boundary, (position in the document index, offset in that
  document). megatron walks the documents in a compiled C++ loop; here a cumulative sum and a
  `searchsorted` per block of documents compute the same array, as fast, with no compile step.
- Shuffle index: a permutation of the samples from the same RandomState (the samples of a
  separated last epoch are shuffled among themselves, after the others).

The three arrays are cached on disk (see `cache.py`) and memory-mapped; reads are vectorised
over a whole batch of samples.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pretrain.data.cache import DEFAULT_WAIT_SECONDS, cached_arrays
from pretrain.data.indexed import IndexedDataset

SPLITS = ("train", "valid", "test")
# megatron: a final epoch contributing fewer than this share of an epoch's samples is shuffled
# on its own, so that it does not dilute the others.
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
_SAMPLE_INDEX_BLOCK = 1 << 16


def split_bounds(num_documents: int, ratios: Sequence[float]) -> list[tuple[int, int] | None]:
    """[begin, end) sequence ranges of train / valid / test, as megatron-core computes them.

    Ratios are normalised; bookends are round(cumulative ratio * num_documents). A split whose
    ratio is 0 is None (megatron builds no dataset for it).
    """
    ratios = [float(r) for r in ratios]
    if len(ratios) != 3 or any(not r >= 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(
            f"split ratios must be 3 non-negative numbers with a positive sum, e.g. 98,2,0; got {tuple(ratios)}"
        )
    normalized = (np.array(ratios, dtype=np.float64) / np.sum(np.array(ratios, dtype=np.float64))).tolist()
    edges = [0.0]
    for r in normalized:  # summed left to right in Python floats, as megatron does
        edges.append(edges[-1] + r)
    bounds: list[tuple[int, int] | None] = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if hi <= lo:
            bounds.append(None)
        else:
            bounds.append((int(round(lo * float(num_documents))), int(round(hi * float(num_documents)))))
    return bounds


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """Passes over the split needed for `num_samples` samples of seq_length + 1 tokens."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def _shuffled_documents(
    documents: np.ndarray,
    lengths: np.ndarray,
    num_epochs: int,
    rng: np.random.RandomState,
    separate_final_epoch: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(document index, the documents' lengths in that order), both int32.

    Each document id travels with its length, packed into one int64 as id << 32 | length:
    RandomState's Fisher-Yates permutation depends only on the array's length, so this is
    megatron's permutation, and numpy shuffles 8-byte items faster than 4-byte ones. The
    lengths then come out in order without a random gather.
    """
    if separate_final_epoch and num_epochs > 1:
        head = _shuffled_documents(documents, lengths, num_epochs - 1, rng, False)
        tail = _shuffled_documents(documents, lengths, 1, rng, False)
        return np.concatenate([head[0], tail[0]]), np.concatenate([head[1], tail[1]])
    packed = documents.astype(np.int64) << 32
    packed |= lengths.astype(np.int64)
    packed = np.tile(packed, num_epochs)
    rng.shuffle(packed)
    return (packed >> 32).astype(np.int32), (packed & 0xFFFFFFFF).astype(np.int32)


def build_sample_index(
    ordered_lengths: np.ndarray, seq_length: int, num_samples: int, *, dtype: np.dtype | type = np.int64
) -> np.ndarray:
    """[num_samples + 1, 2]: (position in the document index, token offset) of each sample boundary.

    `ordered_lengths` are the lengths of the documents in document-index order. Boundary k
    (k >= 1) is where packed token k * seq_length lies: the last token of sample k-1 and the
    first of sample k. Row 0 is (0, 0), even when the first document is empty.
    """
    index = np.empty((num_samples + 1, 2), dtype=dtype)
    index[0] = 0
    # Documents are visited in blocks whose end positions stay in cache; the buffer is reused,
    # so a large index costs no page faults beyond the output.
    block = min(_SAMPLE_INDEX_BLOCK, max(1, len(ordered_lengths)))
    ends = np.empty(block, dtype=np.int64)
    next_k, base = 1, 0  # next boundary to place; packed position where the block starts
    for first in range(0, len(ordered_lengths), block):
        if next_k > num_samples:
            break
        lengths = ordered_lengths[first : first + block]
        n = len(lengths)
        np.cumsum(lengths, dtype=np.int64, out=ends[:n])
        ends[:n] += base
        block_end = int(ends[n - 1])
        last_k = min(num_samples, (block_end - 1) // seq_length) if block_end > 0 else 0
        if last_k >= next_k:
            positions = np.arange(next_k, last_k + 1, dtype=np.int64) * seq_length
            # The first document ending after the position holds it (empty documents end
            # where they start, so they are never chosen).
            j = np.searchsorted(ends[:n], positions, side="right")
            index[next_k : last_k + 1, 0] = first + j
            index[next_k : last_k + 1, 1] = positions - (ends[j] - lengths[j])
            next_k = last_k + 1
        base = block_end
    assert next_k == num_samples + 1, "the documents hold fewer tokens than the samples need"
    return index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    document_range: tuple[int, int],
    *,
    seq_length: int,
    seed: int,
    num_samples: int | None,
) -> dict[str, np.ndarray]:
    """megatron-core's document, sample and shuffle indices for one split (see module doc)."""
    begin, end = document_range
    documents = np.arange(begin, end, dtype=np.int32)
    tokens_per_epoch = int(np.sum(sequence_lengths[begin:end], dtype=np.int64))
    if tokens_per_epoch == 0:
        raise ValueError("the split holds no tokens")
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length)
    separate_final_epoch = False
    if num_epochs > 1:
        assert num_samples is not None
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length

    rng = np.random.RandomState(seed)
    document_index, ordered_lengths = _shuffled_documents(
        documents, sequence_lengths[begin:end], num_epochs, rng, separate_final_epoch
    )
    # megatron's rule: int32 unless the document index or a length could overflow it.
    limit = max(len(document_index), int(sequence_lengths.max()))
    dtype = np.int32 if limit <= np.iinfo(np.int32).max else np.int64
    # The shuffle index needs only the generator's state after the document shuffle, not the
    # sample index: build both at once (numpy's shuffle runs without the GIL).
    first = sans_final if separate_final_epoch else total_samples
    with ThreadPoolExecutor(max_workers=1) as pool:
        shuffle_index = pool.submit(build_shuffle_index, first, total_samples, rng)
        sample_index = build_sample_index(ordered_lengths, seq_length, total_samples, dtype=dtype)
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": shuffle_index.result(),
        }


def _lengths_fingerprint(lengths: np.ndarray) -> str:
    """A hash of about 4096 evenly spread sequence lengths: cheap at any size, and a corpus
    re-tokenized under the same name with the same totals still misses the cache."""
    step = max(1, len(lengths) // 4096)
    return hashlib.sha256(np.ascontiguousarray(lengths[::step], dtype="<i4").tobytes()).hexdigest()[:16]


def _check_arguments(split: str, seq_length: int, seed: int, num_samples: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be at least 1, got {seq_length}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer (it seeds megatron's shuffles), got {seed!r}")
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must be non-negative or None, got {num_samples}")


def default_cache_dir(prefix: str) -> str:
    """Index caches live beside the data they index."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


class GPTDataset:
    """Samples of `seq_length + 1` int64 tokens from one split of `PREFIX.bin/.idx`.

    `num_samples` is how many samples the run will draw (it sets the number of epochs, as in
    megatron); None builds one epoch. Indices are cached in `cache_dir` (default: `index-cache/`
    beside the data). With `create=False` the indices are never built here: the constructor
    waits for another process (the one with `create=True`) to cache them.
    """

    def __init__(
        self,
        data: IndexedDataset | str,
        *,
        seq_length: int,
        split: str = "train",
        split_ratios: Sequence[float] = (98, 2, 0),
        seed: int = 1234,
        num_samples: int | None = None,
        document_range: tuple[int, int] | None = None,
        cache_dir: str | None = None,
        create: bool = True,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
    ) -> None:
        _check_arguments(split, seq_length, seed, num_samples)
        self.indexed = data if isinstance(data, IndexedDataset) else IndexedDataset(data)
        self.prefix = self.indexed.prefix
        self.seq_length = seq_length
        self.split = split
        self.seed = seed
        self.num_samples = num_samples
        self.document_range = self._resolve_range(document_range, split_ratios)
        self.description = self._cache_description()
        self._load_indices(cache_dir, split_ratios, create=create, wait_seconds=wait_seconds)
        self._itemsize = self.indexed.dtype.itemsize
        self._offsets = np.arange(seq_length + 1, dtype=np.int64)

    def _resolve_range(self, document_range: tuple[int, int] | None, split_ratios: Sequence[float]) -> tuple[int, int]:
        """The split's [begin, end) documents: as given, else from `split_ratios`."""
        if document_range is None:
            bounds = split_bounds(len(self.indexed), split_ratios)[SPLITS.index(self.split)]
            document_range = bounds if bounds is not None else (0, 0)
        begin, end = document_range
        if not 0 <= begin <= end <= len(self.indexed):
            raise ValueError(f"document_range {document_range} is outside [0, {len(self.indexed)}]")
        return (begin, end)

    def _cache_description(self) -> dict:
        """Everything the indices depend on: the cache entry's key, so a change of any misses it."""
        begin, end = self.document_range
        return {
            "kind": "gpt_indices",
            # The data, identified by content summary rather than path so a moved copy keeps
            # its cache; a re-tokenized corpus changes these and so misses the cache.
            "data": os.path.basename(self.prefix),
            "data_sequences": len(self.indexed),
            "data_tokens": self.indexed.num_tokens,
            "data_idx_bytes": self.indexed.idx_bytes,
            "data_lengths_sample": _lengths_fingerprint(self.indexed.sequence_lengths),
            "documents": [begin, end],
            "seq_length": self.seq_length,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def _load_indices(
        self, cache_dir: str | None, split_ratios: Sequence[float], *, create: bool, wait_seconds: float
    ) -> None:
        """The three indices from the cache; missing there, built and stored (create=True) or
        waited for (create=False)."""
        directory = cache_dir if cache_dir is not None else default_cache_dir(self.prefix)
        arrays, self.built_index = cached_arrays(
            directory,
            f"{os.path.basename(self.prefix)}-{self.split}",
            self.description,
            lambda: self._build(split_ratios),
            create=create,
            wait_seconds=wait_seconds,
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self._num_samples = len(self.shuffle_index)
        self._check_indices()

    def _build(self, split_ratios: Sequence[float]) -> dict[str, np.ndarray]:
        begin, end = self.document_range
        num_tokens = self.num_tokens
        if num_tokens == 0 or ((num_tokens - 1) // self.seq_length < 1 and not self.num_samples):
            raise ValueError(
                f"the {self.split!r} split of {self.prefix} ({end - begin} documents, {num_tokens} tokens) "
                f"is too small for one sample of seq_length + 1 = {self.seq_length + 1} tokens; use more "
                f"data, a shorter model.seq_length, or a larger {self.split} share in split_ratios "
                f"(now {tuple(split_ratios)})"
            )
        return build_gpt_indices(
            self.indexed.sequence_lengths,
            (begin, end),
            seq_length=self.seq_length,
            seed=self.seed,
            num_samples=self.num_samples,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens in the split's documents (one epoch)."""
        begin, end = self.document_range
        return int(np.sum(self.indexed.sequence_lengths[begin:end], dtype=np.int64))

    def _check_indices(self) -> None:
        """O(1) consistency checks of (possibly cached) indices. Reads stay memory-safe whatever
        the cache holds: every gather below is bounds-checked by numpy."""
        d, s, sh = self.document_index, self.sample_index, self.shuffle_index
        problem = None
        if d.ndim != 1 or s.ndim != 2 or s.shape[1] != 2 or sh.ndim != 1 or len(s) != len(sh) + 1:
            problem = f"sample index of shape {s.shape} does not fit a shuffle index of {len(sh)} samples"
        elif len(sh) == 0:
            problem = "no samples"
        elif not (0 <= int(s[-1, 0]) < len(d) and 0 <= int(s[-1, 1]) and tuple(s[0]) == (0, 0)):
            problem = "sample index points past the document index"
        if problem:
            raise ValueError(
                f"index cache of {self.prefix} ({self.split}) is inconsistent: {problem}; delete it to rebuild"
            )

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, k: int) -> np.ndarray:
        """int64 [seq_length + 1]: the tokens of sample k."""
        k = int(k)
        if not 0 <= k < self._num_samples:
            raise IndexError(f"sample {k} out of range ({self._num_samples} samples in {self.split})")
        return self.get_batch(np.array([k]))[0]

    def get_batch(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 [len(indices), seq_length + 1]: several samples in one vectorised read."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # [b]
        b, width = len(idx), self.seq_length + 1
        if b == 0:
            return np.empty((0, width), dtype=np.int64)
        if idx.min() < 0 or idx.max() >= self._num_samples:
            raise IndexError(f"sample indices must lie in [0, {self._num_samples}) for the {self.split} split")
        j = self.shuffle_index[idx].astype(np.int64)
        first = self.sample_index[j].astype(np.int64)  # [b, 2] (document position, offset)
        last = self.sample_index[j + 1].astype(np.int64)
        pieces = last[:, 0] - first[:, 0] + 1  # documents each sample touches
        if np.all(pieces == 1):  # common with long documents: one slice per sample
            seq = self.document_index[first[:, 0]]
            start = self.indexed.sequence_pointers[seq] // self._itemsize + first[:, 1]
            flat = start[:, None] + self._offsets  # [b, s+1]
        else:
            total = int(pieces.sum())
            owner = np.repeat(np.arange(b), pieces)  # [P] sample of each piece
            head = np.cumsum(pieces) - pieces  # first piece of each sample
            position = np.arange(total) - head[owner] + first[owner, 0]
            seq = self.document_index[position]
            lo = np.zeros(total, dtype=np.int64)
            lo[head] = first[:, 1]
            hi = self.indexed.sequence_lengths[seq].astype(np.int64)
            hi[head + pieces - 1] = last[:, 1] + 1  # the shared boundary token is included
            size = hi - lo
            src = self.indexed.sequence_pointers[seq] // self._itemsize + lo
            out = np.cumsum(size) - size
            assert int(size.sum()) == b * width, "sample index and lengths disagree"
            flat = np.repeat(src - out, size) + np.arange(b * width)
        return self.indexed.tokens[flat].astype(np.int64).reshape(b, width)

    def locate(self, k: int, column: int) -> str:
        """Where token `column` of sample k comes from: the .bin file and its document and token
        numbers, for error messages about the data (the walk mirrors get_batch's pieces)."""
        j = int(self.shuffle_index[int(k)])
        position, offset = (int(v) for v in self.sample_index[j])
        while True:
            length = int(self.indexed.sequence_lengths[self.document_index[position]])
            if column < length - offset:
                break
            column -= length - offset
            position, offset = position + 1, 0
        document = int(self.document_index[position])
        return f"{self.prefix}.bin, document {document} (token {offset + column} of it), {self.split} sample {int(k)}"

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.prefix!r}, split={self.split!r}, seq_length={self.seq_length}, "
            f"samples={self._num_samples}, documents={self.document_range})"
        )
