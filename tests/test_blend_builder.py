"""data.path parsing, the blend index, BlendedDataset, and build_datasets (also with many ranks)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.data.blend import BlendedDataset, build_blend_index, parse_data_path
from pretrain.data.builder import build_datasets
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDatasetWriter


def test_parse_data_path():
    assert parse_data_path("data/web_text_document") == [(1.0, "data/web_text_document")]
    assert parse_data_path("  0.3 a\n 0.7  b ") == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path("30 a 70 b 1e1 c") == [(30.0, "a"), (70.0, "b"), (10.0, "c")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0.5", "weight without a dataset prefix"),
        ("a b", "'a' .* should be a weight"),
        ("0.3 a 0.7", "3 words"),
        ("a 0.3 b 0.7", "'a' .* should be a weight"),
        ("0 a", "must be a positive number"),
        ("-1 a 1 b", "must be a positive number"),
        ("inf a", "must be a positive number"),
        ("nan a", "must be a positive number"),
        ("1 a 2 a", "names 'a' twice"),
        ("1 2", "expected a dataset prefix after weight 1"),
    ],
)
def test_parse_data_path_rejects_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_data_path(text)


def reference_blend(counts: list[int]) -> tuple[list[int], list[int]]:
    """Sort every (dataset, sample) by the exact key (c + 1/2) / t_i, ties to the lower dataset."""
    items = sorted((Fraction(2 * c + 1, 2 * t), i, c) for i, t in enumerate(counts) for c in range(t))
    return [i for _, i, _ in items], [c for _, _, c in items]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 120), min_size=1, max_size=8))
def test_blend_index_is_the_exact_merge(counts):
    dataset_index, sample_index = build_blend_index(counts)
    ref_d, ref_s = reference_blend(counts)
    assert dataset_index.tolist() == ref_d and sample_index.tolist() == ref_s
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64


def test_blend_prefixes_keep_every_dataset_near_its_share():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 400, size=int(rng.integers(2, 9))).tolist()
        dataset_index, sample_index = build_blend_index(counts)
        n = len(dataset_index)
        onehot = np.zeros((n, len(counts)))
        onehot[np.arange(n), dataset_index] = 1
        drawn = np.cumsum(onehot, axis=0)  # [n, D] samples of each dataset after each prefix
        share = np.arange(1, n + 1)[:, None] * np.array(counts)[None, :] / n
        assert np.abs(drawn - share).max() <= 1.5
        for d, t in enumerate(counts):  # each dataset's samples in its own order, each once
            assert sample_index[dataset_index == d].tolist() == list(range(t))


def write(prefix: str, rng: np.random.Generator, n: int, offset: int) -> None:
    """Documents of tokens offset + small ints, so the source dataset of a sample is visible."""
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for length in rng.integers(5, 50, size=n):
            writer.add_document(offset + rng.integers(0, 1000, size=length))


@pytest.fixture
def three(tmp_path) -> list[str]:
    rng = np.random.default_rng(1)
    prefixes = []
    for i, n in enumerate((120, 60, 200)):
        prefixes.append(str(tmp_path / f"d{i}"))
        write(prefixes[-1], rng, n, offset=10_000 * (i + 1))
    return prefixes


def test_blended_dataset_reads_and_caches(three, tmp_path):
    text = f"2 {three[0]} 1 {three[1]} 1 {three[2]}"
    ds = build_datasets(text, seq_length=12, seed=5, split_ratios=(90, 10, 0), num_samples={"train": 400, "valid": 20})
    train = ds["train"]
    assert isinstance(train, BlendedDataset) and ds["test"] is None
    assert len(train) == 200 + 100 + 100
    batch = train.get_batch(np.arange(len(train)))
    np.testing.assert_array_equal(batch[7], train[7])
    source = batch[:, 0] // 10_000 - 1
    np.testing.assert_array_equal(source, train.dataset_index)  # each sample from its dataset
    for d, comp in enumerate(train.datasets):  # ... and it is that dataset's next sample
        np.testing.assert_array_equal(batch[source == d], comp.get_batch(np.arange((source == d).sum())))
    again = build_datasets(
        text, seq_length=12, seed=5, split_ratios=(90, 10, 0), num_samples={"train": 400, "valid": 20}
    )
    assert not again["train"].built_index
    np.testing.assert_array_equal(again["train"].get_batch(np.arange(len(train))), batch)
    cache = os.path.join(os.path.dirname(three[0]), "index-cache")
    names = os.listdir(cache)
    assert sum(n.startswith("blend-train") for n in names) == 1 and sum(n.startswith("blend-valid") for n in names) == 1
    with pytest.raises(IndexError):
        train.get_batch([len(train)])


def test_build_datasets_split_and_count_rules(three):
    ds = build_datasets(
        three[0], seq_length=8, seed=1, split_ratios=(80, 20, 0), num_samples={"train": 50, "valid": None}
    )
    assert isinstance(ds["train"], GPTDataset) and len(ds["train"]) >= 50
    assert ds["valid"].num_samples is None  # None: one epoch
    assert ds["test"] is None  # ratio 0
    ds = build_datasets(
        three[0], seq_length=8, seed=1, split_ratios=(80, 10, 10), num_samples={"train": 50, "valid": 0}
    )
    assert ds["valid"] is None and ds["test"] is None  # 0 or missing: not wanted
    with pytest.raises(ValueError, match="unknown splits"):
        build_datasets(three[0], seq_length=8, seed=1, split_ratios=(1, 0, 0), num_samples={"validation": 3})
    with pytest.raises(ValueError, match="non-negative int"):
        build_datasets(three[0], seq_length=8, seed=1, split_ratios=(1, 0, 0), num_samples={"train": -1})
    with pytest.raises(ValueError, match="should be a weight"):
        build_datasets(f"{three[0]} {three[1]}", seq_length=8, seed=1, split_ratios=(1, 0, 0), num_samples={"train": 1})
    with pytest.raises(ValueError, match="file not found"):
        build_datasets(three[0] + "_missing", seq_length=8, seed=1, split_ratios=(1, 0, 0), num_samples={"train": 1})


def _rank(rank: int, text: str, barrier, out, fail: bool) -> None:
    try:
        ds = build_datasets(
            text,
            seq_length=10 if not fail else 100_000,
            seed=3,
            split_ratios=(1, 0, 0),
            num_samples={"train": 300 if not fail else None},
            is_builder=rank == 0,
            barrier=barrier.wait,
            wait_seconds=2,
        )
        train = ds["train"]
        built = train.built_index or any(c.built_index for c in getattr(train, "datasets", []))
        out.put((rank, built, train.get_batch(np.arange(len(train))).tobytes(), None))
    except Exception as exc:
        out.put((rank, None, None, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("blend", [False, True])
def test_ranks_build_once_and_share(three, blend):
    text = f"1 {three[0]} 3 {three[2]}" if blend else three[1]
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, text, barrier, out, False)) for r in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[3] for r in results] == [None] * 3
    assert [r[1] for r in results] == [True, False, False]  # only rank 0 built; the others mapped
    assert len({r[2] for r in results}) == 1


def test_a_failing_builder_does_not_hang_the_others(three):
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, three[1], barrier, out, True)) for r in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert "too small" in results[0][3]  # the builder's own error
    assert "did not appear" in results[1][3]  # the other rank fails soon instead of hanging
    assert time.monotonic() - start < 30


def test_non_builders_without_barrier_wait_for_the_cache(three, tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()

    def waiter() -> None:
        ds = build_datasets(
            three[0],
            seq_length=6,
            seed=2,
            split_ratios=(1, 0, 0),
            num_samples={"train": 100},
            is_builder=False,
            wait_seconds=30,
        )
        out.put(ds["train"].get_batch(np.arange(100)).tobytes())

    proc = ctx.Process(target=waiter)
    proc.start()
    time.sleep(0.5)  # the waiter polls; nothing exists yet
    ds = build_datasets(three[0], seq_length=6, seed=2, split_ratios=(1, 0, 0), num_samples={"train": 100})
    assert out.get(timeout=30) == ds["train"].get_batch(np.arange(100)).tobytes()
    proc.join(timeout=30)
    assert proc.exitcode == 0
