"""One entry point from `data.path` to the train / valid / test datasets of a run.

    datasets = build_datasets("0.7 data/web_text_document 0.3 data/code_text_document",
                              seq_length=2048, seed=1234, split_ratios=(98, 2, 0),
                              num_samples={"train": steps * global_batch,
                                           "valid": evals * eval_iters * global_batch})

Each value is a dataset with `__len__`, `__getitem__(k) -> int64 [seq_length + 1]` and
`get_batch(indices) -> int64 [b, seq_length + 1]`, or None. A single prefix gives a
`GPTDataset` (megatron-core's samples, same order); several give a `BlendedDataset` whose
components are the datasets megatron-core would build for them.

Many ranks: indices are built once and cached beside the data (or in `cache_dir`). Pass
`is_builder=(global rank == 0)` and `barrier=torch.distributed.barrier`: the builder builds and
caches every index, then all ranks meet at the barrier once, then the others memory-map the
cached files. Without a barrier, non-builders poll for the cache files (up to
`wait_seconds`). torch.distributed is never touched here. Single process: the defaults.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from pretrain.data.blend import BlendedDataset, blend_cache_dir, component_sizes, parse_data_path
from pretrain.data.cache import DEFAULT_WAIT_SECONDS
from pretrain.data.gpt_dataset import SPLITS, GPTDataset, split_bounds
from pretrain.data.indexed import IndexedDataset

_AFTER_BARRIER_WAIT_SECONDS = 120.0


def build_datasets(
    path: str,
    *,
    seq_length: int,
    seed: int,
    split_ratios: Sequence[float],
    num_samples: Mapping[str, int | None],
    cache_dir: str | None = None,
    is_builder: bool = True,
    barrier: Callable[[], None] | None = None,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
) -> dict[str, GPTDataset | BlendedDataset | None]:
    """Datasets for "train", "valid" and "test" (see the module doc).

    `num_samples[split]`: how many samples the run draws from that split (it decides the
    number of epochs, as in megatron). A split gets None when its ratio is 0, or when its
    count is 0 or missing; an explicit None count builds one epoch.
    """
    blend = parse_data_path(path)
    _check_num_samples(num_samples)
    settings = _Settings(seq_length, seed, cache_dir, create=is_builder, wait_seconds=wait_seconds)
    if is_builder:
        try:
            datasets = _build_splits(blend, split_ratios, num_samples, settings)
        finally:
            # Even on failure, so that the other ranks are not left waiting at the barrier:
            # they then find no cache and fail soon after, instead of hanging.
            if barrier is not None:
                barrier()
        return datasets
    if barrier is not None:
        barrier()
        # After the barrier the files exist, unless the builder failed; allow only for a
        # network filesystem's delay in showing them.
        settings = replace(settings, wait_seconds=min(wait_seconds, _AFTER_BARRIER_WAIT_SECONDS))
    return _build_splits(blend, split_ratios, num_samples, settings)


def _check_num_samples(num_samples: Mapping[str, int | None]) -> None:
    unknown = set(num_samples) - set(SPLITS)
    if unknown:
        raise ValueError(f"num_samples has unknown splits {sorted(unknown)}; use {SPLITS}")
    for split, n in num_samples.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise ValueError(f"num_samples[{split!r}] must be a non-negative int or None, got {n!r}")


@dataclass(frozen=True)
class _Settings:
    """What every dataset of one `build_datasets` call is built with."""

    seq_length: int
    seed: int
    cache_dir: str | None
    create: bool  # build missing indices (the builder) or wait for them (the other ranks)
    wait_seconds: float


def _build_splits(
    blend: list[tuple[float, str]],
    split_ratios: Sequence[float],
    num_samples: Mapping[str, int | None],
    settings: _Settings,
) -> dict[str, GPTDataset | BlendedDataset | None]:
    indexed = [IndexedDataset(prefix) for _, prefix in blend]
    bounds = [split_bounds(len(ds), split_ratios) for ds in indexed]
    out: dict[str, GPTDataset | BlendedDataset | None] = {}
    for s, split in enumerate(SPLITS):
        wanted = num_samples.get(split, 0)
        ranges = [b[s] for b in bounds]
        if wanted == 0 or any(r is None for r in ranges):
            out[split] = None
        else:
            out[split] = _build_split(blend, indexed, ranges, split, wanted, settings)
    return out


def _build_split(
    blend: list[tuple[float, str]],
    indexed: list[IndexedDataset],
    ranges: list[tuple[int, int] | None],
    split: str,
    wanted: int | None,
    settings: _Settings,
) -> GPTDataset | BlendedDataset:
    """One split: the single prefix's GPTDataset, or a blend of one GPTDataset per prefix."""

    def gpt(i: int, n: int | None) -> GPTDataset:
        return GPTDataset(
            indexed[i],
            seq_length=settings.seq_length,
            split=split,
            seed=settings.seed,
            num_samples=n,
            document_range=ranges[i],
            cache_dir=settings.cache_dir,
            create=settings.create,
            wait_seconds=settings.wait_seconds,
        )

    if len(blend) == 1:
        return gpt(0, None if wanted is None else int(wanted))
    if wanted is None:
        raise ValueError(f"a blend needs a sample count for the {split} split, not None")
    drawn, built = component_sizes([w for w, _ in blend], int(wanted))
    return BlendedDataset(
        [gpt(i, n) for i, n in enumerate(built)],
        drawn,
        name=f"blend-{split}",
        cache_dir=settings.cache_dir if settings.cache_dir is not None else blend_cache_dir([p for _, p in blend]),
        create=settings.create,
        wait_seconds=settings.wait_seconds,
    )
