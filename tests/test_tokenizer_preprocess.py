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
    result = run_tool(
        "train_tokenizer.py", "--input", corpus[0], "--output", prefix, "--vocab-size", str(VOCAB)
    )
    assert result.returncode == 0, result.stderr
    assert os.path.exists(prefix + ".vocab")
    return prefix + ".model"


def test_tokenizer_interface_and_round_trip(tokenizer_path, corpus):
    tok = load_tokenizer(tokenizer_path)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad) == (VOCAB, 2, 3)
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
    with pytest.raises(ValueError, match="directory"):
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


def bad_input(tmp_path, lines: list[str]) -> str:
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "third_line, message",
    [
        ('{"text": "unterminated', "bad.jsonl:3: invalid JSON"),
        ('{"body": "no text key"}', "bad.jsonl:3: no key 'text'"),
        ('{"text": 42}', "bad.jsonl:3: 'text' holds int"),
        ('["a list"]', "bad.jsonl:3: expected a JSON object"),
    ],
)
def test_preprocess_bad_line_names_file_and_line(tokenizer_path, tmp_path, third_line, message):
    path = bad_input(tmp_path, ['{"text": "a"}', '{"text": "b"}', third_line, '{"text": "d"}'])
    out = tmp_path / "out"
    out.mkdir()
    result = preprocess(tokenizer_path, [path], str(out / "ds"), "--append-eod")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(out) == []  # neither final names nor temporaries


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
    assert len({p.split("/")[0] for p in paths}) > 2  # mixed across packages, not one prefix
    assert sum(len(r["text"].encode()) for r in records) <= 300_000
    import sysconfig

    with open(os.path.join(sysconfig.get_paths()["stdlib"], paths[0]), encoding="utf-8") as f:
        assert f.read() == records[0]["text"]
