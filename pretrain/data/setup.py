"""The training run's data: checks of data.path and the tokenizer against the model, the
Megatron-ordered datasets and this data-parallel rank's loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from pretrain.config import ConfigError, RunConfig
from pretrain.data.blend import parse_data_path
from pretrain.data.builder import build_datasets
from pretrain.data.loader import SampleDataset, SampleLoader, causal_lm_collate, with_document_segments
from pretrain.data.masking import MaskedLMCollator
from pretrain.data.tokenizer import load_tokenizer
from pretrain.parallel.topology import Topology


@dataclass
class Data:
    train: SampleLoader
    valid: SampleDataset | None
    collate: Callable | None


def check_data(config: RunConfig):
    """Check data.path and the tokenizer against the model; returns the tokenizer (or None)."""
    d, m = config.data, config.model
    if not d.path:
        raise ConfigError(
            "data.path: no dataset given; run `bash launch/quickstart.sh` to build one, "
            "or set data.path=PREFIX (for PREFIX.bin/.idx) or 'w1 PREFIX1 w2 PREFIX2 ...'"
        )
    for _, prefix in parse_data_path(d.path):
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(
                    f"data.path: {prefix}{suffix} does not exist (data.path names prefixes "
                    "written by tools/preprocess_data.py, without .bin/.idx)"
                )
    tokenizer = load_tokenizer(d.tokenizer) if d.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} in {d.tokenizer}); set model.vocab_size={tokenizer.vocab_size}"
        )
    if d.objective == "masked" and tokenizer is None:
        raise ConfigError("data.tokenizer: the masked objective needs the tokenizer (for its mask token)")
    return tokenizer


def build_data(config: RunConfig, topo: Topology, *, consumed_samples: int, tokenizer=None) -> Data:
    """Megatron-ordered datasets (indices built on rank 0, cached, memory-mapped by the others)
    and this DP rank's loader."""
    t, d = config.train, config.data
    tokenizer = tokenizer or check_data(config)
    global_batch = config.global_batch(topo.dp)
    datasets = build_datasets(
        d.path,
        seq_length=config.model.seq_length,
        seed=t.seed,
        split_ratios=d.split_ratios,
        num_samples={
            "train": t.steps * global_batch,
            "valid": t.eval_iters * t.micro_batch_size * topo.dp if t.eval_interval else 0,
        },
        cache_dir=d.cache_dir or None,
        is_builder=topo.rank == 0,
        barrier=dist.barrier if topo.world_size > 1 else None,
    )
    collate = None
    if d.objective == "masked":
        collate = MaskedLMCollator(
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask,
            seed=t.seed,
            special_ids=(tokenizer.eod, tokenizer.pad),
            mask_prob=d.mask_prob,
            mean_span=d.mean_span,
        )
    if d.document_attention_mask:
        collate = with_document_segments(collate or causal_lm_collate, tokenizer.eod)
    loader = SampleLoader(
        datasets["train"],
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp,
        consumed_samples=consumed_samples,
        collate=collate,
        vocab_size=config.model.vocab_size,
    )
    return Data(train=loader, valid=datasets["valid"], collate=collate)
