"""Validation in one place: each config section checks itself and names the key, the few
cross-section rules run in finalize, derived values (global batch, accumulation, compute dtype)
come from RunConfig only, and loading a config imports nothing of pretrain.parallel."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from pretrain.config import (
    CROSS_SECTION_CHECKS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    FaultsConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    validate_layout,
)

# (section, bad fields, the key the message must name)
BAD_SECTIONS = [
    (ModelConfig, {"num_layers": 0}, "model.num_layers"),
    (ModelConfig, {"num_heads": 3}, "model.hidden_size"),
    (ModelConfig, {"flavour": "llama", "num_kv_heads": 3}, "model.num_kv_heads"),
    (ModelConfig, {"num_kv_heads": 2}, "model.num_kv_heads"),
    (ModelConfig, {"flavour": "llama", "hidden_size": 120, "num_heads": 8}, "model.hidden_size"),
    (ModelConfig, {"ffn_hidden_size": -4}, "model.ffn_hidden_size"),
    (ModelConfig, {"max_position_embeddings": 16}, "model.seq_length"),
    (ModelConfig, {"dropout": 1.0}, "model.dropout"),
    (ModelConfig, {"norm_eps": 0.0}, "model.norm_eps"),
    (ModelConfig, {"padded_vocab_size": 100}, "model.padded_vocab_size"),
    (ParallelConfig, {"tensor": 0}, "parallel.tensor"),
    (ParallelConfig, {"virtual_stages": 2}, "parallel.virtual_stages"),
    (ParallelConfig, {"sequence_parallel": True}, "parallel.sequence_parallel"),
    (ParallelConfig, {"zero_stage": 4}, "parallel.zero_stage"),
    (ParallelConfig, {"zero_stage": 3, "pipeline": 2}, "parallel.zero_stage"),
    (ParallelConfig, {"bucket_mb": 0.0}, "parallel.bucket_mb"),
    (ParallelConfig, {"timeout_minutes": 0.0}, "parallel.timeout_minutes"),
    (ParallelConfig, {"offload_optimizer": True}, "parallel.offload_optimizer"),
    (ParallelConfig, {"zero_stage": 2, "offload_params": True}, "parallel.offload_params"),
    (ParallelConfig, {"zero3_persistence_threshold": -1}, "parallel.zero3_persistence_threshold"),
    (DataConfig, {"split": "a,b"}, "data.split"),
    (DataConfig, {"split": "0,1,0"}, "data.split"),
    (DataConfig, {"path": "0.5 a 0.5"}, "data.path"),
    (DataConfig, {"document_attention_mask": True}, "data.document_attention_mask"),
    (DataConfig, {"mask_prob": 1.0}, "data.mask_prob"),
    (OptimizerConfig, {"lr": 0.0}, "optimizer.lr"),
    (OptimizerConfig, {"min_lr": 1.0}, "optimizer.min_lr"),
    (OptimizerConfig, {"weight_decay": -0.1}, "optimizer.weight_decay"),
    (OptimizerConfig, {"beta1": 1.0}, "optimizer.beta1"),
    (OptimizerConfig, {"beta2": -0.5}, "optimizer.beta2"),
    (OptimizerConfig, {"clip_grad": -1.0}, "optimizer.clip_grad"),
    (ScheduleConfig, {"warmup_steps": -1}, "schedule.warmup_steps"),
    (ScheduleConfig, {"warmup_steps": 10, "decay_steps": 10}, "schedule.decay_steps"),
    (TrainConfig, {"steps": 0}, "train.steps"),
    (TrainConfig, {"micro_batch_size": 0}, "train.micro_batch_size"),
    (TrainConfig, {"micro_batch_size": 4, "global_batch_size": 6}, "train.global_batch_size"),
    (TrainConfig, {"log_interval": 0}, "train.log_interval"),
    (TrainConfig, {"eval_interval": -1}, "train.eval_interval"),
    (TrainConfig, {"eval_iters": 0}, "train.eval_iters"),
    (TrainConfig, {"exit_after_minutes": 0.0}, "train.exit_after_minutes"),
    (TrainConfig, {"hang_timeout_minutes": -1.0}, "train.hang_timeout_minutes"),
    (CheckpointConfig, {"interval": -1}, "checkpoint.interval"),
    (CheckpointConfig, {"keep_last": -1}, "checkpoint.keep_last"),
    (LoggingConfig, {"peak_tflops": 0.0}, "logging.peak_tflops"),
    (FaultsConfig, {"spike_window": 0}, "faults.spike_window"),
    (FaultsConfig, {"straggler_factor": 0.5}, "faults.straggler_factor"),
]


@pytest.mark.parametrize(
    "section, fields, key", BAD_SECTIONS, ids=[f"{key}={fields}" for _, fields, key in BAD_SECTIONS]
)
def test_section_validate_names_the_key(section, fields, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        section(**fields).validate()
    # The same mistake through the whole-tree path names the same key.
    name = next(f.name for f in dataclasses.fields(RunConfig) if f.type in (section, section.__name__))
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        config_from_dict({name: fields})


def test_every_section_validates_itself_and_defaults_pass():
    for f in dataclasses.fields(RunConfig):
        section = getattr(RunConfig(), f.name)
        assert callable(getattr(section, "validate", None)), f"{f.name} has no validate()"
        section.validate()


@pytest.mark.parametrize(
    "raw, key, check",
    [
        ({"parallel": {"tensor": 3}}, "parallel.tensor", "_check_tensor_split"),
        ({"model": {"padded_vocab_size": 8001}, "parallel": {"tensor": 2}}, "model.padded_vocab_size", None),
        (
            {"parallel": {"tensor": 2, "sequence_parallel": True}, "model": {"seq_length": 255}},
            "parallel.sequence_parallel",
            None,
        ),
        ({"parallel": {"pipeline": 3}}, "model.num_layers", "_check_pipeline_split"),
        ({"parallel": {"zero_stage": 2, "pipeline": 2}}, "parallel.zero_stage", "_check_zero_with_pipeline"),
        ({"data": {"objective": "masked"}}, "model.bidirectional", "_check_objective"),
        ({"model": {"attention_backend": "flash_attn"}}, "model.attention_backend", "_check_attention_precision"),
    ],
)
def test_cross_section_checks_name_the_key(raw, key, check):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        config_from_dict(raw)
    if check is not None:
        assert check in [c.__name__ for c in CROSS_SECTION_CHECKS]


def test_supported_zero_combinations_pass():
    config_from_dict({"parallel": {"zero_stage": 2, "pipeline": 2}, "model": {"tie_embeddings": False}})
    config_from_dict({"parallel": {"zero_stage": 3, "tensor": 2, "offload_params": True}})
    config_from_dict({"parallel": {"zero_stage": 1, "offload_optimizer": True, "pipeline": 2}})


def test_padded_vocab_is_derived_after_the_sections_validate():
    assert config_from_dict({"parallel": {"tensor": 2}}).model.padded_vocab_size == 8192
    assert config_from_dict({"model": {"padded_vocab_size": 8064}}).model.padded_vocab_size == 8064
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by"):  # not a ZeroDivisionError
        config_from_dict({"model": {"make_vocab_size_divisible_by": 0}})


def test_loading_a_config_imports_nothing_of_pretrain_parallel():
    code = (
        "import sys, pretrain.config as c\n"
        "c.load_config('configs/gpt_tiny.yaml', ['parallel.zero_stage=2', 'parallel.tensor=2'])\n"
        "c.config_from_dict({'data': {'path': '0.5 a 0.5 b'}})\n"
        "print([m for m in sys.modules if m.startswith('pretrain.parallel')], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


@pytest.mark.parametrize(
    "train, dp, global_batch, accumulation",
    [
        ({"micro_batch_size": 4}, 1, 4, 1),
        ({"micro_batch_size": 4}, 8, 32, 1),
        ({"micro_batch_size": 2, "global_batch_size": 16}, 1, 16, 8),
        ({"micro_batch_size": 2, "global_batch_size": 16}, 4, 16, 2),
        ({"micro_batch_size": 2, "global_batch_size": 16}, 8, 16, 1),
    ],
)
def test_global_batch_and_accumulation_steps(train, dp, global_batch, accumulation):
    config = config_from_dict({"train": train})
    assert config.global_batch(dp) == global_batch
    assert config.accumulation_steps(dp) == accumulation
    assert config.train.micro_batch_size * accumulation * dp == global_batch


def test_accumulation_steps_refuses_a_batch_that_does_not_split():
    config = config_from_dict({"train": {"micro_batch_size": 2, "global_batch_size": 10}})
    with pytest.raises(
        ConfigError,
        match=r"^train.global_batch_size: 10 is not divisible by train.micro_batch_size x data-parallel size = 2 x 2$",
    ):
        config.accumulation_steps(2)
    with pytest.raises(ConfigError, match=r"2 x 2 \(world 4 / \(tensor 2 x pipeline 1\)\)$"):
        validate_layout(config_from_dict({"train": config.train.__dict__, "parallel": {"tensor": 2}}), 4)


@pytest.mark.parametrize(
    "precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_compute_dtype(precision, dtype):
    assert config_from_dict({"train": {"precision": precision}}).compute_dtype is dtype


def test_validate_layout():
    config = config_from_dict(
        {"parallel": {"tensor": 2, "pipeline": 2, "virtual_stages": 2}, "model": {"num_layers": 4}}
    )
    with pytest.raises(ConfigError, match=r"^parallel: world size 6 is not divisible"):
        validate_layout(config, 6)
    with pytest.raises(ConfigError, match=r"^parallel.virtual_stages: .*micro-batches per step \(1\)"):
        validate_layout(config, 8)  # one micro-batch per step cannot interleave over 2 stages
    config.train.global_batch_size = 4 * config.train.micro_batch_size
    assert validate_layout(config, 8) == 2
