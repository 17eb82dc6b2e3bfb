"""Corpus, tokenizer training, tokenizer loading and preprocessing, through the real CLIs."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from pretrain.data.indexed import IndexedDataset
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def synthetic_source(rng: random.Random, i: int) -> str:
    """Python-like text with indentation, tabs, blank lines and a little non-ASCII."""
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "result"]
    lines = [f"def func_{i}({rng.choice(names)}, {rng.choice(names)}):"]
    for _ in range(rng.randint(2, 8)):
        indent = " " * rng.choice([4, 8])
        lines.append(f"{indent}{rng.choice(names)} = {rng.choice(names)} + {rng.randint(0, 999)}")
    if i % 7 == 0:
        lines.append("\t# tab-indented comment: naïve café")
    lines.append("")
    lines.append(f"    return {rng.choice(names)}\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list[str]]:
    rng = random.Random(0)
    texts = [synthetic_source(rng, i) for i in range(300)]
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "title": f"doc {i}"}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are skipped, not errors
    return path, texts


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    result = run_tool("train_tokenizer.py", "--input", corpus[0], "--output", prefix, "--vocab-size", str(VOCAB))
    assert result.returncode == 0, result.stderr
    assert os.path.exists(prefix + ".vocab")
    return prefix + ".model"


def test_tokenizer_interface_and_round_trip(tokenizer_path, corpus):
    tok = load_tokenizer(tokenizer_path)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.mask) == (VOCAB, 2, 3, 4)
    assert tok.mask not in tok.encode("a literal <mask> in text")  # a control piece, never encoded
    texts = corpus[1][:50] + ["  two leading spaces\n\n\ttab\r\n", "unseen ✓ 字 emoji 🙂", ""]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, batch, strict=True):
        assert tok.decode(ids) == text  # whitespace and non-ASCII survive (byte fallback)
        assert tok.eod not in ids and all(0 <= i < VOCAB for i in ids)
    # Pieces were learned: the text is compressed beyond one token per byte.
    joined = "".join(corpus[1][:50])
    assert len(tok.encode(joined)) < 0.75 * len(joined.encode())
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(texts[0]) == batch[0] and clone.eod == tok.eod


def test_load_tokenizer_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(corpus[0])
    with pytest.raises(ValueError, match="directory without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_train_tokenizer_reports_impossible_vocab(corpus, tmp_path):
    result = run_tool(
        "train_tokenizer.py", "--input", corpus[0], "--output", str(tmp_path / "t"), "--vocab-size", "100000"
    )
    assert result.returncode == 1
    assert "Vocabulary size too high" in result.stderr


def preprocess(tokenizer_path: str, inputs: list[str], prefix: str, *extra: str) -> subprocess.CompletedProcess:
    return run_tool(
        "preprocess_data.py", "--input", *inputs, "--output-prefix", prefix, "--tokenizer", tokenizer_path, *extra
    )


def read_pair(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def test_preprocess_is_identical_across_workers_and_decodes_back(tokenizer_path, corpus, tmp_path):
    path, texts = corpus
    outputs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        result = preprocess(tokenizer_path, [path], prefix, "--append-eod", "--workers", str(workers))
        assert result.returncode == 0, result.stderr
        assert "docs/s" in result.stderr and "MB/s" in result.stderr
        outputs[workers] = read_pair(prefix + "_text_document")
    assert outputs[1] == outputs[2]

    tok = load_tokenizer(tokenizer_path)
    ds = IndexedDataset(str(tmp_path / "w2_text_document"))
    assert len(ds) == len(texts)
    assert ds.dtype == np.uint16
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == text


def test_preprocess_several_keys_and_files_without_eod(tokenizer_path, corpus, tmp_path):
    path, texts = corpus
    prefix = str(tmp_path / "multi")
    result = preprocess(tokenizer_path, [path, path], prefix, "--json-keys", "text", "title")
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(tokenizer_path)
    text_ds = IndexedDataset(prefix + "_text_document")
    title_ds = IndexedDataset(prefix + "_title_document")
    assert len(text_ds) == len(title_ds) == 2 * len(texts)  # both files, in order
    assert tok.decode(text_ds[len(texts)].tolist()) == texts[0]
    assert tok.decode(title_ds[5].tolist()) == "doc 5"
    assert tok.eod not in text_ds.tokens


BAD_LINES = [
    ('{"text": "unterminated', "bad.jsonl:3: invalid JSON"),
    ('{"body": "no text key"}', "bad.jsonl:3: no key 'text'"),
    ('{"text": 42}', "bad.jsonl:3: 'text' holds int"),
    ('["a list"]', "bad.jsonl:3: expected a JSON object"),
    ('{"text": "lone \\ud800 surrogate"}', "bad.jsonl:3: 'text' is not valid Unicode text"),
    (b'{"text": "caf\xe9"}', "bad.jsonl:3: not valid UTF-8"),
]


def bad_input(tmp_path, lines: list, name: str = "bad.jsonl") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


@pytest.mark.parametrize("third_line, message", BAD_LINES)
def test_preprocess_bad_line_names_file_and_line(tokenizer_path, tmp_path, third_line, message):
    path = bad_input(tmp_path, ['{"text": "a"}', '{"text": "b"}', third_line, '{"text": "d"}'])
    out = tmp_path / "out"
    out.mkdir()
    result = preprocess(tokenizer_path, [path], str(out / "ds"), "--append-eod", "--workers", "1")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(out) == []  # neither final names nor temporaries


def test_bad_line_is_found_in_any_chunk_worker_and_partition(tokenizer_path, tmp_path):
    """Many small chunks, worker processes and partitions: still the first bad line, by number."""
    from pretrain.data.preprocess import PreprocessError
    from pretrain.data.preprocess import preprocess as run

    tok = load_tokenizer(tokenizer_path)
    lines = [json.dumps({"text": f"document {i}"}) for i in range(3000)]
    lines[2222] = '{"text": 5}'
    lines[2900] = "{broken"
    path = bad_input(tmp_path, lines, "big.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    for workers, partitions in ((1, 1), (2, 1), (3, 3)):
        with pytest.raises(PreprocessError, match=r"big.jsonl:2223: 'text' holds int"):
            run(
                [path],
                output_prefix=str(out / "ds"),
                tokenizer=tok,
                workers=workers,
                partitions=partitions,
                chunk_bytes=1024,
            )
        assert os.listdir(out) == []


def test_skip_bad_lines_counts_and_keeps_keys_aligned(tokenizer_path, tmp_path):
    good = [json.dumps({"text": f"text {i}", "title": f"title {i}"}) for i in range(6)]
    lines = [good[0], '{"text": "no title"}', good[1], b"\xff\xfe", good[2], "", good[3], "[1]", good[4], good[5]]
    path = bad_input(tmp_path, lines)
    prefix = str(tmp_path / "skip")
    result = preprocess(
        tokenizer_path, [path], prefix, "--json-keys", "text", "title", "--skip-bad-lines", "--workers", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "skipped: 3 bad records, 1 blank line" in result.stderr
    assert "bad.jsonl:2: no key 'title'" in result.stderr and "bad.jsonl:4: not valid UTF-8" in result.stderr
    tok = load_tokenizer(tokenizer_path)
    texts, titles = IndexedDataset(prefix + "_text_document"), IndexedDataset(prefix + "_title_document")
    assert [tok.decode(texts[i].tolist()) for i in range(len(texts))] == [f"text {i}" for i in range(6)]
    assert [tok.decode(titles[i].tolist()) for i in range(len(titles))] == [f"title {i}" for i in range(6)]


def test_compressed_inputs_globs_and_partitions_give_identical_output(tokenizer_path, corpus, tmp_path):
    import gzip

    import zstandard

    path, texts = corpus
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_bytes(b"".join(lines[:100]))
    (shards / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[100:150])))
    (shards / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[150:])))
    reference = str(tmp_path / "ref")
    assert preprocess(tokenizer_path, [path], reference, "--append-eod", "--workers", "1").returncode == 0
    for extra in (["--workers", "2"], ["--workers", "3", "--partitions", "3", "--chunk-bytes", "2000"]):
        prefix = str(tmp_path / f"sharded{len(extra)}")
        result = preprocess(tokenizer_path, [str(shards / "*.jsonl*")], prefix, "--append-eod", *extra)
        assert result.returncode == 0, result.stderr
        assert read_pair(prefix + "_text_document") == read_pair(reference + "_text_document")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no partition leftovers
    result = preprocess(tokenizer_path, [str(tmp_path / "nothing*.jsonl")], str(tmp_path / "x"))
    assert result.returncode != 0 and "no input file matches" in result.stderr


def test_megatron_reads_the_preprocessed_tokens(tokenizer_path, corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    path, texts = corpus
    prefix = str(tmp_path / "m")
    assert preprocess(tokenizer_path, [path], prefix, "--append-eod", "--workers", "2").returncode == 0
    theirs = MegatronDataset(prefix + "_text_document", multimodal=False, mmap=True)
    tok = load_tokenizer(tokenizer_path)
    assert len(theirs) == len(texts)
    for i in (0, 17, len(texts) - 1):
        assert tok.decode(theirs[i][:-1].tolist()) == texts[i] and theirs[i][-1] == tok.eod


def hf_tokenizer(directory, corpus_texts: list[str], *, vocab: int | None = None) -> str:
    """A local tokenizer.json: BPE trained on the corpus, or a word-level one of `vocab` entries."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab is None:
        tok = HF(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<|endoftext|>", "<mask>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus_texts, trainer=trainer)
    else:
        words = {"<unk>": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(vocab - 2)}
        tok = HF(models.WordLevel(words, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


def test_hugging_face_tokenizer_json(corpus, tmp_path):
    path, texts = corpus
    tok_path = hf_tokenizer(str(tmp_path), texts)
    tok = load_tokenizer(str(tmp_path))  # the directory works too
    assert (tok.eod, tok.mask) == (1, 2) and tok.pad == tok.eod
    assert pickle.loads(pickle.dumps(tok)).encode(texts[0]) == tok.encode(texts[0])
    prefix = str(tmp_path / "hf")
    result = preprocess(tok_path, [path], prefix, "--append-eod", "--workers", "2")
    assert result.returncode == 0, result.stderr
    ds = IndexedDataset(prefix + "_text_document")
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    assert tok.decode(ds[5][:-1].tolist()) == texts[5] and ds[5][-1] == tok.eod

    # A vocabulary past uint16 is stored as int32.
    big = tmp_path / "big"
    big.mkdir()
    big_path = hf_tokenizer(str(big), [], vocab=70_000)
    lines = [json.dumps({"text": "w5 w69990 w12"}), json.dumps({"text": "w69997"})]
    data = bad_input(tmp_path, lines, "words.jsonl")
    result = preprocess(big_path, [data], str(big / "w"), "--append-eod")
    assert result.returncode == 0, result.stderr
    ds = IndexedDataset(str(big / "w_text_document"))
    assert ds.dtype == np.int32 and ds[0].tolist() == [7, 69992, 14, 1] and ds[1].tolist() == [69999, 1]


def test_merge_tool_concatenates(tokenizer_path, corpus, tmp_path):
    path, texts = corpus
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    (tmp_path / "one.jsonl").write_bytes(b"".join(lines[:120]))
    (tmp_path / "two.jsonl").write_bytes(b"".join(lines[120:]))
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("one", "two"):
        result = preprocess(tokenizer_path, [str(tmp_path / f"{name}.jsonl")], str(parts / name), "--append-eod")
        assert result.returncode == 0, result.stderr
    whole = str(tmp_path / "whole")
    assert preprocess(tokenizer_path, [path], whole, "--append-eod").returncode == 0
    merged = str(tmp_path / "merged")
    result = run_tool("merge_datasets.py", "--input", str(parts), "--output-prefix", merged)
    assert result.returncode == 0, result.stderr
    assert read_pair(merged) == read_pair(whole + "_text_document")
    bad = run_tool(
        "merge_datasets.py",
        "--input",
        str(parts / "one_text_document"),
        str(tmp_path / "nope"),
        "--output-prefix",
        str(tmp_path / "m2"),
    )
    assert bad.returncode == 1 and "nope.idx: file not found" in bad.stderr
    assert not os.path.exists(str(tmp_path / "m2.bin"))


def test_preprocess_missing_tokenizer_is_clear(corpus, tmp_path):
    result = preprocess(str(tmp_path / "nope.model"), [corpus[0]], str(tmp_path / "ds"))
    assert result.returncode != 0
    assert "tokenizer model not found" in result.stderr
    assert not any(name.startswith("ds") for name in os.listdir(tmp_path))


def test_stdlib_corpus_is_deterministic_and_bounded(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    for out in (a, b):
        result = run_tool("make_stdlib_corpus.py", "--output", out, "--max-bytes", "300000")
        assert result.returncode == 0, result.stderr
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    with open(a, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) > 3
    paths = [r["path"] for r in records]
    assert all(p.endswith(".py") and "site-packages" not in p for p in paths)
    assert all(r["text"].strip() for r in records)  # empty files would be bad documents
    assert len({p.split("/")[0] for p in paths}) > 2  # mixed across packages, not one prefix
    assert sum(len(r["text"].encode()) for r in records) <= 300_000
    import sysconfig

    with open(os.path.join(sysconfig.get_paths()["stdlib"], paths[0]), encoding="utf-8") as f:
        assert f.read() == records[0]["text"]
