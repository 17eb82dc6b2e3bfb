"""Sample packing (GPTDataset) and the deterministic, resumable, data-parallel SampleLoader."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pretrain.data.gpt_dataset import GPTDataset, split_bounds
from pretrain.data.indexed import IndexedDatasetWriter
from pretrain.data.loader import SampleLoader


@pytest.fixture
def numbered(tmp_path) -> tuple[str, list[np.ndarray]]:
    """Documents whose tokens are their global positions, so order and coverage are checkable."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=60)
    lengths[[5, 6]] = 0  # empty documents must be harmless
    docs, start = [], 0
    prefix = str(tmp_path / "num")
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for n in lengths:
            doc = np.arange(start, start + n, dtype=np.int32)
            writer.add_document(doc)
            docs.append(doc)
            start += n
    return prefix, docs


def packed_stream(ds: GPTDataset) -> np.ndarray:
    """The packed tokens samples cover, rebuilt from the samples (checking their overlap)."""
    samples = [ds[k] for k in range(len(ds))]
    for a, b in itertools.pairwise(samples):
        assert a[-1] == b[0]  # stride seq_length: one shared token
    return np.concatenate([s[:-1] for s in samples] + [samples[-1][-1:]])


@pytest.mark.parametrize("seq_length", [1, 7, 16])
def test_packing_covers_every_token_once_in_order(numbered, seq_length):
    prefix, docs = numbered
    ds = GPTDataset(prefix, seq_length=seq_length, split="train", split_ratios=(1, 0, 0), seed=None)
    total = sum(len(d) for d in docs)
    assert ds.num_tokens == total
    assert len(ds) == (total - 1) // seq_length
    sample = ds[0]
    assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
    stream = packed_stream(ds)
    # Every token, in file order; only the tail that cannot fill one more sample is left out.
    np.testing.assert_array_equal(stream, np.arange(len(stream)))
    assert total - len(stream) < seq_length


def test_seeded_packing_shuffles_whole_documents(numbered):
    prefix, docs = numbered
    ds = GPTDataset(prefix, seq_length=5, split="train", split_ratios=(1, 0, 0), seed=3)
    stream = packed_stream(ds)
    assert not np.array_equal(stream, np.sort(stream))  # really reordered
    assert len(np.unique(stream)) == len(stream)  # no token twice
    # Cut the stream where consecutive ids break: each piece is whole documents (several when
    # neighbours in the file stay neighbours after shuffling).
    pieces = np.split(stream, np.flatnonzero(np.diff(stream) != 1) + 1)
    starts = {int(d[0]) for d in docs if len(d)}
    ends = {int(d[-1]) for d in docs if len(d)}
    assert len(pieces) > 10
    for piece in pieces:
        assert int(piece[0]) in starts
    for piece in pieces[:-1]:  # the last piece may be cut short by the tail
        assert int(piece[-1]) in ends
    again = GPTDataset(prefix, seq_length=5, split="train", split_ratios=(1, 0, 0), seed=3)
    np.testing.assert_array_equal(packed_stream(again), stream)


def test_splits_are_contiguous_disjoint_and_match_megatron(numbered):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    prefix, docs = numbered
    for ratios in [(98, 2, 0), (80, 15, 5), (1, 1, 1), (0.7, 0.2, 0.1)]:
        ours = split_bounds(len(docs), ratios)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(",".join(map(str, ratios))))
        for (begin, end), bookends in zip(ours, matrix, strict=True):
            if bookends is None:
                assert begin == end
            else:
                assert (begin, end) == (int(round(bookends[0] * len(docs))), int(round(bookends[1] * len(docs))))
        assert ours[0][0] == 0 and ours[0][1] == ours[1][0] and ours[1][1] == ours[2][0] and ours[2][1] == len(docs)

    ranges = {}
    for split in ("train", "valid", "test"):
        ds = GPTDataset(prefix, seq_length=4, split=split, split_ratios=(80, 15, 5), seed=None)
        ranges[split] = ds.document_range
        first_doc = next(d for d in docs[ds.document_range[0] :] if len(d))
        assert ds[0][0] == first_doc[0]
    assert ranges["train"][1] == ranges["valid"][0] and ranges["valid"][1] == ranges["test"][0]


