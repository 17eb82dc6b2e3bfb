"""The masked-LM collator: BERT 80/10/10 statistics, spans, determinism, resume and DP invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.loader import SampleLoader
from pretrain.data.masking import IGNORE_INDEX, MaskedLMCollator

VOCAB, EOD, PAD, MASK = 1000, 2, 3, 4


def make(**kwargs) -> MaskedLMCollator:
    return MaskedLMCollator(vocab_size=VOCAB, mask_id=MASK, seed=7, special_ids=(EOD, PAD), **kwargs)


def samples(rng: np.random.Generator, b: int, s: int) -> np.ndarray:
    """Ordinary tokens with an EOD every ~50 tokens, shape [b, s+1]."""
    x = rng.integers(10, VOCAB, size=(b, s + 1))
    x[rng.random((b, s + 1)) < 0.02] = EOD
    return x


def test_bert_80_10_10_statistics():
    rng = np.random.default_rng(0)
    x = samples(rng, 64, 512)
    out = make()(x, np.arange(64))
    inputs, labels = out["tokens"].numpy(), out["labels"].numpy()
    original = x[:, :-1]
    assert inputs.shape == labels.shape == (64, 512) and out["tokens"].dtype == torch.int64
    chosen = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[chosen], original[chosen])  # labels are the originals
    np.testing.assert_array_equal(inputs[~chosen], original[~chosen])  # the rest is untouched
    ordinary = original != EOD
    assert not chosen[~ordinary].any()  # special tokens are never masked
    per_row = chosen.sum(1)
    np.testing.assert_array_equal(per_row, np.maximum(1, np.round(0.15 * ordinary.sum(1))).astype(int))
    masked = inputs[chosen] == MASK
    kept = inputs[chosen] == original[chosen]
    randomised = ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.03
    assert abs(kept.sum() / n - 0.1) < 0.02  # (a random draw equal to the original counts here)
    assert abs(randomised.sum() / n - 0.1) < 0.02
    replacements = inputs[chosen][randomised]
    assert not np.isin(replacements, [EOD, PAD, MASK]).any() and replacements.max() < VOCAB


def test_spans_are_contiguous_within_documents():
    rng = np.random.default_rng(1)
    x = samples(rng, 32, 512)
    out = make(mean_span=3.0, max_span=10)(x, np.arange(32))
    chosen = out["labels"].numpy() != IGNORE_INDEX
    original = x[:, :-1]
    assert not chosen[original == EOD].any()
    runs = []
    for row in chosen:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        runs.extend(edges[1::2] - edges[::2])
    runs = np.array(runs)
    assert runs.mean() > 2.0  # spans, not single tokens (adjacent spans may merge into longer runs)
    tokens_out = make()(x, np.arange(32))["labels"].numpy() != IGNORE_INDEX
    edges = [np.flatnonzero(np.diff(np.concatenate([[0], r.astype(int), [0]]))) for r in tokens_out]
    token_runs = np.concatenate([e[1::2] - e[::2] for e in edges])
    assert token_runs.mean() < runs.mean()
    # Each span is masked, randomised or kept as a whole: a run of [MASK] never mixes with others
    # inside one span, so masked positions come in runs too.
    masked = out["tokens"].numpy() == MASK
    assert (masked & chosen).sum() / chosen.sum() > 0.6


def test_same_sample_position_same_mask_whatever_the_batch():
    rng = np.random.default_rng(2)
    x = samples(rng, 6, 64)
    collate = make(mean_span=2.0)
    whole = collate(x, np.arange(100, 106))
    parts = [collate(x[i : i + 2], np.arange(100 + i, 102 + i)) for i in (0, 2, 4)]
    for key in ("tokens", "labels"):
        assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))
    other = collate(x, np.arange(200, 206))  # another position: another mask
    assert not torch.equal(whole["labels"], other["labels"])
    reseeded = MaskedLMCollator(vocab_size=VOCAB, mask_id=MASK, seed=8, special_ids=(EOD, PAD))(x, np.arange(100, 106))
    assert not torch.equal(whole["labels"], reseeded["labels"])


class Data:
    def __init__(self, n: int, s: int) -> None:
        self.x = samples(np.random.default_rng(3), n, s)

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, indices):
        return self.x[np.asarray(indices)]

    def __getitem__(self, k):
        return self.x[k]


def test_resume_and_dp_layout_give_the_same_masked_batches():
    data, collate = Data(40, 32), make()
    single = [
        next(loader) for loader in [SampleLoader(data, micro_batch_size=4, seed=0, collate=collate)] for _ in range(6)
    ]
    ranks = [SampleLoader(data, micro_batch_size=2, seed=0, dp_rank=r, dp_size=2, collate=collate) for r in range(2)]
    for step in range(6):
        got = [next(loader) for loader in ranks]
        for key in ("tokens", "labels"):
            assert torch.equal(torch.cat([g[key] for g in got]), single[step][key])
    resumed = SampleLoader(data, micro_batch_size=4, seed=0, collate=collate, consumed_samples=12)
    assert torch.equal(next(resumed)["labels"], single[3]["labels"])


def test_collator_arguments_are_checked():
    with pytest.raises(ValueError, match="needs a mask token"):
        MaskedLMCollator(vocab_size=VOCAB, mask_id=None, seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        MaskedLMCollator(vocab_size=VOCAB, mask_id=VOCAB, seed=0)
    with pytest.raises(ValueError, match="mask_prob"):
        MaskedLMCollator(vocab_size=VOCAB, mask_id=MASK, seed=0, mask_prob=0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        MaskedLMCollator(vocab_size=VOCAB, mask_id=MASK, seed=0, replace_prob=0.8, random_prob=0.3)
    with pytest.raises(ValueError, match="mean_span"):
        MaskedLMCollator(vocab_size=VOCAB, mask_id=MASK, seed=0, mean_span=0.5)
    # A row of only special tokens has nothing to mask: it comes back unchanged, all ignored.
    out = make()(np.full((1, 9), EOD), np.array([0]))
    assert (out["labels"] == IGNORE_INDEX).all() and (out["tokens"] == EOD).all()
