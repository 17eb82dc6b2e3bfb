"""A 128k-piece byte-level BPE tokenizer.json end to end, through the real CLIs: train it
(tools/train_tokenizer.py --kind byte-level-bpe), preprocess with it (int32 tokens), train a tiny
llama 20 steps, export to Hugging Face; transformers then gives our logits and AutoTokenizer our
ids on every document. Also: the fused output loss at that vocabulary, and the trainer's errors.

The stdlib corpus alone is too small for 128k pieces: at the trainer's default --min-frequency 2
its first 4 MB yield 22,838 and all 29.2 MB 70,034 (BPE stops when no pair occurs twice; measured
on CPython 3.11.7's library without its data tables, which make_stdlib_corpus.py leaves out), so
generated Python-like documents with random identifiers and non-ASCII docstrings are added:
about 3 MB, which with the 4 MB stdlib part allow 176,941 pieces.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from pretrain.checkpoint import load_model  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.data.indexed import IndexedDataset  # noqa: E402
from pretrain.data.setup import check_data  # noqa: E402
from pretrain.data.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128_000  # a multiple of 128, so the model's embedding has no padding rows at TP=1
SEQ = 64

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Greek, Cyrillic, CJK and emoji: 2-, 3- and 4-byte UTF-8 through the byte-level alphabet.
_SCRIPTS = ((0x3B1, 0x3C9), (0x430, 0x44F), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F))


def run_tool(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 11)))


def _foreign(rng: random.Random) -> str:
    low, high = rng.choice(_SCRIPTS)
    return "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(2, 6)))


def generated_document(rng: random.Random, functions: int = 40) -> str:
    """Python-like functions whose names and arguments are random words, each used at least
    twice (so --min-frequency 2 can learn them), with digits and a non-ASCII docstring; a
    tenth of the documents spell our special tokens in a string, which must stay text."""
    parts = [f'MARKUP = "<s>{_word(rng)}</s><pad><mask><unk>"\n\n'] if rng.random() < 0.1 else []
    for _ in range(functions):
        name, a, b = _word(rng), _word(rng), _word(rng)
        parts.append(
            f"def {name}_{_word(rng)}({a}, {b}={rng.randint(0, 99999)}):\n"
            f'    """{_word(rng).capitalize()} {_word(rng)} {_foreign(rng)}."""\n'
            f"    {a} = {b} * {a} + {rng.randint(0, 999)}\n"
            f"    return {name}({a}, {b})\n\n"
        )
    return "".join(parts)


def build_corpus(path: Path, *, generated: int = 400) -> list[str]:
    """4 MB of the stdlib corpus followed by `generated` documents; returns every text."""
    result = run_tool("tools/make_stdlib_corpus.py", "--output", path, "--max-bytes", "4000000")
    assert result.returncode == 0, result.stderr
    rng = random.Random(0)
    with open(path, "a", encoding="utf-8") as f:
        for i in range(generated):
            f.write(json.dumps({"text": generated_document(rng), "path": f"generated/{i}.py"}) + "\n")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def train_overrides(base: Path, prefix: str, tokenizer: str, vocab_size: int) -> list[str]:
    return [
        f"data.path={prefix}",
        f"data.tokenizer={tokenizer}",
        f"model.vocab_size={vocab_size}",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        f"model.seq_length={SEQ}",
        "train.steps=20",
        "train.micro_batch_size=4",
        "train.log_interval=1",
        "train.eval_interval=0",
        "schedule.warmup_steps=2",
        "optimizer.lr=3e-3",
        f"checkpoint.dir={base}/ckpt",
        "checkpoint.interval=20",
        "checkpoint.async_save=false",
        f"logging.dir={base}/logs",
        "logging.tensorboard=false",
        "logging.peak_tflops=1",
    ]


@pytest.fixture(scope="module")
def run128k(tmp_path_factory) -> dict:
    """Corpus -> 128k tokenizer -> .bin/.idx -> 20 training steps -> HF export, each step
    through its CLI; the paths, the texts and the seconds each step took."""
    base = tmp_path_factory.mktemp("large_vocab")
    texts = build_corpus(base / "corpus.jsonl")
    seconds = {}

    start = time.perf_counter()
    result = run_tool(
        "tools/train_tokenizer.py",
        "--kind",
        "byte-level-bpe",
        "--input",
        base / "corpus.jsonl",
        "--output",
        base / "tokenizer",
        "--vocab-size",
        VOCAB,
    )
    seconds["tokenizer"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert f"of {VOCAB} pieces" in result.stderr

    start = time.perf_counter()
    result = run_tool(
        "tools/preprocess_data.py",
        "--input",
        base / "corpus.jsonl",
        "--output-prefix",
        base / "data",
        "--tokenizer",
        base / "tokenizer",
        "--append-eod",
        "--workers",
        "2",
    )
    seconds["preprocess"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr

    prefix = str(base / "data_text_document")
    start = time.perf_counter()
    overrides = train_overrides(base, prefix, str(base / "tokenizer"), VOCAB)
    result = run_tool("-m", "pretrain.train", "configs/llama_tiny.yaml", *overrides, timeout=600)
    seconds["train"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]

    start = time.perf_counter()
    result = run_tool("tools/convert_to_hf.py", "--checkpoint", base / "ckpt", "--output", base / "hf")
    seconds["export"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    print("large vocab seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return {"base": base, "texts": texts, "prefix": prefix, "tokenizer": str(base / "tokenizer")}


def test_tokenizer_reaches_128k_with_our_special_ids(run128k):
    tok = load_tokenizer(run128k["tokenizer"])
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == VOCAB
    assert (tok.unk, tok.bos, tok.eod, tok.pad, tok.mask) == (0, 1, 2, 3, 4)  # as the sentencepiece kind
    config = json.loads((Path(run128k["tokenizer"]) / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>" and config["split_special_tokens"] is True


def test_preprocessed_tokens_are_int32_and_ours(run128k):
    tok = load_tokenizer(run128k["tokenizer"])
    ds = IndexedDataset(run128k["prefix"])
    texts = run128k["texts"]
    assert ds.dtype == np.int32 and len(ds) == len(texts)
    assert int(ds[len(ds) - 1].max()) >= 1 << 16  # ids that uint16 could not hold are in use
    for i in (0, len(texts) // 2, len(texts) - 1):
        assert ds[i].tolist() == tok.encode(texts[i]) + [tok.eod]


def test_training_loss_falls_at_128k(run128k):
    records = [json.loads(line) for line in (run128k["base"] / "logs/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20 and abs(losses[0] - np.log(VOCAB)) < 0.5  # starts at uniform
    assert losses[-1] < losses[0] - 1.0, losses


def test_export_loads_in_transformers_with_our_logits(run128k):
    hf_dir = run128k["base"] / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        assert (hf_dir / name).is_file(), name
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["vocab_size"] == VOCAB
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)

    ours, _ = load_model(run128k["base"] / "ckpt")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, local_files_only=True, output_loading_info=True
    )
    assert not any(info.values()), info
    ds = IndexedDataset(run128k["prefix"])
    # Real tokens: the start of the first document and of the last (a generated one, high ids).
    batch = torch.tensor(np.stack([ds[0][:SEQ], ds[len(ds) - 1][:SEQ]]).astype(np.int64))
    assert int(batch.max()) >= 1 << 16
    with torch.no_grad():
        a, b = ours.eval()(batch), theirs.eval()(batch).logits
    assert a.shape == b.shape == (2, SEQ, VOCAB)
    diff = (a - b).abs().max().item()
    print(f"large vocab: max |logit difference| {diff:.3g}")
    assert diff <= 1e-5


def test_auto_tokenizer_gives_our_ids_on_every_document(run128k):
    theirs = transformers.AutoTokenizer.from_pretrained(run128k["base"] / "hf", local_files_only=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (1, 2, 3, 0)
    assert len(theirs) == VOCAB
    texts = run128k["texts"]
    ds = IndexedDataset(run128k["prefix"])
    ids = theirs(texts)["input_ids"]  # as a user calls it: special tokens are not added
    different = [i for i in range(len(texts)) if ids[i] + [2] != ds[i].tolist()]
    print(f"large vocab: AutoTokenizer ids equal ours on {len(texts) - len(different)} of {len(texts)} documents")
    assert not different, different[:10]
    # Documents that spell special tokens are among them, encoded as text.
    spelled = [i for i, text in enumerate(texts) if "</s>" in text]
    assert len(spelled) > 10 and all(not set(ds[i][:-1].tolist()) & {0, 1, 2, 3, 4} for i in spelled)
    assert theirs.decode(ids[-1]) == texts[-1]


def test_fused_loss_at_128k_keeps_one_tokens_by_vocab_buffer(run128k):
    """The output layer's fused loss at 128k rows: equal to the plain cross-entropy of the logits
    (loss and gradients), with one [tokens, vocab] fp32 buffer as its only vocabulary-sized
    activation, nothing [vocab, vocab]."""
    model, _ = load_model(run128k["base"] / "ckpt")
    ds = IndexedDataset(run128k["prefix"])
    rows = np.stack([ds[i][: SEQ + 1] for i in (0, len(ds) - 1)]).astype(np.int64)
    tokens, labels = torch.tensor(rows[:, :-1]), torch.tensor(rows[:, 1:])

    model.train()
    fused = model(tokens, labels)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffer = model.loss_scratch._tensor
    assert buffer is not None and buffer.numel() == tokens.numel() * VOCAB and buffer.dtype == torch.float32

    model.zero_grad()
    plain = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
    plain.backward()
    assert abs(fused.item() - plain.item()) < 1e-5
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_model_vocab_size_must_hold_the_tokenizer(run128k):
    base = run128k["base"]
    overrides = train_overrides(base / "small", run128k["prefix"], run128k["tokenizer"], 65_536)
    with pytest.raises(ConfigError, match=f"set model.vocab_size={VOCAB}"):
        check_data(load_config("configs/llama_tiny.yaml", overrides))


# -- the trainer's other paths, on a small corpus ---------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "corpus.jsonl"
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(20):
            f.write(json.dumps({"text": generated_document(rng, functions=10)}) + "\n")
    return path


def train_bpe(corpus, out, *args):
    return run_tool("tools/train_tokenizer.py", "--kind", "byte-level-bpe", "--input", corpus, "--output", out, *args)


def test_byte_level_bpe_is_deterministic(small_corpus, tmp_path):
    outputs = []
    for name, threads in (("a", "1"), ("b", "2")):
        result = train_bpe(small_corpus, tmp_path / name, "--vocab-size", "600", "--threads", threads)
        assert result.returncode == 0, result.stderr
        outputs.append([(tmp_path / name / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json")])
    assert outputs[0] == outputs[1]
    tok = load_tokenizer(str(tmp_path / "a" / "tokenizer.json"))
    text = "def f(x):\n    return x + 12345  # é 中 😀 </s>\n"
    assert tok.decode(tok.encode(text)) == text and tok.eod not in tok.encode(text)


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--vocab-size", "1000000"], 1, "the corpus yields only"),
        (["--vocab-size", "600", "--seed", "3"], 2, "--seed is a sentencepiece option"),
        (["--vocab-size", "100"], 2, "--vocab-size must be at least 261"),
    ],
)
def test_byte_level_bpe_errors(small_corpus, tmp_path, extra, code, message):
    out = tmp_path / "tok"
    result = train_bpe(small_corpus, out, *extra)
    assert result.returncode == code and message in result.stderr, result.stderr
    assert not out.exists()  # nothing written


def test_hf_tokenizer_never_truncates_or_pads_a_document(tmp_path, small_corpus):
    result = train_bpe(small_corpus, tmp_path, "--vocab-size", "400")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 3,
        "pad_type_id": 0,
        "pad_token": "<pad>",
    }
    path.write_text(json.dumps(spec))
    tok = load_tokenizer(str(path))
    text = "def f(x):\n    return x\n"
    assert tok.decode(tok.encode(text)) == text and tok.pad not in tok.encode(text)
