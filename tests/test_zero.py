"""DeepSpeed ZeRO 1/2/3 under our trainer, on real gloo ranks.

Each ZeRO run is compared with the same layout without ZeRO on the same batches (tiny GPT,
3 optimizer steps: warmup, clipping, AdamW, 2 micro-batches per rank). Tolerance, fp32: losses
agree to 1e-5 absolute and gradient norms to 1e-5 relative (measured: ZeRO-1 bit-identical,
ZeRO-2/3 within 5e-7; reductions run in a different order). The optimizer state each rank
holds is read from the ZeRO optimizer itself (its fp32 master partition and Adam moments).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from parallel_harness import global_batches, make_config, rank_batches, torchrun
from parallel_harness import run_job as run

from pretrain.config import ConfigError, config_from_dict
from pretrain.parallel.zero_config import deepspeed_config

LLAMA = ["model.flavour=llama", "model.num_kv_heads=2"]
STEPS = 3


_baselines: dict = {}


def baseline(overrides: tuple, world: int) -> dict:
    key = (overrides, world)
    if key not in _baselines:
        _baselines[key] = run(list(overrides), world=world)[0]
    return _baselines[key]


def assert_same_training(got: dict, ref: dict) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert ref["loss"][0] != ref["loss"][-1]  # the steps did change the model


# -- losses equal the same layout without ZeRO; state is sharded 1/DP ----------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_matches_plain_data_parallel_and_shards_optimizer_state(stage):
    # persistence threshold 0: ZeRO-3 partitions even this tiny model's small weights
    overrides = [f"parallel.zero_stage={stage}", "parallel.zero3_persistence_threshold=0"]
    ranks = run(overrides, world=2)
    assert_same_training(ranks[0], baseline((), 2))

    # fp32: master weights + two Adam moments = 12 bytes per parameter in all, split over DP.
    per_rank = [r["optimizer_bytes"] for r in ranks]
    params = ranks[0]["params"]
    assert sum(per_rank) == pytest.approx(12 * params, rel=1e-3)  # padding to the DP alignment only
    for held in per_rank:
        assert held == pytest.approx(12 * params / 2, rel=2e-3)
    weights = [r["weight_bytes"] for r in ranks]
    assert weights == [pytest.approx((4 * params / 2) if stage == 3 else 4 * params, rel=2e-3)] * 2


def test_zero1_tp2_pp2_dp2_matches_same_layout():
    """gpt2: tied embeddings summed across the pipeline, LayerNorm/biases under sequence
    parallelism, interleaved schedule; ZeRO-1 shards over DP only."""
    layout = (
        "parallel.tensor=2",
        "parallel.pipeline=2",
        "parallel.virtual_stages=2",
        "parallel.sequence_parallel=true",
        "parallel.bucket_mb=0.01",
    )
    ranks = run([*layout, "parallel.zero_stage=1"], world=8)
    assert_same_training(ranks[0], baseline(layout, 8))
    # Each TP/PP position's state is split over its 2 DP ranks, not over TP or PP.
    by_position: dict = {}
    for r in ranks:
        by_position.setdefault(r["rank"] % 2 + 4 * (r["rank"] // 4), []).append(r)
    for pair in by_position.values():
        assert len(pair) == 2
        assert sum(r["optimizer_bytes"] for r in pair) == pytest.approx(12 * pair[0]["params"], rel=1e-3)
        assert pair[0]["optimizer_bytes"] == pytest.approx(pair[1]["optimizer_bytes"], rel=2e-3)


def test_zero2_with_pipeline_matches_same_layout():
    """ZeRO-2 reduces and shards gradients in every micro-batch's backward, here inside the
    interleaved 1F1B schedule (which GPT-NeoX and Megatron-DeepSpeed refuse)."""
    layout = (*LLAMA, "parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.bucket_mb=0.01")
    ranks = run([*layout, "parallel.zero_stage=2"], world=4)
    assert_same_training(ranks[0], baseline(layout, 4))


def test_zero3_with_tensor_parallel_matches_same_layout():
    layout = (*LLAMA, "parallel.tensor=2", "parallel.sequence_parallel=true")
    ranks = run([*layout, "parallel.zero_stage=3", "parallel.zero3_persistence_threshold=0"], world=4)
    assert_same_training(ranks[0], baseline(layout, 4))
    for r in ranks:  # TP shards, each split again over the 2 DP ranks
        assert r["weight_bytes"] == pytest.approx(4 * r["params"] / 2, rel=2e-3)


# -- checkpoints -----------------------------------------------------------------------------


def test_zero2_bf16_resume_is_exact(tmp_path):
    """bf16 weights are derived from the fp32 masters each rank saves, so resuming needs the
    masters themselves: a resumed run continues with bit-identical losses."""
    overrides = ["parallel.zero_stage=2", "train.precision=bf16"]
    straight = run(overrides, world=2, last=4, save=str(tmp_path), save_at=2)[0]
    # The 2 DP ranks each wrote part of the gathered state.
    files = sorted(p.name for p in (tmp_path / "step_2").glob("optimizer_*"))
    assert files == ["optimizer_tp0_pp0_part0.safetensors", "optimizer_tp0_pp0_part1.safetensors"]
    resumed = run(overrides, world=2, first=3, last=4, resume=str(tmp_path / "step_2"))[0]
    assert resumed["loss"] == straight["loss"][2:]
    assert resumed["grad_norm"] == straight["grad_norm"][2:]


def test_train_command_with_zero3_resumes_exactly_and_exports(stdlib_data, tmp_path):
    """`python -m pretrain.train` under torchrun with ZeRO-3: prints the DeepSpeed config it
    uses, resumes bit-exactly from its per-DP-rank checkpoint, and load_model() gathers the
    sharded weights into the single-device model (its validation loss matches the run's)."""

    def overrides(run_dir, steps):
        return [
            f"data.path={stdlib_data['prefix']}",
            f"data.tokenizer={stdlib_data['tokenizer']}",
            "model.vocab_size=2000",
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.seq_length=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=8",
            "train.log_interval=1",
            "train.eval_interval=6",
            "train.eval_iters=2",
            "schedule.warmup_steps=2",
            "schedule.decay_steps=6",
            "logging.tensorboard=false",
            "logging.peak_tflops=1",
            "parallel.zero_stage=3",
            "parallel.zero3_persistence_threshold=0",
            f"checkpoint.dir={run_dir}/ckpt",
            f"logging.dir={run_dir}/logs",
            f"train.steps={steps}",
        ]

    def losses(run_dir):
        lines = (Path(run_dir) / "logs/metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    straight = torchrun(2, overrides(tmp_path / "a", 6))
    assert straight.returncode == 0, straight.stderr[-3000:]
    used = json.loads(straight.stdout.split("DeepSpeed config: ", 1)[1].splitlines()[0])
    assert used["zero_optimization"]["stage"] == 3 and used["train_batch_size"] == 8
    first = torchrun(2, overrides(tmp_path / "b", 3))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, overrides(tmp_path / "b", 6))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]  # bit for bit
    assert a[6] < a[1]

    from pretrain.checkpoint import load_model
    from pretrain.data.gpt_dataset import GPTDataset
    from pretrain.data.loader import SampleLoader

    model, config = load_model(tmp_path / "a/ckpt")
    valid = GPTDataset(
        config.data.path, seq_length=64, split="valid", split_ratios=config.data.split_ratios, seed=config.train.seed
    )
    # What the run evaluated: the first 2 validation micro-batches of each of its 2 DP ranks.
    batches = [
        b
        for rank in range(2)
        for b in itertools.islice(
            SampleLoader(valid, micro_batch_size=2, seed=config.train.seed, dp_rank=rank, dp_size=2), 2
        )
    ]
    with torch.no_grad():
        ours = sum(model(b["tokens"], labels=b["labels"]).item() for b in batches) / len(batches)
    lines = (tmp_path / "a/logs/metrics.jsonl").read_text().splitlines()
    logged = [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r][-1]
    assert abs(ours - logged) < 1e-5


