"""Validation of the whole tree: each section's own rules (its validate()), the derived fields,
then the few rules that span sections. The world size is checked by validate_layout once it
is known."""

from __future__ import annotations

import dataclasses

from pretrain.config.errors import ConfigError, _need
from pretrain.config.model import pad_vocab
from pretrain.config.moe import check_moe_layout
from pretrain.config.parallel import ZERO_BUBBLE
from pretrain.config.run import RunConfig


def finalize(config: RunConfig) -> None:
    """Validate each section, fill derived fields, check across sections; raises ConfigError
    naming the first bad key.

    Sections first: the derived fields are computed from their values (the vocabulary padding
    divides by model.make_vocab_size_divisible_by x parallel.tensor)."""
    for section in dataclasses.fields(config):
        getattr(config, section.name).validate()
    derive(config)
    for check in CROSS_SECTION_CHECKS:
        check(config)


def derive(config: RunConfig) -> None:
    """Fill the fields left unset whose value follows from others (they are saved with every
    checkpoint, so a later run with another layout keeps them)."""
    m = config.model
    if m.padded_vocab_size is None:
        m.padded_vocab_size = pad_vocab(m.vocab_size, m.make_vocab_size_divisible_by * config.parallel.tensor)
    config.parallel.derive_schedule()


def _check_tensor_split(config: RunConfig) -> None:
    """Every tensor-parallel rank gets an equal share of heads, MLP, vocabulary (and sequence)."""
    m, tp = config.model, config.parallel.tensor
    _need(
        m.num_heads % tp == 0,
        "parallel.tensor",
        f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={tp}",
    )
    _need(
        m.kv_heads % tp == 0,
        "parallel.tensor",
        f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tensor={tp}",
    )
    _need(
        m.ffn_size % tp == 0,
        "parallel.tensor",
        f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tensor={tp}",
    )
    _need(
        not config.parallel.sequence_parallel or m.seq_length % tp == 0,
        "parallel.sequence_parallel",
        f"model.seq_length={m.seq_length} is not divisible by parallel.tensor={tp}",
    )
    _need(
        m.padded_vocab_size % tp == 0,
        "model.padded_vocab_size",
        f"{m.padded_vocab_size} is not divisible by parallel.tensor={tp}",
    )


def _check_context_split(config: RunConfig) -> None:
    """Context parallelism cuts each sequence into 2 x CP equal chunks (rank i holds chunks i and
    2 x CP - 1 - i, which balances the causal mask's work); under sequence parallelism each
    rank's share is split again over the TP ranks."""
    m, p = config.model, config.parallel
    if p.context == 1:
        return
    _need(
        m.seq_length % (2 * p.context) == 0,
        "model.seq_length",
        f"{m.seq_length} is not a multiple of 2 x parallel.context = {2 * p.context}: context "
        f"parallelism splits every sequence into 2 x {p.context} equal chunks (rank i holds chunks i "
        f"and {2 * p.context - 1} - i); use a sequence length that is a multiple of {2 * p.context}",
    )
    local = m.seq_length // p.context
    _need(
        not p.sequence_parallel or local % p.tensor == 0,
        "parallel.sequence_parallel",
        f"each context-parallel rank's {local} tokens (model.seq_length / parallel.context) are not "
        f"divisible by parallel.tensor={p.tensor}",
    )
    _need(
        m.attention_backend == "sdpa" or p.context_attention == "ring",
        "model.attention_backend",
        f"{m.attention_backend} with parallel.context > 1 and parallel.context_attention=all_gather: "
        "the gathered keys need a mask of global positions over this rank's two chunks, which "
        "flash-attn's kernels do not take; use parallel.context_attention=ring (its blocks run "
        "flash-attn's kernels) or model.attention_backend=sdpa",
    )
    _need(
        p.context_attention != "ring" or m.dropout == 0,
        "model.dropout",
        f"{m.dropout} with parallel.context_attention=ring: the ring's blockwise attention has no "
        "attention dropout; use model.dropout=0 or parallel.context_attention=all_gather",
    )


def _check_pipeline_split(config: RunConfig) -> None:
    """Every (virtual) pipeline stage gets the same number of layers."""
    m, p = config.model, config.parallel
    stages = p.pipeline * p.virtual_stages
    _need(
        m.num_layers % stages == 0,
        "model.num_layers",
        f"{m.num_layers} layers cannot be split into parallel.pipeline={p.pipeline} x "
        f"parallel.virtual_stages={p.virtual_stages} = {stages} equal stages",
    )


def _check_zero_with_pipeline(config: RunConfig) -> None:
    """ZeRO-2 under pipelining needs untied embeddings (the rest of ZeRO's rules are
    ParallelConfig.validate's)."""
    p = config.parallel
    _need(
        not (p.zero_stage == 2 and p.pipeline > 1 and config.model.tied),
        "parallel.zero_stage",
        "ZeRO-2 with parallel.pipeline > 1 needs untied embeddings: ZeRO-2 reduces and shards each "
        "gradient during every micro-batch's backward, but the two copies of a tied embedding (first "
        "and last stage) must first be summed, and the first stage only has its gradient at the very "
        "end of the pipeline's backward. Set model.tie_embeddings=false, or use parallel.zero_stage=1",
    )


