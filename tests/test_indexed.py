"""The MMIDIDX reader/writer: round trips, validation, crash safety, megatron-core compatibility."""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pretrain.data.indexed import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    dtype_for_vocab,
    merge_datasets,
)

ALL_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]


def random_documents(rng: np.random.Generator, dtype, n: int = 20, max_len: int = 50) -> list[np.ndarray]:
    docs = []
    for i in range(n):
        length = 0 if i == 3 else int(rng.integers(1, max_len))  # one empty document on purpose
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            docs.append(rng.integers(info.min, int(info.max) + 1, size=length, dtype=dtype))
        else:
            docs.append(rng.standard_normal(length).astype(dtype))
    return docs


def write(prefix: str, docs, dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for doc in docs:
            writer.add_document(doc)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_round_trip(tmp_path, dtype):
    docs = random_documents(np.random.default_rng(0), dtype)
    prefix = str(tmp_path / "ds")
    write(prefix, docs, dtype)
    ds = IndexedDataset(prefix)

    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    itemsize = np.dtype(dtype).itemsize
    assert ds.sequence_pointers.tolist() == [itemsize * sum(len(d) for d in docs[:i]) for i in range(len(docs))]
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(0, offset=2, length=3), docs[0][2:5])
    np.testing.assert_array_equal(ds.get(1, offset=1), docs[1][1:])
    # Views into the mapping, not copies.
    assert np.shares_memory(ds[0], ds.tokens)
    assert not ds[0].flags.writeable
    assert os.path.getsize(prefix + ".bin") == ds.num_tokens * itemsize


def test_access_errors(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[1, 2, 3], [4]], np.uint16)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    with pytest.raises(IndexError):
        ds.get(0, offset=-1)


def test_dtype_for_vocab():
    assert dtype_for_vocab(300) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(128256) == np.int32


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    write(prefix, [], np.uint16)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0
    assert ds.document_indices.tolist() == [0]


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "ds"), dtype=np.uint16) as writer:
        with pytest.raises(ValueError, match="do not fit"):
            writer.add_document([1, 70000])
        with pytest.raises(ValueError, match="do not fit"):
            writer.add_document([-1])
        with pytest.raises(ValueError, match="integers"):
            writer.add_document(np.array([1.5]))
        with pytest.raises(ValueError, match="1-D"):
            writer.add_document(np.zeros((2, 2), dtype=np.uint16))
        writer.add_document([65535])
    assert IndexedDataset(str(tmp_path / "ds"))[0].tolist() == [65535]


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
            writer.add_document(list(range(1000)))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []  # no final names and no temporaries


def test_writer_keeps_old_output_until_finalize(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[1, 2]], np.uint16)
    writer = IndexedDatasetWriter(prefix, dtype=np.uint16)
    writer.add_document([7, 7, 7])
    # Before finalize the previous, complete pair is what readers see.
    assert IndexedDataset(prefix)[0].tolist() == [1, 2]
    writer.finalize()
    assert IndexedDataset(prefix)[0].tolist() == [7, 7, 7]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    with pytest.raises(RuntimeError):
        writer.add_document([1])


def test_pickle_reopens(tmp_path):
    import pickle

    prefix = str(tmp_path / "ds")
    write(prefix, [[5, 6, 7]], np.uint16)
    clone = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    assert clone[0].tolist() == [5, 6, 7]


# -- validation --------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[1, 2, 3], [4, 5], [6]], np.uint16)
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    return prefix, idx


def patch(idx: bytes, offset: int, data: bytes) -> bytes:
    return idx[:offset] + data + idx[offset + len(data) :]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"", "truncated index"),
        (lambda b: b[:20], "truncated index"),
        (lambda b: b[:-1], "truncated index"),
        (lambda b: b + b"\0" * 5, "trailing bytes"),
        (lambda b: patch(b, 0, b"NOTMEGAT\0"), "not a megatron MMIDIDX index"),
        (lambda b: patch(b, 9, struct.pack("<Q", 2)), "unsupported index version 2"),
        (lambda b: patch(b, 17, bytes([9])), "unknown dtype code 9"),
        (lambda b: patch(b, 17, bytes([4])), "pointer 6, expected 12"),  # claims int32 tokens
        (lambda b: patch(b, 17, bytes([5])), "not a multiple"),  # int64: 12-byte .bin
        (lambda b: patch(b, 18, struct.pack("<Q", 2**60)), "truncated index"),
        (lambda b: patch(b, HEADER_SIZE, struct.pack("<i", -3)), "negative length"),
        (lambda b: patch(b, HEADER_SIZE, struct.pack("<i", 4)), "expected"),
        (lambda b: patch(b, HEADER_SIZE + 12 + 8, struct.pack("<q", 2)), "pointer 2, expected 6"),
        (lambda b: patch(b, HEADER_SIZE + 12 + 24, struct.pack("<q", 1)), "document indices"),
        (lambda b: patch(b, len(b) - 8, struct.pack("<q", 2)), "document indices"),
    ],
)
def test_garbled_index_is_reported(good, mutate, message):
    prefix, idx = good
    with open(prefix + ".idx", "wb") as f:
        f.write(mutate(idx))
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert "ds." in str(info.value)  # names the file


