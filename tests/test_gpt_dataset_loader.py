"""GPTDataset packing, its index cache, and the deterministic, resumable, data-parallel SampleLoader.

Equality with megatron-core's own GPTDataset is in test_gpt_megatron.py.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from pretrain.data.cache import CacheError, read_entry
from pretrain.data.gpt_dataset import GPTDataset, split_bounds
from pretrain.data.indexed import IndexedDatasetWriter
from pretrain.data.loader import SampleLoader


def write_numbered(prefix: str, lengths) -> list[np.ndarray]:
    """Documents whose tokens are their global positions, so order and coverage are checkable."""
    docs, start = [], 0
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for n in lengths:
            doc = np.arange(start, start + n, dtype=np.int32)
            writer.add_document(doc)
            docs.append(doc)
            start += n
    return docs


@pytest.fixture
def numbered(tmp_path) -> tuple[str, list[np.ndarray]]:
    lengths = np.random.default_rng(0).integers(0, 40, size=60)
    lengths[[0, 5, 6]] = 0  # empty documents must be harmless, also the very first
    prefix = str(tmp_path / "num")
    return prefix, write_numbered(prefix, lengths)


def unshuffled(ds: GPTDataset) -> np.ndarray:
    """The samples in packing order (undoing the shuffle index)."""
    return ds.get_batch(np.argsort(ds.shuffle_index))


@pytest.mark.parametrize("seq_length", [1, 7, 16])
def test_one_epoch_packs_the_documents_in_index_order(numbered, seq_length):
    prefix, docs = numbered
    ds = GPTDataset(prefix, seq_length=seq_length, split="train", split_ratios=(1, 0, 0), seed=3)
    total = sum(len(d) for d in docs)
    assert ds.num_tokens == total and len(ds) == (total - 1) // seq_length
    assert sorted(ds.document_index.tolist()) == list(range(len(docs)))  # one epoch: each once
    sample = ds[0]
    assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
    samples = unshuffled(ds)
    for a, b in itertools.pairwise(samples):
        assert a[-1] == b[0]  # stride seq_length: one shared token
    stream = np.concatenate([s[:-1] for s in samples] + [samples[-1][-1:]])
    # Exactly the documents laid end to end in document-index order; only the tail that
    # cannot fill one more sample is left out.
    expected = np.concatenate([docs[d] for d in ds.document_index])
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert total - len(stream) < seq_length
    assert not np.array_equal(ds.shuffle_index, np.arange(len(ds)))  # samples really shuffled


def test_seed_decides_the_order_and_repeats(numbered):
    prefix, _ = numbered
    a = GPTDataset(prefix, seq_length=5, split_ratios=(1, 0, 0), seed=3)
    b = GPTDataset(prefix, seq_length=5, split_ratios=(1, 0, 0), seed=3, cache_dir=os.path.dirname(prefix) + "/other")
    c = GPTDataset(prefix, seq_length=5, split_ratios=(1, 0, 0), seed=4)
    assert b.built_index  # a fresh cache directory: built again, identically
    np.testing.assert_array_equal(a.get_batch(np.arange(len(a))), b.get_batch(np.arange(len(b))))
    assert not np.array_equal(a.document_index, c.document_index)


def test_num_samples_sets_the_epochs(numbered):
    prefix, docs = numbered
    one = GPTDataset(prefix, seq_length=8, split_ratios=(1, 0, 0), seed=1)
    many = GPTDataset(prefix, seq_length=8, split_ratios=(1, 0, 0), seed=1, num_samples=3 * len(one) + 5)
    assert len(many) >= 3 * len(one) + 5
    counts = np.bincount(many.document_index, minlength=len(docs))
    assert set(counts.tolist()) == {4}  # four epochs, each document once per epoch
    # Every sample still is seq_length + 1 consecutive packed tokens.
    samples = many.get_batch(np.arange(len(many)))
    assert samples.shape == (len(many), 9)


def test_splits_are_contiguous_disjoint_and_match_megatron(numbered):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    prefix, docs = numbered
    for ratios in [(98, 2, 0), (80, 15, 5), (1, 1, 1), (0.7, 0.2, 0.1), (0, 1, 0)]:
        ours = split_bounds(len(docs), ratios)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(",".join(map(str, ratios))))
        for bounds, bookends in zip(ours, matrix, strict=True):
            if bookends is None:
                assert bounds is None
            else:
                assert bounds == (int(round(bookends[0] * len(docs))), int(round(bookends[1] * len(docs))))

    ranges = {}
    for split in ("train", "valid", "test"):
        ds = GPTDataset(prefix, seq_length=4, split=split, split_ratios=(80, 15, 5), seed=1)
        ranges[split] = ds.document_range
        begin, end = ds.document_range
        assert set(ds.document_index.tolist()) <= set(range(begin, end))
        split_tokens = set(np.concatenate(docs[begin:end]).tolist())
        assert set(np.unique(ds.get_batch(np.arange(len(ds)))).tolist()) <= split_tokens
    assert ranges["train"][1] == ranges["valid"][0] and ranges["valid"][1] == ranges["test"][0]


def test_too_small_split_and_bad_arguments_are_explained(numbered):
    prefix, _ = numbered
    with pytest.raises(ValueError, match=r"'valid' split .* too small .* seq_length \+ 1 = 1001"):
        GPTDataset(prefix, seq_length=1000, split="valid", split_ratios=(98, 2, 0))
    with pytest.raises(ValueError, match=r"'test' split .* \(0 documents, 0 tokens\)"):
        GPTDataset(prefix, seq_length=4, split="test", split_ratios=(98, 2, 0))
    with pytest.raises(ValueError, match="split must be one of"):
        GPTDataset(prefix, seq_length=4, split="validation")
    with pytest.raises(ValueError, match="seed must be an integer"):
        GPTDataset(prefix, seq_length=4, seed=None)
    with pytest.raises(ValueError, match="split ratios"):
        GPTDataset(prefix, seq_length=4, split_ratios=(0, 0, 0))
    # A small split still serves a long run: it repeats epochs, as megatron does.
    ds = GPTDataset(prefix, seq_length=40, split="valid", split_ratios=(90, 10, 0), num_samples=50)
    assert len(ds) >= 50


def test_get_batch_matches_getitem(numbered):
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=9, split="train", seed=11)
    idx = np.array([3, 0, len(ds) - 1, 3])
    np.testing.assert_array_equal(ds.get_batch(idx), np.stack([ds[int(i)] for i in idx]))
    assert ds.get_batch([]).shape == (0, 10)
    for bad in (len(ds), -1):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.get_batch([0, bad])


# -- the index cache ---------------------------------------------------------------------------


def test_indices_are_cached_and_memory_mapped(numbered):
    prefix, _ = numbered
    first = GPTDataset(prefix, seq_length=6, seed=2, num_samples=100)
    assert first.built_index
    cache = os.path.join(os.path.dirname(prefix), "index-cache")
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("num-train-") and files[0].endswith(".indices")
    again = GPTDataset(prefix, seq_length=6, seed=2, num_samples=100)
    assert not again.built_index
    assert isinstance(again.shuffle_index.base, memoryview) or again.shuffle_index.base is not None
    assert not again.shuffle_index.flags.writeable
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
        assert getattr(first, name).dtype == getattr(again, name).dtype
    # Everything that changes the indices changes the entry.
    for kwargs in ({"seed": 3}, {"num_samples": 200}, {"seq_length": 5}, {"split_ratios": (90, 10, 0)}):
        args = {"seq_length": 6, "seed": 2, "num_samples": 100} | kwargs
        assert GPTDataset(prefix, **args).built_index, kwargs
    assert len(os.listdir(cache)) == 5


def test_rewritten_data_misses_the_cache(tmp_path):
    prefix = str(tmp_path / "d")
    write_numbered(prefix, [30] * 10)
    a = GPTDataset(prefix, seq_length=4, split_ratios=(1, 0, 0))
    write_numbered(prefix, [30] * 12)  # same name, re-tokenized corpus
    b = GPTDataset(prefix, seq_length=4, split_ratios=(1, 0, 0))
    assert b.built_index and len(b) > len(a)
    write_numbered(prefix, [20, 40] * 6)  # even with the same document and token counts
    c = GPTDataset(prefix, seq_length=4, split_ratios=(1, 0, 0))
    assert c.built_index and len(c) == len(b)
    assert not np.array_equal(c.get_batch(np.arange(len(c))), b.get_batch(np.arange(len(b))))


def test_damaged_cache_is_rebuilt_or_reported(numbered):
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=6, split_ratios=(1, 0, 0))
    cache = os.path.join(os.path.dirname(prefix), "index-cache")
    (name,) = os.listdir(cache)
    path = os.path.join(cache, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CacheError, match="truncated"):
        read_entry(path, ds.description)
    with pytest.raises(TimeoutError, match="did not appear .*truncated"):
        GPTDataset(prefix, seq_length=6, split_ratios=(1, 0, 0), create=False, wait_seconds=0.1)
    rebuilt = GPTDataset(prefix, seq_length=6, split_ratios=(1, 0, 0))
    assert rebuilt.built_index
    np.testing.assert_array_equal(rebuilt.shuffle_index, ds.shuffle_index)
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(CacheError, match="not an index cache"):
        read_entry(path, ds.description)


def test_unwritable_cache_directory_is_explained(numbered, tmp_path):
    prefix, _ = numbered
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot write the dataset index cache .* writable location"):
        GPTDataset(prefix, seq_length=6, split_ratios=(1, 0, 0), cache_dir=str(blocker / "cache"))


def _build_in_process(prefix: str, create: bool, out) -> None:
    ds = GPTDataset(prefix, seq_length=3, split_ratios=(1, 0, 0), num_samples=500, create=create, wait_seconds=60)
    out.put((ds.built_index, ds.get_batch(np.arange(len(ds))).tobytes()))


def test_many_processes_share_one_build(numbered):
    """Waiters (create=False) start first and poll; builders race: all end with one identical cache."""
    prefix, _ = numbered
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(prefix, create, out)) for create in (False, False, True, True)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({data for _, data in results}) == 1
    assert sum(built for built, _ in results) >= 1
    cache = os.path.join(os.path.dirname(prefix), "index-cache")
    assert len(os.listdir(cache)) == 1  # no temporary files left behind


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
    np.testing.assert_array_equal(batch["tokens"][0].numpy(), ds[0][:-1])  # stream starts at sample 0


def test_stream_is_the_dataset_order_then_seeded_passes():
    n = 10
    loader = SampleLoader(Identity(n), micro_batch_size=3, seed=5)
    stream = flat(take(loader, 10))  # 30 positions: three passes
    assert stream[:n] == list(range(n))  # the dataset is already shuffled: read it in order
    for p in (1, 2):  # past the end, each further pass is a seeded permutation
        assert stream[p * n : (p + 1) * n] == np.random.default_rng((5, p)).permutation(n).tolist()
    assert loader.consumed_samples == 30
    again = SampleLoader(Identity(n), micro_batch_size=3, seed=5)
    assert take(again, 10) == [stream[i : i + 3] for i in range(0, 30, 3)]
    assert flat(take(SampleLoader(Identity(n), micro_batch_size=3, seed=6), 10))[n:] != stream[n:]


def test_resume_from_state_dict_continues_exactly(numbered):
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=4, split="train")
    first = SampleLoader(ds, micro_batch_size=4, seed=9)
    for _ in range(7):
        next(first)
    state = first.state_dict()
    assert state == {"consumed_samples": 28, "seed": 9}
    expected = [next(first) for _ in range(len(ds) // 4 + 5)]  # runs past the end of the dataset

    resumed = SampleLoader(ds, micro_batch_size=4, seed=123)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["labels"], want["labels"])
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
    first_pass = [set(flat(rank)[: n // 2]) for rank in per_rank]
    assert not first_pass[0] & first_pass[1]


class Recording(Identity):
    """Identity that records which samples were read."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.read: list[int] = []

    def get_batch(self, indices):
        self.read.extend(int(i) for i in indices)
        return np.stack([self[int(i)] for i in indices])