# -- fp16 ------------------------------------------------------------------------------------


def test_fp16_trains_alike_with_and_without_zero():
    """Dynamic loss scaling on both paths (ours without ZeRO, DeepSpeed's with it): same
    initial scale, losses within fp16 rounding of each other and of fp32."""
    fp32 = baseline((), 2)
    plain = run(["train.precision=fp16"], world=2)[0]
    zero = run(["train.precision=fp16", "parallel.zero_stage=1"], world=2, fp16_on_cpu=True)[0]
    for got in (plain, zero):
        assert got["loss"] == pytest.approx(fp32["loss"], abs=2e-3)
        assert got["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=2e-2)  # unscaled correctly
        assert got["loss_scale"] == [2.0**16] * STEPS


def test_fp16_without_zero_resumes_exactly(tmp_path):
    """One process, our scaler: its state travels in meta.json's train_state."""
    from pretrain.checkpoint import load_checkpoint, read_meta, save_checkpoint
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.parallel.topology import single_process
    from pretrain.strategy import weight_dtype
    from pretrain.trainer import Trainer

    config = make_config(["train.precision=fp16", "train.global_batch_size=4", "train.steps=4"])
    topo = single_process()

    def trainer(first):
        chunks = build_model_chunks(config.model, topo, init_seed=config.train.seed, dtype=weight_dtype(config))
        data = rank_batches(global_batches(config, 4)[first - 1 :], micro=2, dp=1, dp_rank=0)
        return chunks, Trainer(config, topo, chunks, train_batches=data)

    _, straight = trainer(1)
    straight.strategy.scaler.scale, straight.strategy.scaler.hysteresis = 1024.0, 1  # as after some overflows
    expected = [straight.step(s) for s in range(1, 5)]
    chunks, first = trainer(1)
    first.strategy.scaler.scale, first.strategy.scaler.hysteresis = 1024.0, 1
    [first.step(s) for s in (1, 2)]
    save_checkpoint(
        tmp_path,
        step=2,
        state=first.strategy.checkpoint_state(),
        config=config,
        train_state={"consumed_samples": 0, **first.train_state()},
        topo=topo,
    )
    chunks, resumed = trainer(3)
    load_checkpoint(tmp_path / "step_2", state=resumed.strategy.checkpoint_state(), config=config, topo=topo)
    resumed.load_train_state(read_meta(tmp_path / "step_2")["train_state"])
    got = [resumed.step(s) for s in (3, 4)]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected[2:]]
    assert [r["loss_scale"] for r in got] == [r["loss_scale"] for r in expected[2:]] == [1024.0, 1024.0]