@pytest.mark.parametrize("ext", [".idx", ".bin"])
def test_missing_file(good, ext):
    prefix, _ = good
    os.remove(prefix + ext)
    with pytest.raises(IndexedDatasetError, match=f"ds{ext}: file not found"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("new_size", [0, 4, 11, 14])
def test_bin_size_mismatch(good, new_size):
    prefix, _ = good
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(new_size)  # 14 extends the 12-byte .bin with zeros
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin: size"):
        IndexedDataset(prefix)


def _base_pair(tmpdir: str) -> tuple[str, bytes, list[list[int]]]:
    docs = [list(range(i, i + 2 * i + 1)) for i in range(6)]
    prefix = os.path.join(tmpdir, "base")
    write(prefix, docs, np.uint16)
    with open(prefix + ".idx", "rb") as f:
        return prefix, f.read(), docs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    bin_cut=st.one_of(st.none(), st.integers(0, 100)),
)
def test_any_corruption_reads_consistently_or_raises(edits, cut, bin_cut):
    with tempfile.TemporaryDirectory() as tmpdir:
        prefix, idx, _ = _base_pair(tmpdir)
        data = bytearray(idx)
        for pos, value in edits:
            data[pos % len(data)] = value
        if cut is not None:
            data = data[: cut % (len(data) + 1)]
        with open(prefix + ".idx", "wb") as f:
            f.write(bytes(data))
        if bin_cut is not None:
            with open(prefix + ".bin", "r+b") as f:
                f.truncate(bin_cut)
        try:
            ds = IndexedDataset(prefix)
        except IndexedDatasetError:
            event("rejected")
            return
        event("opened")
        # Opened: every sequence must be readable, of its stated length, inside the .bin.
        total = 0
        for i in range(len(ds)):
            seq = ds[i]
            assert len(seq) == ds.sequence_lengths[i]
            total += len(seq)
        assert total == ds.num_tokens == os.path.getsize(prefix + ".bin") // ds.dtype.itemsize
        del ds, seq


# -- byte compatibility with megatron-core 0.16.1, the reference implementation ----------------


def test_megatron_reads_ours_and_we_read_megatrons(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for dtype in (np.uint16, np.int32):
        docs = random_documents(np.random.default_rng(1), dtype, n=30)
        ours, theirs = str(tmp_path / f"ours_{dtype.__name__}"), str(tmp_path / f"theirs_{dtype.__name__}")
        write(ours, docs, dtype)

        builder = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
        for doc in docs:
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
        builder.finalize(theirs + ".idx")

        for ext in (".bin", ".idx"):
            with open(ours + ext, "rb") as a, open(theirs + ext, "rb") as b:
                assert a.read() == b.read(), f"{ext} differs from megatron-core's for {dtype}"

        mega = MegatronDataset(ours, multimodal=False, mmap=True)
        assert len(mega) == len(docs)
        np.testing.assert_array_equal(mega.document_indices, np.arange(len(docs) + 1))
        for i, doc in enumerate(docs):
            np.testing.assert_array_equal(mega[i], doc)
        mine = IndexedDataset(theirs)
        for i, doc in enumerate(docs):
            np.testing.assert_array_equal(mine[i], doc)


def test_bulk_add_documents_equals_one_by_one(tmp_path):
    docs = random_documents(np.random.default_rng(3), np.uint16, n=40)
    write(str(tmp_path / "single"), docs, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "bulk"), dtype=np.uint16) as writer:
        writer.add_documents(np.concatenate(docs[:25]), [len(d) for d in docs[:25]])
        writer.add_document(docs[25])
        writer.add_documents(np.concatenate(docs[26:]), np.array([len(d) for d in docs[26:]]))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"single{ext}").read_bytes() == (tmp_path / f"bulk{ext}").read_bytes()
    with IndexedDatasetWriter(str(tmp_path / "bad"), dtype=np.uint16) as writer:
        with pytest.raises(ValueError, match="sum to 5"):
            writer.add_documents(np.zeros(4, np.uint16), [2, 3])
        with pytest.raises(ValueError, match="needs a 1-D uint16 array"):
            writer.add_documents(np.zeros(4, np.int64), [4])


def test_merge_keeps_megatrons_multi_sequence_documents(tmp_path):
    """Sentence-level data (several sequences per document) survives a merge, for megatron too."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(4)
    theirs = str(tmp_path / "sentences")
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=np.int32)
    sentences = []
    for _ in range(7):  # documents of 1-3 sentences
        for _ in range(int(rng.integers(1, 4))):
            s = rng.integers(0, 1000, size=int(rng.integers(1, 9)))
            sentences.append(s)
            builder.add_item(torch.from_numpy(s))
        builder.end_document()
    builder.finalize(theirs + ".idx")
    ours = str(tmp_path / "flat")
    flat_docs = random_documents(rng, np.int32, n=5)
    write(ours, flat_docs, np.int32)

    merged = merge_datasets([theirs, ours, theirs], str(tmp_path / "merged"))
    source = MegatronDataset(theirs, multimodal=False, mmap=True)
    n_seq, n_doc = len(sentences), len(source.document_indices) - 1
    expected_docs = np.concatenate(
        [source.document_indices, n_seq + np.arange(1, 6), n_seq + 5 + source.document_indices[1:]]
    )
    np.testing.assert_array_equal(merged.document_indices, expected_docs)
    assert len(merged) == 2 * n_seq + 5 and len(merged.document_indices) == 2 * n_doc + 5 + 1
    mega = MegatronDataset(str(tmp_path / "merged"), multimodal=False, mmap=True)
    np.testing.assert_array_equal(mega.document_indices, expected_docs)
    for i, seq in enumerate(sentences + flat_docs + sentences):
        np.testing.assert_array_equal(mega[i], seq)
        np.testing.assert_array_equal(merged[i], seq)

    write(str(tmp_path / "small"), [[1, 2]], np.uint16)
    with pytest.raises(ValueError, match="different token dtypes"):
        merge_datasets([ours, str(tmp_path / "small")], str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets([ours], ours)
    assert not (tmp_path / "mixed.bin").exists()
