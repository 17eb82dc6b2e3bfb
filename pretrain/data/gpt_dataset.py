"""Fixed-length GPT training samples packed from an indexed dataset.

The dataset's sequences (one per document, each ending in EOD when preprocessed with
`--append-eod`) are split Megatron-style into contiguous train / valid / test ranges by ratio.
A split's documents are laid end to end (in file order, or in an order shuffled once by
`seed`) and cut into samples of `seq_length + 1` tokens with stride `seq_length`: sample k
covers packed tokens [k*s, k*s + s + 1), so consecutive samples share one token and every
token is predicted exactly once. Shuffling samples is the loader's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pretrain.data.indexed import IndexedDataset

SPLITS = ("train", "valid", "test")


def split_bounds(num_documents: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """[begin, end) document ranges of train / valid / test, as megatron-core computes them.

    Ratios are normalised; bookends are round(cumulative ratio * num_documents).
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split_ratios must be 3 non-negative numbers with a positive sum, got {tuple(ratios)}")
    total = float(sum(ratios))
    cumulative = np.concatenate([[0.0], np.cumsum([r / total for r in ratios])])
    bounds = [int(round(c * num_documents)) for c in cumulative]
    bounds[-1] = num_documents  # guard against 0.9999999 * n rounding down
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class GPTDataset:
    """Samples of `seq_length + 1` int64 tokens from one split of `PREFIX.bin/.idx`."""

    def __init__(
        self,
        prefix: str,
        *,
        seq_length: int,
        split: str,
        split_ratios: tuple[float, float, float] = (98, 2, 0),
        seed: int | None = 1234,
    ) -> None:
        """`seed` shuffles the split's document order once before packing (so neighbouring
        files of a sorted corpus do not always share samples); None keeps file order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be at least 1, got {seq_length}")
        self.prefix = prefix
        self.seq_length = seq_length
        self.split = split
        self.indexed = IndexedDataset(prefix)

        # megatron-core's GPTDataset splits by sequence; ours hold one document each.
        begin, end = split_bounds(len(self.indexed), split_ratios)[SPLITS.index(split)]
        self.document_range = (begin, end)
        documents = np.arange(begin, end, dtype=np.int64)
        if seed is not None:
            documents = np.random.default_rng(seed).permutation(documents)
        lengths = self.indexed.sequence_lengths[documents].astype(np.int64)
        # The packing index: where each document starts in the packed stream and in .bin.
        self._packed_starts = np.zeros(len(documents) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._packed_starts[1:])
        self._bin_starts = self.indexed.sequence_pointers[documents] // self.indexed.dtype.itemsize
        self.num_tokens = int(self._packed_starts[-1])

        # Sample k needs packed tokens up to k*s + s, inclusive.
        self._num_samples = max(0, (self.num_tokens - 1) // seq_length)
        if self._num_samples == 0:
            raise ValueError(
                f"the {split!r} split of {prefix} ({end - begin} documents, {self.num_tokens} tokens) "
                f"is too small for one sample of seq_length + 1 = {seq_length + 1} tokens; use more "
                f"data, a shorter model.seq_length, or a larger {split} share in split_ratios "
                f"(now {tuple(split_ratios)})"
            )
        # Each sample's packed positions relative to its start.
        self._offsets = np.arange(seq_length + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, k: int) -> np.ndarray:
        """int64 [seq_length + 1]: packed tokens [k*s, k*s + s + 1)."""
        k = int(k)
        if not 0 <= k < self._num_samples:
            raise IndexError(f"sample {k} out of range ({self._num_samples} samples in {self.split})")
        return self.get_batch(np.array([k]))[0]

    def get_batch(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 [len(indices), seq_length + 1]: several samples in one vectorised read."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._num_samples):
            raise IndexError(f"sample indices must lie in [0, {self._num_samples}) for the {self.split} split")
        positions = indices[:, None] * self.seq_length + self._offsets  # [b, s+1] packed positions
        # Which document each position falls in, then its token's place in .bin.
        doc = np.searchsorted(self._packed_starts, positions, side="right") - 1
        flat = self._bin_starts[doc] + (positions - self._packed_starts[doc])
        return self.indexed.tokens[flat].astype(np.int64)