def test_too_small_split_is_explained(numbered):
    prefix, _ = numbered
    with pytest.raises(ValueError, match=r"'valid' split .* too small .* seq_length \+ 1 = 1001"):
        GPTDataset(prefix, seq_length=1000, split="valid", split_ratios=(98, 2, 0))
    with pytest.raises(ValueError, match=r"'test' split .* \(0 documents, 0 tokens\)"):
        GPTDataset(prefix, seq_length=4, split="test", split_ratios=(98, 2, 0))
    with pytest.raises(ValueError, match="split must be one of"):
        GPTDataset(prefix, seq_length=4, split="validation")


def test_get_batch_matches_getitem(numbered):
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=9, split="train", seed=11)
    idx = np.array([3, 0, len(ds) - 1, 3])
    np.testing.assert_array_equal(ds.get_batch(idx), np.stack([ds[int(i)] for i in idx]))
    with pytest.raises(IndexError):
        ds[len(ds)]


# -- loader ------------------------------------------------------------------------------------


class Identity:
    """A dataset whose sample k is [k, k+1, k+2]: the loader's choices are readable."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        return np.array([k, k + 1, k + 2])


def ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["tokens"][:, 0].tolist()


def take(loader: SampleLoader, steps: int) -> list[list[int]]:
    return [ids(next(loader)) for _ in range(steps)]


def flat(batches) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


def test_batches_are_shifted_long_tensors(numbered):
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=8, split="train")
    batch = next(SampleLoader(ds, micro_batch_size=3, seed=0))
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["tokens"].shape == batch["labels"].shape == (3, 8)
    torch.testing.assert_close(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def test_epochs_are_seeded_permutations():
    n = 10
    loader = SampleLoader(Identity(n), micro_batch_size=3, seed=5)
    stream = flat(take(loader, 10))  # 30 positions: three epochs
    for e in range(3):
        expected = np.random.default_rng((5, e)).permutation(n).tolist()
        assert stream[e * n : (e + 1) * n] == expected
    assert loader.consumed_samples == 30
    assert take(SampleLoader(Identity(n), micro_batch_size=3, seed=5), 10) == [
        stream[i : i + 3] for i in range(0, 30, 3)
    ]
    assert take(SampleLoader(Identity(n), micro_batch_size=3, seed=6), 10) != take(
        SampleLoader(Identity(n), micro_batch_size=3, seed=5), 10
    )


def test_resume_from_state_dict_continues_exactly(numbered):
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=4, split="train")
    first = SampleLoader(ds, micro_batch_size=4, seed=9)
    for _ in range(7):
        next(first)
    state = first.state_dict()
    assert state == {"consumed_samples": 28, "seed": 9}
    expected = [next(first) for _ in range(20)]  # crosses an epoch boundary

    resumed = SampleLoader(ds, micro_batch_size=4, seed=123)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["labels"], want["labels"])
    # The constructor argument resumes the same way.
    direct = SampleLoader(ds, micro_batch_size=4, seed=9, consumed_samples=28)
    assert torch.equal(next(direct)["tokens"], expected[0]["tokens"])


def test_data_parallel_ranks_split_the_single_rank_stream():
    n, mbs, steps = 37, 3, 15
    single = flat(take(SampleLoader(Identity(n), micro_batch_size=mbs, seed=1), 2 * steps))
    ranks = [SampleLoader(Identity(n), micro_batch_size=mbs, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    per_rank = [take(loader, steps) for loader in ranks]
    assert ranks[0].consumed_samples == ranks[1].consumed_samples == 2 * mbs * steps
    # Step t: rank 0 takes the first micro-batch of the global batch, rank 1 the second.
    interleaved = flat(per_rank[0][t] + per_rank[1][t] for t in range(steps))
    assert interleaved == single
    # Within the first epoch the ranks never see the same sample.
    first_epoch = [set(flat(rank)[: n // 2]) for rank in per_rank]
    assert not first_epoch[0] & first_epoch[1]


def test_resume_with_a_different_dp_size_keeps_the_global_stream():
    n, mbs = 20, 2
    single = flat(take(SampleLoader(Identity(n), micro_batch_size=mbs, seed=4), 10))
    ranks = [
        SampleLoader(Identity(n), micro_batch_size=mbs, seed=4, dp_rank=r, dp_size=2, consumed_samples=8)
        for r in range(2)
    ]
    step = [ids(next(loader)) for loader in ranks]
    assert step[0] + step[1] == single[8:12]


def test_loader_validates_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        SampleLoader(Identity(4), micro_batch_size=1, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        SampleLoader(Identity(4), micro_batch_size=0, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        SampleLoader(Identity(0), micro_batch_size=1, seed=0)
