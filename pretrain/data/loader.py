"""Deterministic, resumable, data-parallel stream of micro-batches.

The global sample stream is an endless sequence of epochs; epoch e visits every sample once,
in the order of a permutation drawn from `np.random.default_rng((seed, e))`. Stream position
k is sample perm_e[k % N] with e = k // N. Each step consumes the next
`micro_batch_size * dp_size` positions, and DP rank r takes the r-th block of
`micro_batch_size` of them. The position (`consumed_samples`) is global, so a run resumed
with a different number of DP ranks still continues the same stream.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class SampleLoader:
    """Endless iterator of this DP rank's micro-batches: dict(tokens, labels), LongTensor [b, s]."""

    def __init__(
        self,
        dataset: SampleDataset,
        *,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must lie in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")
        if len(dataset) == 0:
            raise ValueError("the dataset has no samples")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self._num_samples = len(dataset)
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> permutation (a couple kept)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self._num_samples)
            # A batch spans at most a few epochs; keep only the newest to bound memory.
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            self._permutations[epoch] = perm
        return perm

    def sample_indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices of global stream positions (int64 array in, int64 array out)."""
        epochs, within = np.divmod(positions, self._num_samples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):  # one or two epochs per batch, rarely more
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[within[mask]]
        return out

    def _read(self, indices: np.ndarray) -> np.ndarray:
        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None:
            return np.asarray(get_batch(indices), dtype=np.int64)
        return np.stack([np.asarray(self.dataset[int(i)], dtype=np.int64) for i in indices])

    def __iter__(self) -> SampleLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        positions = np.arange(start, start + self.micro_batch_size, dtype=np.int64)
        samples = torch.from_numpy(self._read(self.sample_indices(positions)))  # [b, s+1]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return {"tokens": samples[:, :-1].contiguous(), "labels": samples[:, 1:].contiguous()}  # [b, s]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved stream exactly: its position and its seed."""
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples in the loader state must be non-negative, got {consumed}")
        if int(state["seed"]) != self.seed:
            self._permutations.clear()
        self.seed = int(state["seed"])
        self.consumed_samples = consumed
