"""The training run's data: checks of data.path (or data.stages) and the tokenizer against the
model, the Megatron-ordered datasets of each stage and this data-parallel rank's loader.
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
from pretrain.data.stages import Stage, StagedLoader, plan_stages
from pretrain.data.tokenizer import load_tokenizer
from pretrain.parallel.topology import Topology


@dataclass
class Data:
    train: StagedLoader
    valid: SampleDataset | None  # the first stage's validation split (data.path's with one stage)
    collate: Callable | None


def check_data(config: RunConfig):
    """Check data.path and the tokenizer against the model; returns the tokenizer (or None)."""
    d, m = config.data, config.model
    if not d.path and not d.stages:
        raise ConfigError(
            "data.path: no dataset given; run `bash launch/quickstart.sh` to build one, "
            "or set data.path=PREFIX (for PREFIX.bin/.idx) or 'w1 PREFIX1 w2 PREFIX2 ...'"
        )
    # Every stage's files now, not when its first step comes (hours later).
    for i, (_, path) in enumerate(d.stage_plan(config.train.steps)):
        key = f"data.stages.{i}.path" if d.stages else "data.path"
        for _, prefix in parse_data_path(path):
            for suffix in (".bin", ".idx"):
                if not Path(prefix + suffix).is_file():
                    raise ConfigError(
                        f"{key}: {prefix}{suffix} does not exist ({key} names prefixes "
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


def build_data(config: RunConfig, topo: Topology, *, tokenizer=None, announce=None) -> Data:
    """Megatron-ordered datasets of each stage (indices built on rank 0, cached, memory-mapped
    by the others) and this DP rank's loader over them, at the start of the data (a resumed run
    then loads its position: Data.train.load_state_dict). `announce`: rank 0's print for stage
    changes."""
    tokenizer = tokenizer or check_data(config)
    stages = plan_stages(config.data.stage_plan(config.train.steps), config.train.steps)
    loaders, valid, valid_collate = [], None, None
    for stage in stages:
        datasets = _stage_datasets(config, topo, stage)
        # Masks are seeded by stream position, which each stage counts from 0: a seed per stage.
        collate = _collate(config, tokenizer, seed=config.train.seed + stage.index)
        if stage.index == 0:
            valid, valid_collate = datasets["valid"], collate
        loaders.append(
            SampleLoader(
                datasets["train"],
                micro_batch_size=config.train.micro_batch_size,
                seed=config.train.seed + stage.index,
                dp_rank=topo.dp_rank,
                dp_size=topo.dp,
                collate=collate,
                vocab_size=config.model.vocab_size,
            )
        )
    return Data(train=StagedLoader(stages, loaders, announce=announce), valid=valid, collate=valid_collate)


def _stage_datasets(config: RunConfig, topo: Topology, stage: Stage) -> dict:
    """One stage's train split, sized for its steps; the first stage's valid split too."""
    t, d = config.train, config.data
    evaluates = t.eval_interval and stage.index == 0
    return build_datasets(
        stage.path,
        seq_length=config.model.seq_length,
        seed=t.seed + stage.index,  # why: pretrain/data/stages.py
        split_ratios=d.split_ratios,
        num_samples={
            "train": stage.steps * config.global_batch(topo.dp),
            "valid": t.eval_iters * t.micro_batch_size * topo.dp if evaluates else 0,
        },
        cache_dir=d.cache_dir or None,
        is_builder=topo.rank == 0,
        barrier=dist.barrier if topo.world_size > 1 else None,
    )


def _collate(config: RunConfig, tokenizer, *, seed: int) -> Callable | None:
    """The objective's batch maker (None: the causal shift)."""
    d = config.data
    collate = None
    if d.objective == "masked":
        collate = MaskedLMCollator(
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask,
            seed=seed,
            special_ids=(tokenizer.eod, tokenizer.pad),
            mask_prob=d.mask_prob,
            mean_span=d.mean_span,
        )
    if d.document_attention_mask:
        collate = with_document_segments(collate or causal_lm_collate, tokenizer.eod)
    return collate
