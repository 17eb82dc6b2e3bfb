"""Preprocessing inputs as people have them: Parquet and `datasets.save_to_disk` Arrow corpora give
the same bytes as JSONL; empty documents are skipped and counted; malformed records stop with
file and row; an input without documents is an error; exact dedup is the same for any worker
count; long documents tokenized in pieces give the whole document's tokens."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.data.dedup import HASH_DTYPE, SeenSet, record_hash
from pretrain.data.indexed import IndexedDataset
from pretrain.data.long_documents import cuts, encode_long, split_mode
from pretrain.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run(tokenizer: str, inputs: list[str], prefix: str, *extra: str) -> subprocess.CompletedProcess:
    args = ["--input", *inputs, "--output-prefix", prefix, "--tokenizer", tokenizer, *extra]
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def read_pair(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def write_jsonl(path: Path, texts: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(stdlib_data) -> dict:
    """The stdlib corpus (JSONL), its texts, the fixture's tokenizer, and the JSONL path's output."""
    path = os.path.join(os.path.dirname(stdlib_data["prefix"]), "corpus.jsonl")
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return {"path": path, "texts": texts, "tokenizer": stdlib_data["tokenizer"], "reference": stdlib_data["prefix"]}


def test_parquet_shards_give_the_jsonl_bytes(corpus, tmp_path):
    texts = corpus["texts"]
    shards = tmp_path / "shards"
    shards.mkdir()
    # Three files, several row groups each, an extra column, the text column not first.
    bounds = [0, len(texts) // 3, 2 * len(texts) // 3, len(texts)]
    for k in range(3):
        part = texts[bounds[k] : bounds[k + 1]]
        table = pa.table({"id": list(range(len(part))), "text": part})
        pq.write_table(table, shards / f"train-{k:05d}.parquet", row_group_size=97)
    reference = read_pair(corpus["reference"])
    for extra in (
        ["--workers", "1"],
        ["--workers", "2"],
        ["--workers", "2", "--partitions", "2", "--chunk-bytes", "20000"],
    ):
        prefix = str(tmp_path / f"pq{len(extra)}")
        result = run(corpus["tokenizer"], [str(shards)], prefix, "--append-eod", *extra)
        assert result.returncode == 0, result.stderr
        assert read_pair(prefix + "_text_document") == reference, extra
    # A glob of the same files, and a missing column named.
    prefix = str(tmp_path / "glob")
    assert run(corpus["tokenizer"], [str(shards / "*.parquet")], prefix, "--append-eod").returncode == 0
    assert read_pair(prefix + "_text_document") == reference
    result = run(corpus["tokenizer"], [str(shards)], str(tmp_path / "x"), "--json-keys", "content")
    assert result.returncode == 1 and "train-00000.parquet: no column 'content'" in result.stderr
    assert "'id', 'text'" in result.stderr and "--json-keys" in result.stderr
    result = run(corpus["tokenizer"], [str(shards)], str(tmp_path / "x"), "--json-keys", "id")
    assert result.returncode == 1 and "column 'id' holds int64, not text" in result.stderr


def save_to_disk_layout(directory: Path, texts: list[str], *, files: int, batch_rows: int) -> None:
    """What `datasets.Dataset.save_to_disk` writes: data-0000k-of-0000n.arrow IPC streams,
    state.json listing them in order, dataset_info.json."""
    directory.mkdir()
    names = [f"data-{k:05d}-of-{files:05d}.arrow" for k in range(files)]
    schema = pa.schema([("text", pa.large_string()), ("source", pa.string())])
    per_file = -(-len(texts) // files)
    for k, name in enumerate(names):
        part = texts[k * per_file : (k + 1) * per_file]
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for i in range(0, len(part), batch_rows):
                rows = part[i : i + batch_rows]
                writer.write_batch(pa.record_batch([pa.array(rows, pa.large_string()), ["stdlib"] * len(rows)], schema))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "large_string"}}}))


def test_save_to_disk_arrow_directory_gives_the_jsonl_bytes(corpus, tmp_path):
    dataset = tmp_path / "saved"
    # Files listed out of name order in state.json would be read in its order; here they agree.
    save_to_disk_layout(dataset, corpus["texts"], files=3, batch_rows=50)
    reference = read_pair(corpus["reference"])
    for extra in (["--workers", "1"], ["--workers", "2", "--partitions", "2", "--chunk-bytes", "30000"]):
        prefix = str(tmp_path / f"arrow{len(extra)}")
        result = run(corpus["tokenizer"], [str(dataset)], prefix, "--append-eod", *extra)
        assert result.returncode == 0, result.stderr
        assert read_pair(prefix + "_text_document") == reference, extra
    # One Arrow file in the IPC file format (random access, "ARROW1"), as pyarrow writes it.
    table = pa.table({"text": corpus["texts"]})
    with pa.OSFile(str(tmp_path / "one.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    prefix = str(tmp_path / "ipcfile")
    result = run(corpus["tokenizer"], [str(tmp_path / "one.arrow")], prefix, "--append-eod", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert read_pair(prefix + "_text_document") == reference
    # A DatasetDict directory asks for one split.
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path / "dict" / "train").mkdir()
    result = run(corpus["tokenizer"], [str(tmp_path / "dict")], str(tmp_path / "y"))
    assert result.returncode != 0 and "pass one split's directory" in result.stderr


def test_empty_documents_are_skipped_and_counted(corpus, tmp_path):
    lines = ['{"text": "a"}', '{"text": "b"}', '{"text": ""}', "", '{"text": " \\n\\t "}', '{"text": "d"}']
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "ok")
    result = run(corpus["tokenizer"], [str(path)], prefix, "--append-eod", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "skipped: 2 empty documents, 1 blank line" in result.stderr
    assert "docs.jsonl:3: empty document: 'text' holds no text" in result.stderr
    tok = load_tokenizer(corpus["tokenizer"])
    ds = IndexedDataset(prefix + "_text_document")
    assert [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == ["a", "b", "d"]

    out = tmp_path / "out"
    out.mkdir()
    result = run(corpus["tokenizer"], [str(path)], str(out / "e"), "--empty", "error")
    assert result.returncode == 1 and "docs.jsonl:3: empty document: 'text' holds no text" in result.stderr
    assert os.listdir(out) == []
    # Columnar: the row, counted from 0.
    pq.write_table(pa.table({"text": ["x", "y", "  "]}), tmp_path / "e.parquet")
    result = run(corpus["tokenizer"], [str(tmp_path / "e.parquet")], str(out / "e"), "--empty", "error")
    assert result.returncode == 1 and "e.parquet: row 2: empty document" in result.stderr


def test_malformed_rows_stop_with_file_and_row(corpus, tmp_path):
    texts = [f"document {i}" for i in range(40)]
    texts[23] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "nulls.parquet", row_group_size=10)
    out = tmp_path / "out"
    out.mkdir()
    for extra in (["--workers", "1"], ["--workers", "2", "--partitions", "2", "--chunk-bytes", "30"]):
        result = run(corpus["tokenizer"], [str(tmp_path / "nulls.parquet")], str(out / "n"), *extra)
        assert result.returncode == 1, result.stderr
        assert "nulls.parquet: row 23: 'text' is null" in result.stderr and "Traceback" not in result.stderr
        assert os.listdir(out) == []
    result = run(corpus["tokenizer"], [str(tmp_path / "nulls.parquet")], str(out / "n"), "--skip-bad-lines")
    assert result.returncode == 0 and "skipped: 1 bad record" in result.stderr
    assert len(IndexedDataset(str(out / "n_text_document"))) == 39


def test_an_input_without_documents_is_an_error(corpus, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    write_jsonl(tmp_path / "blank.jsonl", ["", " ", "\n"])
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    out = tmp_path / "out"
    out.mkdir()
    for name, skipped in (("empty.jsonl", "nothing"), ("blank.jsonl", "3 empty documents"), ("none.parquet", "")):
        for extra in (["--workers", "1"], ["--workers", "2", "--partitions", "2"]):
            result = run(corpus["tokenizer"], [str(tmp_path / name)], str(out / "z"), *extra)
            assert result.returncode == 2, (name, result.stderr)
            assert "the input holds no document to write" in result.stderr and skipped in result.stderr
            assert os.listdir(out) == []


def normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def test_dedup_is_exact_and_the_same_for_any_worker_count(corpus, tmp_path):
    rng = random.Random(5)
    base = [t for t in corpus["texts"] if len(t) < 20000][:400]
    docs = list(base)
    planted = 0
    for _ in range(120):  # copies, whitespace variants and NFD spellings of earlier documents
        text = rng.choice(base)
        variant = rng.choice(
            [text, "  " + text.replace("\n", " \n\t", 3) + "\n", unicodedata.normalize("NFD", text + " café")]
        )
        docs.insert(rng.randrange(len(docs) + 1), variant)
    docs += ["Café au lait", "Cafe\u0301   au\nlait", "café au lait"]  # 1 duplicate; case counts
    seen, expected = set(), []
    for text in docs:
        if normalised(text) not in seen:
            seen.add(normalised(text))
            expected.append(text)
    planted = len(docs) - len(expected)
    assert planted > 50
    half = len(docs) // 2
    inputs = [write_jsonl(tmp_path / "a.jsonl", docs[:half])]
    pq.write_table(pa.table({"text": docs[half:]}), tmp_path / "b.parquet", row_group_size=37)
    inputs.append(str(tmp_path / "b.parquet"))

    reference = str(tmp_path / "expected")
    assert run(corpus["tokenizer"], [write_jsonl(tmp_path / "e.jsonl", expected)], reference).returncode == 0
    for extra in (
        ["--workers", "1"],
        ["--workers", "2", "--chunk-bytes", "5000"],
        ["--workers", "4", "--partitions", "4", "--chunk-bytes", "5000"],
    ):
        prefix = str(tmp_path / f"d{extra[1]}")
        result = run(corpus["tokenizer"], inputs, prefix, "--dedup", "exact", *extra)
        assert result.returncode == 0, result.stderr
        assert f"skipped: {planted} duplicates" in result.stderr, result.stderr
        assert read_pair(prefix + "_text_document") == read_pair(reference + "_text_document"), extra


def test_seen_set_and_record_hash():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(300, 16), dtype=np.uint8).view(HASH_DTYPE).ravel()
    seen, reference = SeenSet(), set()
    for _ in range(60):
        batch = pool[rng.integers(0, len(pool), size=int(rng.integers(0, 40)))]
        keep = seen.add_new(batch)
        expected = []
        for h in batch.tolist():
            expected.append(h not in reference)
            reference.add(h)
        assert keep.tolist() == expected
    assert len(seen) == len(reference)
    # The windowed normalisation of a long text is the whole-text definition.
    words = ["naïve", "cafe\u0301", "x" * 50, "\t", "字", "\n\n"]
    long = " ".join(random.Random(1).choice(words) for _ in range(600_000))
    assert len(long) > 2 * (1 << 20)
    assert record_hash([long]) == hashlib.blake2b(normalised(long).encode(), digest_size=16).digest()
    assert record_hash(["a b", "c"]) != record_hash(["a", "b c"])


def byte_level_bpe(directory: Path, texts: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = str(directory / "tokenizer.json")
    tok.save(path)
    return path


def other_sentencepiece(directory: Path, texts: list[str], name: str, **options) -> str:
    """Sentencepiece models unlike ours: its defaults (NFKC, a dummy prefix, extra whitespace
    removed), or a dummy prefix with whitespace kept (as Llama 2's), which needs "drop-space"."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for text in texts for t in text.splitlines() if t.strip()),
        model_prefix=str(directory / name),
        vocab_size=800,
        minloglevel=2,
        **options,
    )
    return str(directory / f"{name}.model")


