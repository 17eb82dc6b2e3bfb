"""Deterministic, resumable, data-parallel stream of micro-batches.

The dataset is already in training order (a GPT or blended dataset is shuffled by its own
indices, as in megatron-core), so the loader reads the global sample stream sequentially, as
megatron's pretraining sampler does: stream position k is dataset sample k. Each step consumes
the next `micro_batch_size * dp_size` positions and DP rank r takes the r-th block of
`micro_batch_size` of them, reading only those samples. The position (`consumed_samples`) is
global, so a run resumed with another number of DP ranks still continues the same stream: no
sample is skipped or seen twice.

A dataset is built for the number of samples the run needs, so the stream normally never runs
past its end. If it does (more steps than planned, or an evaluation loader that keeps going),
pass p >= 1 visits the dataset again in the order of a permutation seeded by (seed, p), rather
than repeating the first pass exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch


class TokenRangeError(ValueError):
    """A token id outside the model's vocabulary: the data and the model disagree."""


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


Collate = Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]]


def causal_lm_collate(samples: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
    """[b, s+1] samples -> tokens = samples[:, :-1], labels = samples[:, 1:] (LongTensor [b, s])."""
    del positions  # the shift needs no randomness
    batch = torch.from_numpy(samples)
    return {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


def with_document_segments(collate: Collate, eod: int) -> Collate:
    """`collate` plus "segments" [b, s]: how many end-of-document tokens precede each position,
    so the tokens of one document (its closing EOD included) share a number and attention can
    be kept within documents (data.document_attention_mask)."""

    def collate_with_segments(samples: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
        batch = collate(samples, positions)
        ends = (batch["tokens"] == eod).long()
        batch["segments"] = ends.cumsum(dim=1) - ends
        return batch

    return collate_with_segments


class SampleLoader:
    """Endless iterator of this DP rank's micro-batches: dict(tokens, labels), LongTensor [b, s].

    `collate(samples [b, s+1] int64, positions [b] int64) -> dict` turns the samples into a
    batch; `positions` are the global stream positions, a seed for per-sample randomness (such
    as masked-LM masks) that does not depend on the data-parallel layout. Default: the causal
    shift (`causal_lm_collate`).

    `vocab_size`: when given, each batch's token ids are checked against it (one min and max
    per batch), so data tokenized for a larger vocabulary fails here naming the file and
    document instead of as an IndexError in the embedding (a device-side assert on GPU).
    """

    def __init__(
        self,
        dataset: SampleDataset,
        *,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        collate: Collate | None = None,
        vocab_size: int | None = None,
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
        self.collate = collate if collate is not None else causal_lm_collate
        self.vocab_size = vocab_size
        self._num_samples = len(dataset)
        self._permutations: dict[int, np.ndarray] = {}  # pass -> permutation (a couple kept)

    def _permutation(self, pass_: int) -> np.ndarray:
        perm = self._permutations.get(pass_)
        if perm is None:
            perm = np.random.default_rng((self.seed, pass_)).permutation(self._num_samples)
            # A batch spans at most a few passes; keep only the newest to bound memory.
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            self._permutations[pass_] = perm
        return perm

    def sample_indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices of global stream positions (int64 array in, int64 array out)."""
        positions = np.asarray(positions, dtype=np.int64)
        passes, within = np.divmod(positions, self._num_samples)
        if not passes.any():
            return within  # the normal case: the first pass is the dataset's own order
        out = within.copy()
        for p in np.unique(passes[passes > 0]):
            mask = passes == p
            out[mask] = self._permutation(int(p))[within[mask]]
        return out

    def _read(self, indices: np.ndarray) -> np.ndarray:
        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None:
            return np.asarray(get_batch(indices), dtype=np.int64)
        return np.stack([np.asarray(self.dataset[int(i)], dtype=np.int64) for i in indices])

    def __iter__(self) -> SampleLoader:
        return self

    def peek(self) -> tuple[np.ndarray, np.ndarray]:
        """(global stream positions, dataset indices) of the micro-batch `next()` returns, both
        int64 [b], without moving (tools/inspect_data.py shows them)."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        positions = np.arange(start, start + self.micro_batch_size, dtype=np.int64)
        return positions, self.sample_indices(positions)

    def __next__(self) -> dict[str, torch.Tensor]:
        positions, indices = self.peek()
        samples = self._read(indices)  # [b, s+1]
        if self.vocab_size is not None:
            self._check_token_range(samples, indices)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return self.collate(samples, positions)

    def _check_token_range(self, samples: np.ndarray, indices: np.ndarray) -> None:
        if samples.size == 0 or (samples.min() >= 0 and samples.max() < self.vocab_size):
            return
        row, column = (int(v) for v in np.argwhere((samples < 0) | (samples >= self.vocab_size))[0])
        locate = getattr(self.dataset, "locate", None)
        where = locate(int(indices[row]), column) if locate else f"sample {int(indices[row])} of {self.dataset!r}"
        raise TokenRangeError(
            f"token id {int(samples[row, column])} in {where} is outside the model's vocabulary "
            f"[0, {self.vocab_size}) (largest id in this batch: {int(samples.max())}); the data was "
            "tokenized with another tokenizer: set model.vocab_size (and data.tokenizer) to the one used by "
            "tools/preprocess_data.py, or re-run it with the model's tokenizer"
        )

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
