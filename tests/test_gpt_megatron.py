"""Our GPT and blended datasets against megatron-core 0.16.1's, the reference, on the same files.

For the same `.bin/.idx`, seed, split, sequence length and sample counts, every sample must be
identical, token for token, in the same order: a run can switch frameworks without changing
its data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from pretrain.data.blend import COMPONENT_SURPLUS, BlendedDataset
from pretrain.data.builder import build_datasets
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDatasetWriter


class MegatronTokenizer:
    """What megatron-core's GPTDatasetConfig needs; pad -1 never occurs, so no token is rewritten."""

    vocab_size = 1 << 20
    eod = 0
    pad = -1
    unique_identifiers = {"class": "TestTokenizer"}


def megatron_build(blend: list[str], *, seq_length: int, seed: int, split: str, sizes: list, cache: str):
    """Datasets through megatron-core's public builder, as its training script builds them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.datasets.utils import get_blend_from_list

        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=get_blend_from_list(blend),
            split=split,
            tokenizer=MegatronTokenizer(),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            path_to_cache=cache,
        )
        return BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


def megatron_samples(ds, indices) -> np.ndarray:
    """[len, s+1]: megatron's tokens plus the last label, i.e. the raw sample."""
    rows = []
    for k in indices:
        item = ds[int(k)]
        rows.append(np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]]))
    return np.stack(rows)


def write_random(prefix: str, rng: np.random.Generator, n: int, max_len: int, dtype=np.int32) -> None:
    lengths = rng.integers(1, max_len, size=n)
    lengths[rng.integers(0, n, size=max(1, n // 20))] = 0  # scattered empty documents
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for length in lengths:
            writer.add_document(rng.integers(1, 30_000, size=length))


@pytest.mark.parametrize(
    "seq_length, sizes",
    [
        (16, [None, None, None]),  # one epoch per split
        (7, [5000, 700, 90]),  # several epochs; train's last epoch is separated (< 80% used)
        (32, [1450, 64, 1]),  # several epochs, last one nearly whole: shuffled with the others
        (1, [300, 10, 5]),
    ],
)
def test_same_samples_as_megatron_gpt_dataset(tmp_path, seq_length, sizes):
    prefix = str(tmp_path / "data")
    write_random(prefix, np.random.default_rng(seq_length), n=400, max_len=60)
    theirs = megatron_build(
        [prefix], seq_length=seq_length, seed=1234, split="80,15,5", sizes=sizes, cache=str(tmp_path / "megatron")
    )
    ours = build_datasets(
        prefix,
        seq_length=seq_length,
        seed=1234,
        split_ratios=(80, 15, 5),
        num_samples=dict(zip(("train", "valid", "test"), sizes, strict=True)),
        cache_dir=str(tmp_path / "ours"),
    )
    for split, mine, ref in zip(("train", "valid", "test"), ours.values(), theirs, strict=True):
        assert isinstance(mine, GPTDataset)
        assert len(mine) == len(ref), split
        for name in ("document_index", "sample_index", "shuffle_index"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(ref, name), err_msg=f"{split} {name}")
            assert getattr(mine, name).dtype == getattr(ref, name).dtype
        everything = np.arange(len(ref))
        np.testing.assert_array_equal(mine.get_batch(everything), megatron_samples(ref, everything))


def test_same_samples_on_real_preprocessed_text(stdlib_data, tmp_path):
    """The stdlib corpus, tokenized by our tools: megatron reads our files and agrees sample by sample."""
    prefix = stdlib_data["prefix"]
    sizes = [2000, 50, None]
    theirs = megatron_build(
        [prefix], seq_length=256, seed=7, split="98,2,0", sizes=sizes, cache=str(tmp_path / "megatron")
    )
    ours = build_datasets(
        prefix,
        seq_length=256,
        seed=7,
        split_ratios=(98, 2, 0),
        num_samples={"train": 2000, "valid": 50},
        cache_dir=str(tmp_path / "ours"),
    )
    assert theirs[2] is None and ours["test"] is None
    for mine, ref in ((ours["train"], theirs[0]), (ours["valid"], theirs[1])):
        assert len(mine) == len(ref)
        picks = np.random.default_rng(0).integers(0, len(ref), size=300)
        np.testing.assert_array_equal(mine.get_batch(picks), megatron_samples(ref, picks))


def test_blend_components_are_megatrons_and_draw_their_share(tmp_path, monkeypatch):
    import torch.distributed

    # megatron-core's BlendedDataset asks for the rank even in a single process.
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 0)
    rng = np.random.default_rng(5)
    prefixes = []
    for name in ("a", "b", "c"):
        prefixes.append(str(tmp_path / name))
        write_random(prefixes[-1], rng, n=int(rng.integers(150, 300)), max_len=80)
    weights = [0.5, 0.2, 0.3]
    text = " ".join(f"{w} {p}" for w, p in zip(weights, prefixes, strict=True))
    sizes = [1000, 100, 0]  # megatron wants a size for every split of a weighted blend
    blend_list = [x for w, p in zip(weights, prefixes, strict=True) for x in (str(w), p)]
    theirs = megatron_build(
        blend_list, seq_length=24, seed=3, split="90,10,0", sizes=sizes, cache=str(tmp_path / "megatron")
    )
    ours = build_datasets(
        text,
        seq_length=24,
        seed=3,
        split_ratios=(90, 10, 0),
        num_samples={"train": 1000, "valid": 100},
        cache_dir=str(tmp_path / "ours"),
    )
    for mine, ref, size in ((ours["train"], theirs[0], 1000), (ours["valid"], theirs[1], 100)):
        assert isinstance(mine, BlendedDataset)
        assert len(mine) == len(ref) == sum(math.ceil(size * w) for w in weights)
        for component, ref_component, w in zip(mine.datasets, ref.datasets, weights, strict=True):
            # Each component is the dataset megatron builds for it: same size request, same samples.
            assert (
                component.num_samples
                == ref_component.num_samples
                == math.ceil(math.ceil(size * w) * (1 + COMPONENT_SURPLUS))
            )
            assert len(component) == len(ref_component)
            everything = np.arange(len(ref_component))
            np.testing.assert_array_equal(component.get_batch(everything), megatron_samples(ref_component, everything))
        # Each dataset contributes its first ceil(size * w) samples, in its own order, exactly once.
        for d, w in enumerate(weights):
            drawn = mine.dataset_sample_index[mine.dataset_index == d]
            np.testing.assert_array_equal(drawn, np.arange(math.ceil(size * w)))