@pytest.fixture(scope="module")
def long_text(corpus) -> str:
    text = "\n".join(corpus["texts"])[: 3 << 20]
    return text + " 字文字 🙂 " + "x" * 5000 + "   end"  # non-ASCII, a stretch without spaces


def test_long_documents_in_pieces_give_the_whole_documents_tokens(corpus, long_text, tmp_path):
    texts = corpus["texts"][:300]
    tokenizers = {
        "sentencepiece (ours)": corpus["tokenizer"],
        "byte-level BPE": byte_level_bpe(tmp_path, texts),
        "sentencepiece (defaults)": other_sentencepiece(tmp_path, texts, "default", model_type="bpe"),
        "sentencepiece (dummy prefix)": other_sentencepiece(
            tmp_path,
            texts,
            "prefix",
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
        ),
    }
    modes = {}
    text = long_text[: 1 << 20] + long_text[-6000:]
    assert len(list(cuts(text, piece_chars=3000))) > 300
    for name, path in tokenizers.items():
        tok = load_tokenizer(path)
        mode = modes[name] = split_mode(tok)
        dtype = np.dtype(np.int32)
        pieces = encode_long(tok, text, mode=mode, dtype=dtype, suffix=[tok.eod], piece_chars=3000)
        assert pieces.tolist() == tok.encode(text) + [tok.eod], name
    assert modes == {
        "sentencepiece (ours)": "plain",
        "byte-level BPE": "plain",
        "sentencepiece (defaults)": "plain",
        "sentencepiece (dummy prefix)": "drop-space",
    }