def test_our_loss_scaler_follows_deepspeeds_rule(monkeypatch):
    from deepspeed.runtime.fp16 import loss_scaler as ds

    from pretrain.optim import (
        LOSS_SCALE_HYSTERESIS,
        LOSS_SCALE_INIT_POWER,
        LOSS_SCALE_MIN,
        LOSS_SCALE_WINDOW,
        DynamicLossScaler,
    )

    monkeypatch.setattr(ds, "dist", SimpleNamespace(get_rank=lambda: 1))  # its log line asks for a rank
    theirs = ds.DynamicLossScaler(
        init_scale=2**LOSS_SCALE_INIT_POWER,
        scale_window=LOSS_SCALE_WINDOW,
        min_scale=LOSS_SCALE_MIN,
        delayed_shift=LOSS_SCALE_HYSTERESIS,
        consecutive_hysteresis=False,
    )
    ours = DynamicLossScaler()
    g = torch.Generator().manual_seed(0)
    overflows = (
        [False] * 2500 + [True] * 6 + [False] * 1500 + [bool(x) for x in torch.rand(3000, generator=g).lt(0.002)]
    )
    seen = set()
    for overflow in overflows:
        theirs.update_scale(overflow)
        ours.update(overflow)
        assert ours.scale == theirs.cur_scale
        seen.add(ours.scale)
    assert min(seen) < 2**16 < max(seen)  # it went up without overflows and down with them


def test_unscale_and_check_finds_overflow():
    from pretrain.optim import unscale_and_check

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad, params[1].grad = torch.full((3,), 8.0), torch.full((3,), 4.0)
    assert not unscale_and_check(params, scale=4.0)
    assert params[0].grad.tolist() == [2.0] * 3
    params[1].grad[1] = float("inf")
    assert unscale_and_check(params, scale=2.0)


# -- config ----------------------------------------------------------------------------------


def test_deepspeed_config_is_generated_from_ours():
    config = make_config(
        [
            "parallel.zero_stage=2",
            "train.precision=bf16",
            "optimizer.clip_grad=0.5",
            "parallel.bucket_mb=1",
            "parallel.offload_optimizer=true",
        ]
    )
    ds = deepspeed_config(config, data_parallel=2, accumulation=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 2**20 // 2  # bf16 elements
    fp16 = deepspeed_config(
        make_config(["parallel.zero_stage=3", "train.precision=fp16", "parallel.offload_params=true"]),
        data_parallel=1,
        accumulation=4,
    )
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic
    assert fp16["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert fp16["zero_optimization"]["stage3_param_persistence_threshold"] == 100000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.zero_stage=3", "parallel.pipeline=2"], "ZeRO-3 with parallel.pipeline > 1 is not supported"),
        (["parallel.zero_stage=2", "parallel.pipeline=2"], "ZeRO-2 with parallel.pipeline > 1 needs untied"),
        (["parallel.offload_params=true", "parallel.zero_stage=2"], "needs parallel.zero_stage=3"),
        (["parallel.offload_optimizer=true"], "needs parallel.zero_stage >= 1"),
        (["parallel.zero_stage=4"], "must be 0-3"),
    ],
)
def test_unsupported_combinations_fail_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides)


def test_precision_deepspeed_refuses_here_fails_before_any_process_group(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from pretrain.parallel.zero_config import require_deepspeed

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)  # as on this CPU
    with pytest.raises(ConfigError, match="DeepSpeed does not support fp16 on this device"):
        require_deepspeed(make_config(["parallel.zero_stage=1", "train.precision=fp16"]))
    require_deepspeed(make_config(["train.precision=fp16"]))  # without ZeRO: our own scaler


def test_supported_combinations_load():
    make_config(["parallel.zero_stage=2", "parallel.pipeline=2", "model.tie_embeddings=false"])
    make_config([*LLAMA, "parallel.zero_stage=2", "parallel.pipeline=2"])
    make_config(["parallel.zero_stage=3", "parallel.tensor=2", "parallel.offload_params=true"])
    config_from_dict({"parallel": {"zero_stage": 1, "pipeline": 2, "tensor": 2}})
