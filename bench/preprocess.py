"""Preprocessing throughput: ours against a Megatron-style pipeline and the bare tokenizer.

    python bench/preprocess.py [--workers N] [--repeat 3] [--max-bytes N]

Same corpus (the Python standard library as JSONL, built once under --workdir), same
sentencepiece tokenizer (BPE, 8000 pieces, trained once), same number of workers, run side
by side, each in its own fresh process:

- ours: `tools/preprocess_data.py --append-eod --workers N`, timed as the whole command
  (interpreter start, imports, tokenizer load, reading, tokenizing, writing: startup included);
- Megatron-style: written the way Megatron-LM's `tools/preprocess_data.py` works: a
  `multiprocessing.Pool(N)` whose workers `json.loads` each line and tokenize it, fed by
  `pool.imap(encode, file, 32)`, and megatron-core's `IndexedDatasetBuilder` writing in the main
  process. Timed from after its imports (importing megatron-core alone takes seconds here),
  which flatters it;
- bare tokenizer: the same tokenizer encoding the whole corpus, already in memory, in one
  `encode(texts, num_threads=N)` call, and nothing else: the ceiling.

Ours and Megatron-style must write byte-identical .bin/.idx files (checked). Best of --repeat
runs each. Ends with
`RESULT preprocess mb_per_s=... megatron_mb_per_s=... bare_mb_per_s=... of_bare=<ours/bare> ratio=<ours/megatron>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the two reference pipelines, run in child processes ------------------------------------------


def run_bare(corpus: str, tokenizer: str, workers: int) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    ids = sp.encode(texts, num_threads=workers)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "tokens": sum(map(len, ids))}))


class _MegatronStyleEncoder:
    """Megatron-LM's Encoder: the tokenizer is built once per worker by the pool initializer."""

    def __init__(self, tokenizer: str) -> None:
        self.tokenizer_path = tokenizer

    def initializer(self) -> None:
        import sentencepiece as spm

        _MegatronStyleEncoder.sp = spm.SentencePieceProcessor(model_file=self.tokenizer_path)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids = _MegatronStyleEncoder.sp.encode(data["text"])
        if len(ids) > 0:
            ids.append(_MegatronStyleEncoder.sp.eos_id())
        return ids, [len(ids)], len(json_line)


def run_megatron_style(corpus: str, tokenizer: str, workers: int, prefix: str) -> None:
    import multiprocessing

    import numpy as np
    import torch  # noqa: F401 - megatron-core's builder takes tensors; import before timing
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    encoder = _MegatronStyleEncoder(tokenizer)
    encoder.initializer()
    vocab = _MegatronStyleEncoder.sp.vocab_size()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16 if vocab < 65500 else np.int32)
    with open(corpus, encoding="utf-8") as fin, multiprocessing.Pool(workers, initializer=encoder.initializer) as pool:
        for ids, lengths, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(ids, lengths)
    builder.finalize(prefix + ".idx")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


# -- the driver -----------------------------------------------------------------------------------


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(workdir: str, max_bytes: int | None) -> tuple[str, str, int]:
    corpus, tokenizer = os.path.join(workdir, "corpus.jsonl"), os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(corpus):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_stdlib_corpus.py"), "--output", corpus]
        subprocess.run(cmd + (["--max-bytes", str(max_bytes)] if max_bytes else []), check=True)
    if not os.path.exists(tokenizer):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus,
                        "--output", tokenizer[: -len(".model")], "--vocab-size", "8000"], check=True)
    with open(corpus, encoding="utf-8") as f:
        text_bytes = sum(len(json.loads(line)["text"].encode()) for line in f)
    return corpus, tokenizer, text_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=None, help="corpus size cap (default: whole stdlib)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "pretrain-bench-preprocess"))
    parser.add_argument("--run", choices=["bare", "megatron"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run == "bare":
        run_bare(args.corpus, args.tokenizer, args.workers)
        return 0
    if args.run == "megatron":
        run_megatron_style(args.corpus, args.tokenizer, args.workers, args.prefix)
        return 0

    os.makedirs(args.workdir, exist_ok=True)
    corpus, tokenizer, text_bytes = prepare(args.workdir, args.max_bytes)
    common = ["--corpus", corpus, "--tokenizer", tokenizer, "--workers", str(args.workers)]
    ours_prefix = os.path.join(args.workdir, "ours")
    theirs_prefix = os.path.join(args.workdir, "megatron_text_document")
    times: dict[str, list[float]] = {"ours": [], "megatron": [], "bare": []}
    for _ in range(args.repeat):  # interleaved, so that a busy moment hurts all three alike
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
                        "--output-prefix", ours_prefix, "--tokenizer", tokenizer, "--json-keys", "text",
                        "--append-eod", "--workers", str(args.workers)], check=True, capture_output=True)
        times["ours"].append(time.perf_counter() - t0)
        times["megatron"].append(child("--run", "megatron", "--prefix", theirs_prefix, *common)["seconds"])
        times["bare"].append(child("--run", "bare", *common)["seconds"])
    for ext in (".bin", ".idx"):
        with open(ours_prefix + "_text_document" + ext, "rb") as a, open(theirs_prefix + ext, "rb") as b:
            assert a.read() == b.read(), f"ours and the Megatron-style pipeline wrote different {ext} files"

    mb = text_bytes / 1e6
    best = {k: min(v) for k, v in times.items()}
    rate = {k: mb / t for k, t in best.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}, "
          f"Python {platform.python_version()}")
    print(f"corpus: {mb:.1f} MB of text, {corpus}; tokenizer: sentencepiece BPE 8000; workers: {args.workers}")
    for name, label in (("ours", "ours (whole command)"), ("megatron", "Megatron-style (after imports)"),
                        ("bare", "bare tokenizer (encode only)")):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{label:32s} best {best[name]:6.2f} s  {rate[name]:6.2f} MB/s   runs: {runs}")
    print(f"RESULT preprocess mb_per_s={rate['ours']:.2f} megatron_mb_per_s={rate['megatron']:.2f} "
          f"bare_mb_per_s={rate['bare']:.2f} of_bare={rate['ours'] / rate['bare']:.2f} "
          f"ratio={rate['ours'] / rate['megatron']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