def test_a_long_document_through_preprocessing(corpus, long_text, tmp_path):
    """Over 1 MiB: tokenized in pieces by the tool, equal to the whole document's tokens."""
    path = write_jsonl(tmp_path / "long.jsonl", ["short one", long_text, "short two"])
    tok = load_tokenizer(corpus["tokenizer"])
    expected = [tok.encode(t) + [tok.eod] for t in ("short one", long_text, "short two")]
    for workers in ("1", "2"):
        prefix = str(tmp_path / f"long{workers}")
        result = run(corpus["tokenizer"], [path], prefix, "--append-eod", "--workers", workers)
        assert result.returncode == 0, result.stderr
        ds = IndexedDataset(prefix + "_text_document")
        assert [ds[i].tolist() for i in range(3)] == expected


def test_huge_json_lines_are_read_a_window_at_a_time(monkeypatch):
    """Small windows stand in for 1 MiB ones: escapes, surrogate pairs, UTF-8 and long stretches
    without a space are never cut through, and the windows join to json.loads's text."""
    from pretrain.data import huge_records

    monkeypatch.setattr(huge_records, "WINDOW", 64)
    monkeypatch.setattr(huge_records, "MAX_WINDOW", 150)
    rng = random.Random(3)
    alphabet = ["a", "é", "字", "🙂", "\\", '"', "\n", "\t", " ", "  ", "\u2028", "x" * 40, "\\u"]
    for trial in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(200, 900)))
        record = {"id": [1, {"k": "v, }"}], "text": text, "title": "t"}
        line = json.dumps(record, ensure_ascii=trial % 2 == 0).encode() + b"\n"
        values = huge_records.parse_huge_line(bytearray(line), ["text", "title"])
        assert values is not None and values[1] == "t"
        windows = list(values[0].windows())
        assert "".join(windows) == text and len(windows) > 2
        assert record_hash([values[0]]) == record_hash([text])
    with pytest.raises(KeyError, match="'id', 'text'"):
        huge_records.parse_huge_line(bytearray(b'{"id": 1, "text": "' + b"a" * 100 + b'"}'), ["body"])
    assert huge_records.parse_huge_line(bytearray(b'{"text": "a"} trailing'), ["text"]) is None


