"""Preprocessing throughput: ours against a Megatron-style pipeline and the bare tokenizer.

    python bench/preprocess.py [--workers N] [--repeat 3] [--max-bytes N]

Same corpus, same sentencepiece tokenizer (BPE, 8000 pieces, trained once), same number of
workers, run side by side, each in its own fresh process, on two corpora built once under
--workdir from the Python standard library: its source files as documents (1.8k documents of
18 KB on average, the quickstart's corpus), and the same text cut into documents of about
1 KB on line boundaries (30k documents, closer to web text, where per-document costs show).

- ours: `tools/preprocess_data.py --append-eod --workers N`, timed as the whole command
  (interpreter start, imports, tokenizer load, reading, tokenizing, writing: startup included);
- Megatron-style: written the way Megatron-LM's `tools/preprocess_data.py` works: a
  `multiprocessing.Pool(N)` whose workers `json.loads` each line and tokenize it, fed by
  `pool.imap(encode, file, 32)`, and megatron-core's `IndexedDatasetBuilder` writing in the main
  process. Timed as the whole command too (importing megatron-core is part of its startup, as
  in Megatron's tool); its time after imports is printed as well;
- bare tokenizer: the same tokenizer encoding the whole corpus, already in memory, in one
  `encode(texts, num_threads=N)` call, and nothing else: the ceiling.

Ours and Megatron-style must write byte-identical .bin/.idx files (checked). Best of --repeat
runs each, interleaved. Ends with `RESULT preprocess ...`: MB/s of text on the file corpus,
`of_bare` = ours / bare tokenizer and `ratio` = ours / Megatron-style (whole commands), each
the lower of the two corpora.
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
    import torch  # noqa: F401 - megatron-core's builder takes tensors
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


def child(*args: str) -> tuple[float, dict]:
    """(wall seconds of the whole child process, what it printed last as JSON)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, json.loads(out.stdout.strip().splitlines()[-1])


def small_documents(corpus: str, out: str, size: int) -> None:
    """The same text, cut into documents of about `size` bytes on line boundaries."""
    with open(corpus, encoding="utf-8") as fin, open(out + ".tmp", "w", encoding="utf-8") as fout:
        for line in fin:
            piece: list[str] = []
            length = 0
            for text_line in json.loads(line)["text"].splitlines(keepends=True):
                piece.append(text_line)
                length += len(text_line)
                if length >= size:
                    if "".join(piece).strip():
                        fout.write(json.dumps({"text": "".join(piece)}) + "\n")
                    piece, length = [], 0
            if "".join(piece).strip():
                fout.write(json.dumps({"text": "".join(piece)}) + "\n")
    os.replace(out + ".tmp", out)


def prepare(workdir: str, max_bytes: int | None) -> tuple[list[str], str]:
    corpus, tokenizer = os.path.join(workdir, "corpus.jsonl"), os.path.join(workdir, "tokenizer.model")
    small = os.path.join(workdir, "corpus_1kb_docs.jsonl")
    if not os.path.exists(corpus):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_stdlib_corpus.py"), "--output", corpus]
        subprocess.run(cmd + (["--max-bytes", str(max_bytes)] if max_bytes else []), check=True)
    if not os.path.exists(small):
        small_documents(corpus, small, 1000)
    if not os.path.exists(tokenizer):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "train_tokenizer.py"),
                "--input",
                corpus,
                "--output",
                tokenizer[: -len(".model")],
                "--vocab-size",
                "8000",
            ],
            check=True,
        )
    return [corpus, small], tokenizer


def measure(corpus: str, tokenizer: str, workers: int, repeat: int, workdir: str) -> dict:
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    common = ["--corpus", corpus, "--tokenizer", tokenizer, "--workers", str(workers)]
    ours_prefix = os.path.join(workdir, "ours")
    theirs_prefix = os.path.join(workdir, "megatron_text_document")
    times: dict[str, list[float]] = {"ours": [], "megatron": [], "megatron_after_imports": [], "bare": []}
    for _ in range(repeat):  # interleaved, so that a busy moment hurts all alike
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "preprocess_data.py"),
                "--input",
                corpus,
                "--output-prefix",
                ours_prefix,
                "--tokenizer",
                tokenizer,
                "--json-keys",
                "text",
                "--append-eod",
                "--workers",
                str(workers),
            ],
            check=True,
            capture_output=True,
        )
        times["ours"].append(time.perf_counter() - t0)
        whole, inner = child("--run", "megatron", "--prefix", theirs_prefix, *common)
        times["megatron"].append(whole)
        times["megatron_after_imports"].append(inner["seconds"])
        times["bare"].append(child("--run", "bare", *common)[1]["seconds"])
    for ext in (".bin", ".idx"):
        with open(ours_prefix + "_text_document" + ext, "rb") as a, open(theirs_prefix + ext, "rb") as b:
            assert a.read() == b.read(), f"ours and the Megatron-style pipeline wrote different {ext} files"
    best = {k: min(v) for k, v in times.items()}
    return {"docs": len(texts), "mb": mb, "times": times, "best": best, "rate": {k: mb / t for k, t in best.items()}}


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
    corpora, tokenizer = prepare(args.workdir, args.max_bytes)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}; "
        f"tokenizer: sentencepiece BPE 8000; workers: {args.workers}"
    )
    results = []
    for corpus in corpora:
        r = measure(corpus, tokenizer, args.workers, args.repeat, args.workdir)
        results.append(r)
        print(
            f"\n{os.path.basename(corpus)}: {r['docs']} documents, {r['mb']:.1f} MB of text "
            f"(load average now {os.getloadavg()[0]:.2f})"
        )
        for name, label in (
            ("ours", "ours (whole command)"),
            ("megatron", "Megatron-style (whole command)"),
            ("megatron_after_imports", "Megatron-style (after imports)"),
            ("bare", "bare tokenizer (encode only)"),
        ):
            runs = ", ".join(f"{t:.2f}" for t in r["times"][name])
            print(f"  {label:32s} best {r['best'][name]:6.2f} s  {r['rate'][name]:6.2f} MB/s   runs: {runs}")
        print(
            f"  ours / bare {r['rate']['ours'] / r['rate']['bare']:.2f}, ours / Megatron-style "
            f"{r['rate']['ours'] / r['rate']['megatron']:.2f} (whole commands), "
            f"{r['rate']['ours'] / r['rate']['megatron_after_imports']:.2f} (its imports excluded)"
        )
    files, small = results
    of_bare = min(r["rate"]["ours"] / r["rate"]["bare"] for r in results)
    ratio = min(r["rate"]["ours"] / r["rate"]["megatron"] for r in results)
    print(
        f"RESULT preprocess mb_per_s={files['rate']['ours']:.2f} megatron_mb_per_s={files['rate']['megatron']:.2f} "
        f"bare_mb_per_s={files['rate']['bare']:.2f} small_docs_mb_per_s={small['rate']['ours']:.2f} "
        f"small_docs_megatron_mb_per_s={small['rate']['megatron']:.2f} of_bare={of_bare:.2f} ratio={ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
