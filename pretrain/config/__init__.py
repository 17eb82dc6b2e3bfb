"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

A run config is a tree of small dataclasses, one per component. `load_config(path, overrides)`
reads YAML, applies `section.key=value` overrides, fills derived values and validates the whole
tree before anything else runs (no process group, no data, no model), so a typo in a key or a
layout that cannot work fails in a second with a message naming the key.

One job per module; import from the package, not from them:

    errors.py     ConfigError, the one error a config raises
    model.py      model:                  ModelConfig (and pad_vocab)
    moe.py        model.moe:              MoEConfig, check_moe_layout (what parallel.* can do with it)
    parallel.py   parallel:               ParallelConfig
    data.py       data:                   DataConfig, DataStage (data.stages)
    optimizer.py  optimizer:, schedule:   OptimizerConfig, ScheduleConfig
    training.py   train:                  TrainConfig
    outputs.py    checkpoint:, logging:   CheckpointConfig, LoggingConfig
    faults.py     faults:                 FaultsConfig
    run.py        the whole tree          RunConfig (global batch, accumulation, compute dtype)
    loading.py    YAML, dicts, overrides  load_config, config_from_dict, apply_overrides, to_dict
    checks.py     across sections         finalize, derive, CROSS_SECTION_CHECKS, validate_layout

Each field's docstring is its documentation. Loading a config imports neither torch nor
pretrain.parallel.
"""

from pretrain.config.checks import CROSS_SECTION_CHECKS, derive, finalize, validate_layout
from pretrain.config.data import DataConfig, DataStage
from pretrain.config.errors import ConfigError
from pretrain.config.errors import _need as _need
from pretrain.config.faults import FaultsConfig
from pretrain.config.loading import apply_overrides, config_from_dict, load_config, to_dict
from pretrain.config.model import ModelConfig, pad_vocab
from pretrain.config.optimizer import OptimizerConfig, ScheduleConfig
from pretrain.config.outputs import CheckpointConfig, LoggingConfig
from pretrain.config.parallel import ParallelConfig
from pretrain.config.run import RunConfig
from pretrain.config.training import TrainConfig

__all__ = [
    "CROSS_SECTION_CHECKS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataStage",
    "FaultsConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "derive",
    "finalize",
    "load_config",
    "pad_vocab",
    "to_dict",
    "validate_layout",
]
