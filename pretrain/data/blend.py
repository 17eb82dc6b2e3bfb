"""Weighted blending of several datasets: `data.path = "w1 prefix1 w2 prefix2 ..."`.

Sizes follow megatron-core (`blended_megatron_dataset_builder.py`): for a split that must yield
N samples, dataset i with normalised weight w_i contributes t_i = ceil(N * w_i) samples, and
its own GPT dataset is built for ceil(t_i * 1.005) samples, so every component is exactly the
dataset megatron-core would build for it (same epochs, same order).

The interleaving is ours. megatron-core's `build_blending_indices` is a greedy loop (at each
step take the dataset furthest below its share) that cannot be vectorised, so without compiled
code it would cost seconds to minutes for the hundreds of millions of samples of a large run.
Here sample c of dataset i is placed at rank (c + 0.5) / t_i among all datasets (ties to the
lower dataset index): a merge of evenly spaced sequences, computed exactly in integer
arithmetic and in O(N * datasets) numpy work (about 4 s for 100M samples on one core, once;
then cached). Each dataset gets exactly t_i samples, never more than its GPT dataset holds, its
c-th sample is its c-th in its own order, and after any prefix of n blended samples every
dataset's count stays within about one sample of its share n * t_i / sum(t) (the tests check
1.5 for up to 8 datasets).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from pretrain.data.cache import DEFAULT_WAIT_SECONDS, cached_arrays

# megatron-core's mid_level_dataset_surplus default.
COMPONENT_SURPLUS = 0.005
_CHUNK = 1 << 20


def parse_data_path(text: str, key: str = "data.path") -> list[tuple[float, str]]:
    """`"PREFIX"` -> [(1.0, PREFIX)]; `"w1 p1 w2 p2 ..."` -> [(w1, p1), (w2, p2), ...].

    Weights come before their prefix, as in megatron's --data-path; they need not sum to 1.
    Raises ValueError with the reason for a malformed string, naming it as `key`. Prefixes cannot contain spaces.
    """
    if not isinstance(text, str):
        raise ValueError(f"{key} must be a string, got {type(text).__name__}")
    parts = text.split()
    if not parts:
        raise ValueError(f"{key} is empty: give a dataset prefix, or 'w1 prefix1 w2 prefix2 ...' to blend")
    if len(parts) == 1:
        if _is_number(parts[0]):
            raise ValueError(f"{key} {text!r} is a weight without a dataset prefix after it")
        return [(1.0, parts[0])]
    if len(parts) % 2:
        raise ValueError(
            f"{key} {text!r} has {len(parts)} words; to blend, give pairs 'weight prefix', e.g. "
            "'0.7 data/web_text_document 0.3 data/code_text_document'"
        )
    blend: list[tuple[float, str]] = []
    for i in range(0, len(parts), 2):
        weight_text, prefix = parts[i], parts[i + 1]
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(
                f"{key} {text!r}: {weight_text!r} (word {i + 1}) should be a weight; blends are "
                "written 'weight prefix weight prefix ...'"
            ) from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{key} {text!r}: weight {weight_text} of {prefix!r} must be a positive number")
        if _is_number(prefix):
            raise ValueError(f"{key} {text!r}: expected a dataset prefix after weight {weight_text}, got {prefix!r}")
        blend.append((weight, prefix))
    prefixes = [p for _, p in blend]
    for p in prefixes:
        if prefixes.count(p) > 1:
            raise ValueError(
                f"{key} {text!r} names {p!r} twice; give it once with the summed weight "
                "(two entries would draw the same samples twice)"
            )
    return blend


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def component_sizes(weights: Sequence[float], size: int) -> tuple[list[int], list[int]]:
    """(samples drawn from each dataset, samples each dataset is built for) for a blend of `size`."""
    normalized = normalize(weights)
    drawn = [int(math.ceil(size * w)) for w in normalized]
    built = [int(math.ceil(t * (1 + COMPONENT_SURPLUS))) for t in drawn]
    return drawn, built


def build_blend_index(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int16 [N], sample index within that dataset int64 [N]), N = sum(counts).

    Sample c of dataset i has key (c + 0.5) / counts[i]; blended position = its rank among all
    keys, ties broken by dataset index. Ranks are counted exactly: (2c'+1) t_i < (2c+1) t_j is
    the integer form of key(j, c') < key(i, c).
    """
    t = [int(n) for n in counts]
    if any(n < 0 for n in t) or len(t) >= np.iinfo(np.int16).max:
        raise ValueError(f"blend counts must be non-negative and fewer than 32767 datasets, got {t}")
    if t and max(t) >= 1 << 31:
        raise ValueError("a blend component of 2^31 samples or more is not supported")
    total = sum(t)
    dataset_index = np.empty(total, dtype=np.int16)
    sample_index = np.empty(total, dtype=np.int64)
    for i, ti in enumerate(t):
        for c0 in range(0, ti, _CHUNK):
            c = np.arange(c0, min(ti, c0 + _CHUNK), dtype=np.int64)
            rank = c.copy()  # samples of dataset i before this one
            for j, tj in enumerate(t):
                if j == i or tj == 0:
                    continue
                x = (2 * c + 1) * tj  # compare (2c'+1) * ti against x
                q = -(-x // ti)  # ceil(x / ti)
                rank += np.minimum(q // 2, tj)  # c' with (2c'+1) * ti < x
                if j < i:  # ties go to the lower dataset index
                    exact = x % ti == 0
                    odd = (x // ti) % 2 == 1
                    rank += exact & odd & ((x // ti - 1) // 2 < tj)
            dataset_index[rank] = i
            sample_index[rank] = c
    return dataset_index, sample_index


class BlendedDataset:
    """Samples drawn from several datasets in fixed proportions, in a cached, deterministic order.

    `datasets` are GPT datasets of one split (anything with `__len__`, `get_batch` and a
    `description` dict); dataset i contributes `counts[i]` samples, in its own order.
    """

    def __init__(
        self,
        datasets: Sequence,
        counts: Sequence[int],
        *,
        cache_dir: str,
        name: str = "blend",
        create: bool = True,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
    ) -> None:
        if len(datasets) != len(counts) or not datasets:
            raise ValueError("a blend needs one count per dataset, and at least one dataset")
        for ds, n in zip(datasets, counts, strict=True):
            if n > len(ds):
                raise ValueError(f"the blend draws {n} samples from {ds!r}, which holds only {len(ds)}")
        self.datasets = list(datasets)
        self.counts = [int(n) for n in counts]
        self.description = {
            "kind": "blend_indices",
            "datasets": [ds.description for ds in self.datasets],
            "counts": self.counts,
        }
        arrays, self.built_index = cached_arrays(
            cache_dir,
            name,
            self.description,
            lambda: dict(zip(("dataset_index", "dataset_sample_index"), build_blend_index(self.counts), strict=True)),
            create=create,
            wait_seconds=wait_seconds,
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        if len(self.dataset_index) != sum(self.counts) or len(self.dataset_sample_index) != sum(self.counts):
            raise ValueError(f"blend index cache in {cache_dir} is inconsistent; delete it to rebuild")
        self.seq_length = self.datasets[0].seq_length

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} out of range ({len(self)} samples in the blend)")
        return self.get_batch(np.array([k]))[0]

    def get_batch(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 [len(indices), seq_length + 1]: one vectorised read per dataset involved."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)}) for the blend")
        which = self.dataset_index[idx]
        within = self.dataset_sample_index[idx]
        out = np.empty((len(idx), self.seq_length + 1), dtype=np.int64)
        for d in np.unique(which):
            rows = np.flatnonzero(which == d)
            out[rows] = self.datasets[int(d)].get_batch(within[rows])
        return out

    def locate(self, k: int, column: int) -> str:
        """Where token `column` of blend sample k comes from (see GPTDataset.locate)."""
        dataset = self.datasets[int(self.dataset_index[int(k)])]
        return dataset.locate(int(self.dataset_sample_index[int(k)]), column)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n} from {getattr(ds, 'prefix', ds)!r}" for ds, n in zip(self.datasets, self.counts, strict=True)
        )
        return f"BlendedDataset({len(self)} samples: {parts})"


def blend_cache_dir(prefixes: Sequence[str]) -> str:
    """Blend indices go beside the first dataset's own index cache, unless told otherwise."""
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
