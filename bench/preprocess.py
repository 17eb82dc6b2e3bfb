"""Preprocessing throughput: ours against a Megatron-style pipeline and the bare tokenizer.

    python bench/preprocess.py [--workers N] [--repeat 3] [--max-bytes N]

Same corpus, same sentencepiece tokenizer (BPE, 8000 pieces, trained once), same number of
workers, run side by side, each in its own fresh process, on two corpora built once under
--workdir from the Python standard library: its source files as documents, test suites kept
(`--keep-tests`; 1.7k documents of 18 KB on average, the quickstart's corpus before it left
the tests out), and the same text cut into documents of about
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

Parquet: the same corpora as Parquet files (pyarrow, one row group per 1000 rows), through the
same command (`--input corpus.parquet`), side by side with the JSONL run and the bare
tokenizer, with the sentencepiece model and with a byte-level BPE `tokenizer.json` (8000
pieces, trained once with the `tokenizers` library; its bare run is `encode_batch` on
RAYON_NUM_THREADS=N threads). Its output must equal the JSONL run's byte for byte (checked).
Ends with `RESULT preprocess_parquet sp_of_bare=... bpe_of_bare=...` (the lower of the corpora).

    python bench/preprocess.py --huge-document 200 [--workers N]

instead measures memory: one document of that many MB (the stdlib corpus repeated, as one JSONL
line and as one Parquet row) through the whole command, sampling the proportional set size (PSS)
of the command's process tree; ends with `RESULT preprocess_huge_document ...` giving the peak
over the document's size.
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


def run_bare_hf(corpus: str, tokenizer: str, workers: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # read when the thread pool starts
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    tok.encode_special_tokens = True  # as tools/preprocess_data.py encodes documents
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    ids = tok.encode_batch(texts, add_special_tokens=False)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "tokens": sum(len(e.ids) for e in ids)}))


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


def to_parquet(corpus: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = corpus[: -len(".jsonl")] + ".parquet"
    if not os.path.exists(out):
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        pq.write_table(pa.table({"text": texts}), out + ".tmp", row_group_size=1000)
        os.replace(out + ".tmp", out)
    return out


def train_bpe(corpus: str, out: str) -> None:
    """A byte-level BPE tokenizer.json of 8000 pieces, as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(out)


def prepare(workdir: str, max_bytes: int | None) -> tuple[list[str], str, str]:
    corpus, tokenizer = os.path.join(workdir, "corpus.jsonl"), os.path.join(workdir, "tokenizer.model")
    small = os.path.join(workdir, "corpus_1kb_docs.jsonl")
    bpe = os.path.join(workdir, "bpe", "tokenizer.json")
    if not os.path.exists(corpus):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_stdlib_corpus.py"), "--output", corpus, "--keep-tests"]
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
    if not os.path.exists(bpe):
        os.makedirs(os.path.dirname(bpe), exist_ok=True)
        train_bpe(corpus, bpe)
    return [corpus, small], tokenizer, bpe


def ours(inputs: str, tokenizer: str, workers: int, prefix: str) -> float:
    """Seconds of the whole `tools/preprocess_data.py` command."""
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "preprocess_data.py"),
            "--input",
            inputs,
            "--output-prefix",
            prefix,
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
    return time.perf_counter() - t0


def same_files(a: str, b: str, what: str) -> None:
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as x, open(b + ext, "rb") as y:
            assert x.read() == y.read(), f"{what} wrote different {ext} files"


def text_mb(corpus: str) -> tuple[int, float]:
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return len(texts), sum(len(t.encode()) for t in texts) / 1e6


def measure(corpus: str, tokenizer: str, workers: int, repeat: int, workdir: str) -> dict:
    docs, mb = text_mb(corpus)
    parquet = to_parquet(corpus)
    common = ["--corpus", corpus, "--tokenizer", tokenizer, "--workers", str(workers)]
    ours_prefix = os.path.join(workdir, "ours")
    theirs_prefix = os.path.join(workdir, "megatron_text_document")
    names = ("ours", "parquet", "megatron", "megatron_after_imports", "bare")
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(repeat):  # interleaved, so that a busy moment hurts all alike
        times["ours"].append(ours(corpus, tokenizer, workers, ours_prefix))
        times["parquet"].append(ours(parquet, tokenizer, workers, ours_prefix + "_pq"))
        whole, inner = child("--run", "megatron", "--prefix", theirs_prefix, *common)
        times["megatron"].append(whole)
        times["megatron_after_imports"].append(inner["seconds"])
        times["bare"].append(child("--run", "bare", *common)[1]["seconds"])
    same_files(ours_prefix + "_text_document", theirs_prefix, "ours and the Megatron-style pipeline")
    same_files(ours_prefix + "_text_document", ours_prefix + "_pq_text_document", "the JSONL and Parquet runs")
    best = {k: min(v) for k, v in times.items()}
    return {"docs": docs, "mb": mb, "times": times, "best": best, "rate": {k: mb / t for k, t in best.items()}}