def test_each_rank_reads_only_its_own_samples():
    datasets = [Recording(50) for _ in range(4)]
    loaders = [SampleLoader(datasets[r], micro_batch_size=2, seed=0, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(3):
        for loader in loaders:
            next(loader)
    reads = [d.read for d in datasets]
    assert all(len(r) == 6 for r in reads)
    assert sorted(flat(reads)) == list(range(24))  # disjoint, together the global stream


@pytest.mark.parametrize("old_dp, new_dp, mbs", [(2, 3, 2), (4, 1, 1), (1, 2, 3)])
def test_resume_with_a_different_dp_size_keeps_the_global_stream(numbered, old_dp, new_dp, mbs):
    """Global batch 12 = mbs x dp x accumulation; stop after 5 steps, resume with another dp size."""
    prefix, _ = numbered
    ds = GPTDataset(prefix, seq_length=4, split_ratios=(1, 0, 0), num_samples=12 * 12)
    global_batch = 12

    def steps(dp: int, consumed: int, count: int) -> list[set[bytes]]:
        loaders = [
            SampleLoader(ds, micro_batch_size=mbs, seed=7, dp_rank=r, dp_size=dp, consumed_samples=consumed)
            for r in range(dp)
        ]
        out = []
        for _ in range(count):
            seen = set()
            for _ in range(global_batch // (mbs * dp)):  # gradient accumulation
                for loader in loaders:
                    seen.update(row.numpy().tobytes() for row in next(loader)["tokens"])
            out.append(seen)
        assert {loader.consumed_samples for loader in loaders} == {consumed + count * global_batch}
        return out

    uninterrupted = steps(old_dp, 0, 10)
    resumed = steps(old_dp, 0, 5) + steps(new_dp, 5 * global_batch, 5)
    assert resumed == uninterrupted  # the same samples in every step: none skipped, none twice


def test_loader_validates_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        SampleLoader(Identity(4), micro_batch_size=1, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        SampleLoader(Identity(4), micro_batch_size=0, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        SampleLoader(Identity(0), micro_batch_size=1, seed=0)
