"""Masked-language-model batches from the same GPT samples: BERT's 80/10/10, token or span.

    collate = MaskedLMCollator(vocab_size=tok.vocab_size, mask_id=tok.mask, seed=1234,
                               special_ids=(tok.eod, tok.pad))
    loader = SampleLoader(dataset, micro_batch_size=8, seed=1234, collate=collate)
    batch = next(loader)   # tokens: masked inputs [b, s]; labels: originals at masked places, -100 elsewhere

Each sample's first `seq_length` tokens are used (the extra token a GPT sample carries for the
shift is dropped). Of the positions that hold ordinary tokens (not in `special_ids`),
round(mask_prob * count) (at least one) are chosen; each chosen position becomes the mask token
with probability 0.8, a random ordinary token with 0.1, and stays as it is with 0.1 (BERT). With
`mean_span` set, whole spans are chosen instead (SpanBERT): span lengths are geometric with that
mean, capped at `max_span`, never cross a special token (so never a document boundary), and each
span is masked, randomised or kept as a whole.

Randomness is drawn per sample from (seed, global stream position), so a batch is the same
whatever the data-parallel layout or the batch it lands in, and a resumed run masks exactly as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


# eq=False, repr=False: collators keep hashing, comparing and printing by identity, as before the
# dataclass (a generated __eq__ would make them unhashable).
@dataclass(kw_only=True, eq=False, repr=False)
class MaskedLMCollator:
    """The masking settings (see the module doc); called as a SampleLoader's `collate`."""

    vocab_size: int
    mask_id: int | None
    seed: int
    special_ids: Iterable[int] = ()
    mask_prob: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1
    mean_span: float | None = None
    max_span: int = 10

    def __post_init__(self) -> None:
        specials = sorted({int(i) for i in self.special_ids})
        self._check(specials)
        self.special_ids = tuple(specials)
        self.mask_id = int(self.mask_id)
        # Random replacements are ordinary tokens: never a special one, never the mask itself.
        self._excluded = np.array(sorted(set(specials) | {self.mask_id}), dtype=np.int64)
        self._specials = np.array(specials, dtype=np.int64)
        if self.vocab_size - len(self._excluded) < 1:
            raise ValueError("the vocabulary has no ordinary tokens left to draw random replacements from")

    def _check(self, specials: list[int]) -> None:
        vocab_size, mask_id = self.vocab_size, self.mask_id
        if mask_id is None:
            raise ValueError(
                "masked-LM training needs a mask token, and this tokenizer has none; retrain it with "
                "tools/train_tokenizer.py (which reserves <mask>) or use a tokenizer that defines one"
            )
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size})")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob must lie in (0, 1), got {self.mask_prob}")
        replace_prob, random_prob = self.replace_prob, self.random_prob
        if replace_prob < 0 or random_prob < 0 or replace_prob + random_prob > 1:
            raise ValueError(
                f"replace_prob ({replace_prob}) and random_prob ({random_prob}) must be non-negative "
                "and sum to at most 1 (the rest keeps the original token)"
            )
        if self.mean_span is not None and self.mean_span < 1:
            raise ValueError(f"mean_span must be at least 1, got {self.mean_span}")
        if self.max_span < 1:
            raise ValueError(f"max_span must be at least 1, got {self.max_span}")
        if any(not 0 <= i < vocab_size for i in specials):
            raise ValueError(f"special_ids {specials} must lie in the vocabulary [0, {vocab_size})")

    def __call__(self, samples: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """samples int64 [b, s+1], positions int64 [b] -> tokens, labels LongTensor [b, s]."""
        samples = np.asarray(samples, dtype=np.int64)
        inputs = samples[:, :-1].copy()  # [b, s]
        labels = np.full_like(inputs, IGNORE_INDEX)
        for row, position in enumerate(np.asarray(positions, dtype=np.int64)):
            self.mask_row(inputs[row], labels[row], int(position))
        return {"tokens": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

    def mask_row(self, tokens: np.ndarray, labels: np.ndarray, position: int) -> None:
        """Mask one sequence in place; `labels` receives the originals of the chosen positions."""
        rng = np.random.default_rng((self.seed, position))
        ordinary = ~np.isin(tokens, self._specials)
        candidates = np.flatnonzero(ordinary)
        if len(candidates) == 0:
            return
        budget = max(1, int(round(self.mask_prob * len(candidates))))
        if self.mean_span is None:
            chosen = np.sort(rng.choice(candidates, size=budget, replace=False))
            groups = [chosen[i : i + 1] for i in range(len(chosen))]
        else:
            groups = self._spans(rng, ordinary, candidates, budget)
        decisions = rng.random(len(groups))
        chosen = np.concatenate(groups)
        labels[chosen] = tokens[chosen]
        for group, u in zip(groups, decisions, strict=True):
            if u < self.replace_prob:
                tokens[group] = self.mask_id
            elif u < self.replace_prob + self.random_prob:
                tokens[group] = self._random_tokens(rng, len(group))
            # else: keep the original tokens (still predicted)

    def _spans(
        self, rng: np.random.Generator, ordinary: np.ndarray, candidates: np.ndarray, budget: int
    ) -> list[np.ndarray]:
        lengths = np.minimum(rng.geometric(1.0 / self.mean_span, size=len(candidates)), self.max_span)
        taken = np.zeros(len(ordinary), dtype=bool)
        spans, count = [], 0
        for start, length in zip(rng.permutation(candidates), lengths, strict=True):
            if count >= budget:
                break
            if taken[start]:
                continue
            length = min(int(length), budget - count)
            free = ordinary[start : start + length] & ~taken[start : start + length]
            # End at a special or taken token, or at the end of the sequence.
            stop = len(free) if free.all() else int(np.argmin(free))
            taken[start : start + stop] = True
            spans.append(np.arange(start, start + stop))
            count += stop
        return sorted(spans, key=lambda s: int(s[0]))

    def _random_tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        draw = rng.integers(0, self.vocab_size - len(self._excluded), size=n)
        for excluded in self._excluded:  # ascending: shift past each excluded id in turn
            draw += draw >= excluded
        return draw