def measure_bpe(corpus: str, tokenizer: str, workers: int, repeat: int, workdir: str) -> dict:
    """The same side by side with a byte-level BPE tokenizer.json (no Megatron-style run)."""
    docs, mb = text_mb(corpus)
    parquet = to_parquet(corpus)
    prefix = os.path.join(workdir, "ours_bpe")
    times: dict[str, list[float]] = {"ours": [], "parquet": [], "bare": []}
    for _ in range(repeat):
        times["ours"].append(ours(corpus, tokenizer, workers, prefix))
        times["parquet"].append(ours(parquet, tokenizer, workers, prefix + "_pq"))
        args = ["--run", "bare_hf", "--corpus", corpus, "--tokenizer", tokenizer, "--workers", str(workers)]
        times["bare"].append(child(*args)[1]["seconds"])
    same_files(prefix + "_text_document", prefix + "_pq_text_document", "the JSONL and Parquet runs (BPE)")
    best = {k: min(v) for k, v in times.items()}
    return {"docs": docs, "mb": mb, "times": times, "best": best, "rate": {k: mb / t for k, t in best.items()}}


def print_rows(r: dict, rows: tuple[tuple[str, str], ...]) -> None:
    for name, label in rows:
        runs = ", ".join(f"{t:.2f}" for t in r["times"][name])
        print(f"  {label:32s} best {r['best'][name]:6.2f} s  {r['rate'][name]:6.2f} MB/s   runs: {runs}")


# -- one huge document ----------------------------------------------------------------------------


def huge_inputs(workdir: str, corpus: str, mb: int) -> tuple[str, str, int]:
    """One document of `mb` MB (the corpus's texts repeated) as a JSONL line and a Parquet row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(corpus, encoding="utf-8") as f:
        text = "\n".join(json.loads(line)["text"] for line in f)
    target = mb * 1_000_000
    data = text.encode()
    doc = (data * (target // len(data) + 1))[:target].decode("utf-8", errors="ignore")
    del data, text
    jsonl, parquet = os.path.join(workdir, f"huge_{mb}mb.jsonl"), os.path.join(workdir, f"huge_{mb}mb.parquet")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": [doc]}), parquet)
    return jsonl, parquet, len(doc.encode())


def _tree_pss(root: int) -> int:
    """Bytes of proportional set size of `root` and its descendants (shared pages split fairly)."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def peak_memory(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak PSS of the process tree) of a command, sampled every 20 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_pss(proc.pid))
        time.sleep(0.02)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, peak


def huge_document(workdir: str, corpus: str, tokenizer: str, mb: int, workers: int) -> int:
    jsonl, parquet, size = huge_inputs(workdir, corpus, mb)
    widest = max(map(ord, open(jsonl, encoding="utf-8").read(2_000_000)))
    print(f"one document of {size / 1e6:.1f} MB (characters up to U+{widest:04X}), workers {workers}")
    results = {}
    for name, path in (("jsonl", jsonl), ("parquet", parquet)):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path]
        cmd += ["--output-prefix", os.path.join(workdir, "huge"), "--tokenizer", tokenizer, "--append-eod"]
        seconds, peak = peak_memory(cmd + ["--workers", str(workers)])
        results[name] = (seconds, peak)
        print(
            f"  {name:8s} peak PSS {peak / 1e6:8.1f} MB = {peak / size:.2f}x the document; "
            f"{seconds:.1f} s, {size / 1e6 / seconds:.2f} MB/s"
        )
    ratio = max(peak for _, peak in results.values()) / size
    print(
        f"RESULT preprocess_huge_document mb={size / 1e6:.0f} jsonl_peak_mb={results['jsonl'][1] / 1e6:.0f} "
        f"parquet_peak_mb={results['parquet'][1] / 1e6:.0f} peak_over_input={ratio:.2f} "
        f"jsonl_mb_per_s={size / 1e6 / results['jsonl'][0]:.2f}"
    )
    return 0


