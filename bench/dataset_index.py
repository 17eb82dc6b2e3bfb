"""GPT sample indices and random sample reads: ours against megatron-core's GPTDataset.

    python bench/dataset_index.py [--tokens 200000000] [--documents 1000000] [--seq-length 2048]

Writes a synthetic dataset (random uint16 tokens, document lengths drawn from a log-normal
distribution and scaled to the exact token count) once under --workdir, then on the same
files, side by side:

- cold: building the document, sample and shuffle indices of the train split (one epoch, or
  --num-samples) and writing them to an empty cache; megatron-core does this with its
  compiled C++ helper, we with numpy (no compile step);
- cached: opening the same indices from the cache (best of several);
- reads: random samples per second, ours through `get_batch` on batches of --batch indices,
  megatron-core through `GPTDataset.__getitem__` (attention masks off, the cheap setting) and
  through its bare token query without the dict/torch wrapping; the faster of the two counts.

Opening the `.bin/.idx` pair is timed separately (ours validates the whole index on open).
Ends with `RESULT dataset_index ... ratio=<min of the cold, cached and read ratios>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter


def make_dataset(prefix: str, *, tokens: int, documents: int, seed: int) -> None:
    marker = prefix + ".json"
    spec = {"tokens": tokens, "documents": documents, "seed": seed}
    if os.path.exists(marker) and os.path.exists(prefix + ".idx"):
        with open(marker) as f:
            if json.load(f) == spec:
                return
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=documents)
    lengths = np.maximum(1, np.floor(raw / raw.sum() * tokens)).astype(np.int64)
    lengths[-1] += tokens - lengths.sum()  # exact total
    assert lengths[-1] > 0 and lengths.sum() == tokens
    t0 = time.perf_counter()
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        step = 50_000
        for i in range(0, documents, step):
            chunk = lengths[i : i + step]
            writer.add_documents(rng.integers(0, 50_000, size=int(chunk.sum()), dtype=np.uint16), chunk)
    with open(marker, "w") as f:
        json.dump(spec, f)
    print(f"wrote {prefix}.bin/.idx ({tokens} tokens, {documents} documents) in {time.perf_counter() - t0:.1f}s")


class _Tokenizer:
    """What megatron-core's GPTDatasetConfig wants from a tokenizer."""

    vocab_size = 50_000
    eod = 0
    pad = 1
    unique_identifiers = {"class": "BenchTokenizer"}


def megatron_dataset(indexed, prefix: str, *, seq_length: int, seed: int, num_samples, cache: str):
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="100,0,0",
        tokenizer=_Tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache,
    )
    documents = np.arange(len(indexed), dtype=np.int32)
    return MegatronGPTDataset(indexed, prefix, documents, num_samples, Split.train, config)


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000_000)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--num-samples", type=int, default=None, help="samples to build (default: one epoch)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--reads", type=int, default=20_000, help="random samples read per framework")
    parser.add_argument("--batch", type=int, default=32, help="samples per get_batch call (ours)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "pretrain-bench-dataset-index"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron-core's optional-dependency warnings
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    os.makedirs(args.workdir, exist_ok=True)
    prefix = os.path.join(args.workdir, "synthetic")
    make_dataset(prefix, tokens=args.tokens, documents=args.documents, seed=0)
    ours_cache, their_cache = os.path.join(args.workdir, "ours"), os.path.join(args.workdir, "megatron")

    # Opening the pair (page cache warm for both: the files were just written or read).
    open_ours, ours_indexed = timed(lambda: IndexedDataset(prefix), repeat=5)
    open_theirs, their_indexed = timed(lambda: MegatronIndexed(prefix, multimodal=False, mmap=True), repeat=5)

    def ours():
        return GPTDataset(
            ours_indexed,
            seq_length=args.seq_length,
            seed=args.seed,
            split="train",
            split_ratios=(1, 0, 0),
            num_samples=args.num_samples,
            cache_dir=ours_cache,
        )

    def theirs():
        return megatron_dataset(
            their_indexed,
            prefix,
            seq_length=args.seq_length,
            seed=args.seed,
            num_samples=args.num_samples,
            cache=their_cache,
        )

    cold, cold_theirs = [], []
    for _ in range(3):  # alternate, best of three, each from an empty cache
        for path in (ours_cache, their_cache):
            shutil.rmtree(path, ignore_errors=True)
        t, ds = timed(ours)
        cold.append(t)
        t, mds = timed(theirs)
        cold_theirs.append(t)
    cold_ours, cold_mega = min(cold), min(cold_theirs)
    cached_ours, ds = timed(ours, repeat=7)
    cached_mega, mds = timed(theirs, repeat=7)
    assert len(ds) == len(mds)
    probe = np.random.default_rng(1).integers(0, len(ds), size=8)
    for k in probe:  # same samples, or the comparison means nothing
        item = mds[int(k)]
        expected = np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]])
        assert np.array_equal(ds[int(k)], expected), "ours and megatron-core disagree"

    rng = np.random.default_rng(2)
    picks = rng.integers(0, len(ds), size=args.reads)
    for k in picks[:2000]:  # touch pages so neither side pays first-read faults alone
        ds[int(k)]

    def read_ours():
        for i in range(0, len(picks), args.batch):
            ds.get_batch(picks[i : i + args.batch])

    def read_theirs_getitem():
        for k in picks:
            mds[int(k)]

    def read_theirs_query():
        for k in picks:
            mds._query_document_sample_shuffle_indices(int(k))

    t_ours, _ = timed(read_ours, repeat=3)
    t_getitem, _ = timed(read_theirs_getitem, repeat=2)
    t_query, _ = timed(read_theirs_query, repeat=2)
    rate_ours = len(picks) / t_ours
    rate_getitem, rate_query = len(picks) / t_getitem, len(picks) / t_query
    rate_mega = max(rate_getitem, rate_query)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )
    print(
        f"data: {args.tokens} tokens, {args.documents} documents, seq_length {args.seq_length}, "
        f"{len(ds)} samples ({len(ds.document_index) // args.documents} epoch(s))"
    )
    print(f"open .bin/.idx:  ours {open_ours * 1e3:7.2f} ms (validates)   megatron {open_theirs * 1e3:7.2f} ms")
    print(f"indices, cold:   ours {cold_ours:7.3f} s     megatron {cold_mega:7.3f} s")
    print(f"indices, cached: ours {cached_ours * 1e3:7.2f} ms    megatron {cached_mega * 1e3:7.2f} ms")
    print(
        f"random reads:    ours {rate_ours:9.0f} samples/s (batches of {args.batch})   megatron "
        f"{rate_getitem:9.0f}/s __getitem__, {rate_query:9.0f}/s bare query"
    )
    ratios = {"cold": cold_mega / cold_ours, "cached": cached_mega / cached_ours, "reads": rate_ours / rate_mega}
    print(
        f"RESULT dataset_index cold_s={cold_ours:.4f} megatron_cold_s={cold_mega:.4f} "
        f"cached_s={cached_ours:.5f} megatron_cached_s={cached_mega:.5f} "
        f"samples_per_s={rate_ours:.0f} megatron_samples_per_s={rate_mega:.0f} "
        f"cold_ratio={ratios['cold']:.2f} cached_ratio={ratios['cached']:.2f} read_ratio={ratios['reads']:.2f} "
        f"ratio={min(ratios.values()):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