def _check_zero_bubble(config: RunConfig) -> None:
    """What the zero-bubble schedules (pretrain/parallel/zero_bubble.py) do not combine with. Tied
    embeddings do: under zb-v both copies are on pipeline rank 0 and are summed there
    (pretrain/parallel/tied.py)."""
    p, m = config.parallel, config.model
    if p.pipeline_schedule not in ZERO_BUBBLE:
        return
    _need(
        p.zero_stage in (0, 1),
        "parallel.zero_stage",
        f"{p.zero_stage} with parallel.pipeline_schedule={p.pipeline_schedule}: ZeRO-2 reduces every "
        "micro-batch's gradients as its backward produces them, and a zero-bubble schedule produces "
        "them later, in its weight-gradient passes; use parallel.zero_stage=1 or 0",
    )
    _need(
        not m.compile,
        "model.compile",
        f"torch.compile with parallel.pipeline_schedule={p.pipeline_schedule} is not supported: the "
        "split backward defers weight gradients from inside autograd functions; set model.compile=false",
    )


def _check_objective(config: RunConfig) -> None:
    """The training objective and the attention direction go together."""
    _need(
        (config.data.objective == "masked") == config.model.bidirectional,
        "model.bidirectional",
        "must be true exactly when data.objective=masked (a causal model cannot learn masked-LM, "
        "and a bidirectional one sees the next token)",
    )


def _check_attention_precision(config: RunConfig) -> None:
    """flash-attn has no fp32 kernels (whether it is installed is checked when a run starts)."""
    _need(
        not (config.model.attention_backend == "flash_attn" and config.train.precision == "fp32"),
        "model.attention_backend",
        "flash_attn runs in bf16 or fp16 only: set train.precision=bf16, or use sdpa",
    )


def _check_data_stages(config: RunConfig) -> None:
    """Stages start at 0, at increasing steps, each before the end of the run (a stage that
    starts at or after train.steps would never train: most likely a start in the wrong unit)."""
    steps, previous = config.train.steps, None
    for i, stage in enumerate(config.data.stages):
        key, start = f"data.stages.{i}", stage.start(steps)
        how = f"step {start}"
        if stage.start_fraction is not None:
            how += f" (start_fraction {stage.start_fraction} of train.steps={steps})"
        if previous is None:
            _need(start == 0, key, f"the first stage must start at step 0 (start_step: 0), got {how}")
        else:
            _need(
                start > previous,
                key,
                f"starts at {how}, not after data.stages.{i - 1}'s step {previous}: stages must start "
                "at increasing steps",
            )
        _need(
            start < steps,
            key,
            f"starts at {how}, but the run ends at train.steps={steps}: the stage would never train; "
            "lower its start or raise train.steps",
        )
        previous = start


CROSS_SECTION_CHECKS = (
    _check_tensor_split,
    _check_context_split,
    _check_pipeline_split,
    _check_zero_with_pipeline,
    _check_zero_bubble,
    check_moe_layout,
    _check_objective,
    _check_attention_precision,
    _check_data_stages,
)


def validate_layout(config: RunConfig, world_size: int) -> int:
    """Check that the config's layout fits `world_size` ranks; returns the data-parallel size.

    Called before any process group exists (pretrain.parallel.bootstrap.init_distributed), so a
    bad layout fails in a second with the numbers. Context-parallel ranks share their samples
    (each holds a part of every sequence), so they do not count towards the data-parallel size."""
    p = config.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        names, sizes = "parallel.tensor x parallel.pipeline", f"{p.tensor} x {p.pipeline}"
        if p.context > 1:
            names, sizes = names + " x parallel.context", sizes + f" x {p.context}"
        raise ConfigError(f"parallel: world size {world_size} is not divisible by {names} = {sizes} = {model_parallel}")
    dp = world_size // model_parallel
    if dp % p.expert:
        raise ConfigError(
            f"parallel.expert: {p.expert} does not divide the data-parallel size {dp} (world {world_size} / "
            f"(tensor {p.tensor} x pipeline {p.pipeline} x context {p.context})): expert-parallel ranks are "
            "carved out of the data-parallel ranks"
        )
    try:
        micro_batches = config.accumulation_steps(dp)
    except ConfigError as e:
        grid = f"tensor {p.tensor} x pipeline {p.pipeline}" + (f" x context {p.context}" if p.context > 1 else "")
        raise ConfigError(f"{e} (world {world_size} / ({grid}))") from None
    if p.schedule == "interleaved" and micro_batches % p.pipeline:
        raise ConfigError(
            f"parallel.virtual_stages: the interleaved schedule needs the number of "
            f"micro-batches per step ({micro_batches}) to be a multiple of "
            f"parallel.pipeline={p.pipeline}; raise train.global_batch_size"
        )
    return dp