def side_by_side(corpora: list[str], tokenizer: str, bpe: str, args: argparse.Namespace) -> tuple[list, list]:
    """Every corpus through every pipeline, printed as it goes."""
    results, bpe_results = [], []
    for corpus in corpora:
        r = measure(corpus, tokenizer, args.workers, args.repeat, args.workdir)
        results.append(r)
        print(
            f"\n{os.path.basename(corpus)}: {r['docs']} documents, {r['mb']:.1f} MB of text "
            f"(load average now {os.getloadavg()[0]:.2f})"
        )
        print_rows(
            r,
            (
                ("ours", "ours (whole command)"),
                ("parquet", "ours, Parquet (whole command)"),
                ("megatron", "Megatron-style (whole command)"),
                ("megatron_after_imports", "Megatron-style (after imports)"),
                ("bare", "bare tokenizer (encode only)"),
            ),
        )
        print(
            f"  ours / bare {r['rate']['ours'] / r['rate']['bare']:.2f}, Parquet / bare "
            f"{r['rate']['parquet'] / r['rate']['bare']:.2f}, ours / Megatron-style "
            f"{r['rate']['ours'] / r['rate']['megatron']:.2f} (whole commands), "
            f"{r['rate']['ours'] / r['rate']['megatron_after_imports']:.2f} (its imports excluded)"
        )
        b = measure_bpe(corpus, bpe, args.workers, args.repeat, args.workdir)
        bpe_results.append(b)
        print(f"  byte-level BPE (load average now {os.getloadavg()[0]:.2f}):")
        print_rows(
            b,
            (
                ("ours", "ours (whole command)"),
                ("parquet", "ours, Parquet (whole command)"),
                ("bare", "bare tokenizer (encode only)"),
            ),
        )
        print(
            f"  ours / bare {b['rate']['ours'] / b['rate']['bare']:.2f}, "
            f"Parquet / bare {b['rate']['parquet'] / b['rate']['bare']:.2f}"
        )
    return results, bpe_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=None, help="corpus size cap (default: whole stdlib)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "pretrain-bench-preprocess"))
    parser.add_argument("--huge-document", type=int, metavar="MB", help="measure peak memory on one document")
    parser.add_argument("--run", choices=["bare", "bare_hf", "megatron"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run == "bare":
        run_bare(args.corpus, args.tokenizer, args.workers)
        return 0
    if args.run == "bare_hf":
        run_bare_hf(args.corpus, args.tokenizer, args.workers)
        return 0
    if args.run == "megatron":
        run_megatron_style(args.corpus, args.tokenizer, args.workers, args.prefix)
        return 0

    os.makedirs(args.workdir, exist_ok=True)
    corpora, tokenizer, bpe = prepare(args.workdir, args.max_bytes)
    if args.huge_document:
        return huge_document(args.workdir, corpora[0], tokenizer, args.huge_document, args.workers)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}; "
        f"tokenizers: sentencepiece BPE 8000, byte-level BPE 8000 (tokenizers); workers: {args.workers}"
    )
    results, bpe_results = side_by_side(corpora, tokenizer, bpe, args)
    files, small = results
    of_bare = min(r["rate"]["ours"] / r["rate"]["bare"] for r in results)
    ratio = min(r["rate"]["ours"] / r["rate"]["megatron"] for r in results)
    print(
        f"RESULT preprocess mb_per_s={files['rate']['ours']:.2f} megatron_mb_per_s={files['rate']['megatron']:.2f} "
        f"bare_mb_per_s={files['rate']['bare']:.2f} small_docs_mb_per_s={small['rate']['ours']:.2f} "
        f"small_docs_megatron_mb_per_s={small['rate']['megatron']:.2f} of_bare={of_bare:.2f} ratio={ratio:.2f}"
    )
    sp_pq = min(r["rate"]["parquet"] / r["rate"]["bare"] for r in results)
    bpe_pq = min(r["rate"]["parquet"] / r["rate"]["bare"] for r in bpe_results)
    bpe_jsonl = min(r["rate"]["ours"] / r["rate"]["bare"] for r in bpe_results)
    print(
        f"RESULT preprocess_parquet sp_of_bare={sp_pq:.2f} bpe_of_bare={bpe_pq:.2f} "
        f"sp_parquet_mb_per_s={files['rate']['parquet']:.2f} "
        f"bpe_parquet_mb_per_s={bpe_results[0]['rate']['parquet']:.2f} "
        f"bpe_jsonl_of_bare={bpe_jsonl:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
