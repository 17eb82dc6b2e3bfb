"""RunConfig: the tree of sections, and the values derived across them (global batch,
accumulation steps, compute dtype), computed here only."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from pretrain.config.data import DataConfig
from pretrain.config.errors import ConfigError
from pretrain.config.faults import FaultsConfig
from pretrain.config.model import ModelConfig
from pretrain.config.optimizer import OptimizerConfig, ScheduleConfig
from pretrain.config.outputs import CheckpointConfig, LoggingConfig
from pretrain.config.parallel import ParallelConfig
from pretrain.config.training import TrainConfig

if typing.TYPE_CHECKING:
    import torch


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    # Derived values, computed here only: read these, not train.global_batch_size/precision.
    def global_batch(self, dp: int) -> int:
        """Sequences per optimizer step over `dp` data-parallel ranks (default one micro-batch each)."""
        return self.train.global_batch_size or self.train.micro_batch_size * dp

    def accumulation_steps(self, dp: int) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (out of `dp` ranks)."""
        t = self.train
        per_step = t.micro_batch_size * dp
        global_batch = self.global_batch(dp)
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch_size: {global_batch} is not divisible by "
                f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
            )
        return global_batch // per_step

    @property
    def compute_dtype(self) -> torch.dtype:
        """The torch dtype train.precision computes in: float32, bfloat16 or float16."""
        import torch  # lazy: loading and validating a config needs no torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.train.precision]