def test_huge_documents_take_the_bounded_path_and_give_the_same_bytes(corpus, long_text, tmp_path, monkeypatch):
    """With the 16 MiB threshold lowered, JSONL lines and Parquet values over it are parsed in the
    main process as LongTexts: same bytes as the ordinary path, same errors and skips."""
    from pretrain.data import chunk_encoder, encode_pipeline, huge_records, sources
    from pretrain.data import preprocess as engine

    tok = load_tokenizer(corpus["tokenizer"])
    docs = ["short", long_text[:400_000], " \t\n" * 50_000, "tail", long_text[-300_000:]]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet")

    def run_api(inputs, prefix, **kw):
        return engine.preprocess(inputs, output_prefix=str(tmp_path / prefix), tokenizer=tok, append_eod=True, **kw)

    reference = run_api([path], "ref", workers=1)
    assert reference.skips["empty"] == 1
    for module, name in ((chunk_encoder, "HUGE_BYTES"), (sources, "HUGE_BYTES"), (encode_pipeline, "_HUGE_CHUNK")):
        monkeypatch.setattr(module, name, 100_000)
    monkeypatch.setattr(huge_records, "WINDOW", 30_000)
    for inputs, workers in (([path], 2), ([str(tmp_path / "docs.parquet")], 2), ([path], 1)):
        stats = run_api(inputs, f"huge{workers}", workers=workers, chunk_bytes=50_000, dedup=True)
        assert stats.skips["empty"] == 1 and stats.docs == 4
        assert read_pair(str(tmp_path / f"huge{workers}_text_document")) == read_pair(
            str(tmp_path / "ref_text_document")
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": long_text[:200_000]}) + "\n")
    with pytest.raises(engine.PreprocessError, match=r"bad.jsonl:1: no key \(keys present: 'body'\)"):
        run_api([str(bad)], "bad")


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_parquet_page_reader_equals_pyarrow(tmp_path, version):
    """The page reader used for row groups of huge documents gives pyarrow's values, row for
    row, over the layouts writers produce: nulls, dictionary or plain, several pages and row
    groups, each codec; a codec it does not follow is left to pyarrow."""
    from pretrain.data import parquet_pages

    rng = random.Random(0)
    texts = [
        None if rng.random() < 0.2 else "".join(rng.choice("ab çé😀\n") for _ in range(rng.randint(0, 3000)))
        for _ in range(200)
    ]
    texts += texts[:40]  # repeated values go through the dictionary
    titles = [f"t{i}" if i % 7 else None for i in range(len(texts))]
    schema = pa.schema([pa.field("text", pa.string()), pa.field("title", pa.large_string())])
    checked = 0
    for codec, dictionary, page in [
        ("NONE", True, 1 << 20),
        ("snappy", True, 2048),
        ("zstd", False, 2048),
        ("gzip", False, 1 << 20),
        ("brotli", True, 1 << 20),
        ("lz4", True, 2048),
    ]:
        path = str(tmp_path / f"{codec}.parquet")
        pq.write_table(
            pa.table({"text": texts, "title": titles}, schema=schema),
            path,
            compression=codec,
            use_dictionary=dictionary,
            data_page_version=version,
            data_page_size=page,
            row_group_size=90,
            dictionary_pagesize_limit=20_000,
        )
        parquet = pq.ParquetFile(path)
        for group in range(parquet.metadata.num_row_groups):
            keys = ["text", "title"]
            if not parquet_pages.supported(parquet, group, keys):
                assert codec == "lz4"
                continue
            want = [[r["text"], r["title"]] for r in parquet.read_row_group(group, columns=keys).to_pylist()]
            rows = parquet_pages.iter_rows(path, parquet, group, keys)
            assert [[None if v is None else v.tobytes().decode() for v in row] for row in rows] == want
            checked += 1
    assert checked == 5 * 3
