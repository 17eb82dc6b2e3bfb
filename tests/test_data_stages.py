"""data.stages: the config and its errors, each stage's samples (megatron-core's rules, seed
train.seed + stage), the switch at the same step on every data-parallel rank, and a run resumed
on both sides of a stage boundary that matches an uninterrupted one bit for bit."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from test_train import data_overrides, read_metrics, small

from pretrain.config import ConfigError, config_from_dict, load_config, to_dict
from pretrain.data import setup
from pretrain.data.builder import build_datasets
from pretrain.data.setup import build_data, check_data
from pretrain.parallel.topology import CPU, Topology, single_process
from pretrain.train import run

STAGES_AT_6 = "[{{path: {a}, start_step: 0}}, {{path: '0.3 {a} 0.7 {b}', start_fraction: 0.5}}]"


@pytest.fixture(scope="module")
def two_prefixes(stdlib_data, tmp_path_factory) -> dict:
    """The stdlib dataset under a second name, so a blend of the two differs from either."""
    other = tmp_path_factory.mktemp("other") / "other_text_document"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(stdlib_data["prefix"] + suffix, str(other) + suffix)
    return {**stdlib_data, "a": stdlib_data["prefix"], "b": str(other)}


def staged(data, *extra) -> list[str]:
    return [
        "data.path=",  # over the config file's
        f"data.stages={STAGES_AT_6.format(a=data['a'], b=data['b'])}",
        f"data.tokenizer={data['tokenizer']}",
        *extra,
    ]


def config(overrides):
    return config_from_dict({}, ["model.vocab_size=2000", "model.seq_length=64", "train.steps=12", *overrides])


# --- the config ---------------------------------------------------------------------------------


def test_stages_from_yaml_text_or_indexed_overrides_and_back():
    text = config(["data.stages=[{path: A, start_step: 0}, {path: '0.5 A 0.5 B', start_fraction: 0.75}]"])
    indexed = config(
        [
            "data.stages.0.path=A",
            "data.stages.0.start_step=0",
            "data.stages.1.path=0.5 A 0.5 B",
            "data.stages.1.start_step=9",
        ]
    )
    assert text.data.stage_plan(12) == indexed.data.stage_plan(12) == [(0, "A"), (9, "0.5 A 0.5 B")]
    assert config_from_dict(to_dict(text)).data == text.data  # as a checkpoint's config.yaml reloads
    assert config(["data.path=A"]).data.stage_plan(12) == [(0, "A")]  # data.path: one stage


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            "[{path: A, start_step: 3}]",
            "data.stages.0: the first stage must start at step 0 (start_step: 0), got step 3",
        ),
        (
            "[{path: A, start_step: 0}, {path: B, start_step: 6}, {path: C, start_fraction: 0.5}]",
            "data.stages.2: starts at step 6 (start_fraction 0.5 of train.steps=12), not after data.stages.1's "
            "step 6: stages must start at increasing steps",
        ),
        (
            "[{path: A, start_step: 0}, {path: B, start_step: 12}]",
            "data.stages.1: starts at step 12, but the run ends at train.steps=12: the stage would never train",
        ),
        ("[{path: A, start_step: 0}, {path: B}]", "data.stages.1: give exactly one of start_step"),
        ("[{path: A, start_step: 0}, {path: B, start_step: 3, start_fraction: 0.5}]", "give exactly one of"),
        ("[{path: A, start_step: 0}, {path: B, start_fraction: 1.0}]", "data.stages.1.start_fraction: must be in"),
        ("[{path: A, start_step: -1}]", "data.stages.0.start_step: must be >= 0, got -1"),
        (
            "[{path: A, start_step: 0}, {path: '0.5 B C', start_step: 3}]",
            "data.stages.1.path: the blend '0.5 B C' has 3 words",
        ),
        ("[{path: '', start_step: 0}]", "data.stages.0.path: is empty"),
        ("[{path: A, start: 0}]", "data.stages.0.start: unknown key; valid keys under 'data.stages.0' are path"),
        ("{path: A}", "data.stages: expected a list"),
    ],
)
def test_bad_stages_are_refused_naming_the_stage(stages, message):
    with pytest.raises(ConfigError) as e:
        config([f"data.stages={stages}"])
    assert message in str(e.value)


def test_data_path_and_stages_together_are_refused():
    with pytest.raises(ConfigError, match="data.path and data.stages are both set"):
        config(["data.path=A", "data.stages=[{path: A, start_step: 0}]"])


def test_a_missing_stage_prefix_fails_before_training(two_prefixes, tmp_path):
    c = config(staged({**two_prefixes, "b": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match=r"data.stages.1.path: .*nope.bin does not exist"):
        check_data(c)


# --- the samples -------------------------------------------------------------------------------


def topology(rank: int, dp: int) -> Topology:
    return Topology(world_size=dp, rank=rank, tp=1, pp=1, dp=dp, virtual_stages=1, sequence_parallel=False, device=CPU)


def stage_config(data):
    return config(staged(data, "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_iters=2"))


def test_each_stage_is_the_blend_megatron_builds_for_its_steps(two_prefixes):
    c = stage_config(two_prefixes)
    data = build_data(c, single_process())
    split = c.data.split_ratios
    stage_b = build_datasets(
        f"0.3 {two_prefixes['a']} 0.7 {two_prefixes['b']}",
        seq_length=64,
        seed=c.train.seed + 1,
        split_ratios=split,
        num_samples={"train": 6 * 8},
    )["train"]
    alone = build_datasets(
        two_prefixes["a"],
        seq_length=64,
        seed=c.train.seed,
        split_ratios=split,
        num_samples={"train": 6 * 8, "valid": 4},
    )
    seen = []
    for step in range(1, 13):
        data.train.begin_step(step)
        seen += [next(data.train)["tokens"] for _ in range(4)]  # 4 micro-batches of 2 = the global batch
    want = [alone["train"][k] for k in range(48)] + [stage_b[k] for k in range(48)]
    assert np.array_equal(torch.cat(seen).numpy(), np.stack(want)[:, :-1])
    assert data.train.consumed_samples == 96
    # Validation reads the first stage's split, as a run on data.path alone does.
    assert np.array_equal(data.valid.get_batch(np.arange(2)), alone["valid"].get_batch(np.arange(2)))


def test_two_data_parallel_ranks_switch_at_the_same_step(two_prefixes, monkeypatch):
    monkeypatch.setattr(setup.dist, "barrier", lambda: None)  # both ranks are built in this process
    c = stage_config(two_prefixes)
    one = build_data(c, single_process()).train
    ranks = [build_data(c, topology(r, 2)).train for r in (0, 1)]
    for step in (5, 6, 7, 8):
        for loader in (one, *ranks):
            loader.begin_step(step)
        for _ in range(2):  # each rank: 2 micro-batches of 2 = half the global batch
            expected = torch.cat([next(one)["tokens"], next(one)["tokens"]])
            got = torch.cat([next(ranks[0])["tokens"], next(ranks[1])["tokens"]])
            assert torch.equal(got, expected), step
        assert [r.active for r in ranks] == [one.active] * 2 == [0 if step <= 6 else 1] * 2


def test_a_checkpoint_without_stages_is_the_first_stage_and_changed_stages_say_so(two_prefixes):
    c = stage_config(two_prefixes)
    loader = build_data(c, single_process()).train
    loader.load_state_dict({"consumed_samples": 40})  # saved before data.stages existed
    assert [stage_loader.consumed_samples for stage_loader in loader.loaders] == [40, 0]
    said = []
    saved = [
        {"start": 0, "path": two_prefixes["a"], "consumed_samples": 48},
        {"start": 6, "path": "X", "consumed_samples": 8},
    ]
    loader.load_state_dict({"consumed_samples": 56, "data_stages": saved}, warn=said.append)
    assert [stage_loader.consumed_samples for stage_loader in loader.loaders] == [48, 0]
    assert said and "the stage from step 6 on X (8 samples read) is no longer configured" in said[0]
    with pytest.raises(ValueError, match="no consumed_samples"):
        loader.load_state_dict({"guard": {}})


# --- a run resumed across the boundary -------------------------------------------------------------


def stop_after(step: int):
    """A callback that sends this process SIGUSR1 after `step`: the run stops after the next
    step and saves, as a preempted job does."""

    def callback(at, record):
        if at == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    return callback


def test_resume_across_the_stage_boundary_is_bit_exact(two_prefixes, tmp_path, capsys):
    def overrides(name):
        return [*small("gpt2"), *data_overrides(two_prefixes, tmp_path, name), *staged(two_prefixes)]

    def losses(name):
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name / "logs") if "loss" in r}

    straight = load_config("configs/gpt_tiny.yaml", [*overrides("straight"), "train.steps=12"])
    run(straight)
    assert "step 7: data stage 2 of 2 (steps 7-12): 0.3 " in capsys.readouterr().out
    resumed = load_config("configs/gpt_tiny.yaml", [*overrides("resumed"), "train.steps=12"])
    assert run(resumed, callbacks=[stop_after(3)])["stopped"] == "SIGUSR1"  # at step 4: stage 1
    assert run(resumed, callbacks=[stop_after(8)])["stopped"] == "SIGUSR1"  # at step 9: stage 2
    out = capsys.readouterr().out
    assert "step 1: data stage 1 of 2" in out and "resumed from" in out
    assert "step 5: data stage 1 of 2" in out and "step 7: data stage 2 of 2" in out
    meta = json.loads((tmp_path / "resumed/ckpt/step_9/meta.json").read_text())["train_state"]
    assert meta["consumed_samples"] == 9 * 8
    assert [(s["start"], s["consumed_samples"]) for s in meta["data_stages"]] == [(0, 6 * 8), (6, 3 * 8)]
    run(resumed)
    assert "step 10: data stage 2 of 2" in capsys.readouterr().out

    a, b = losses("straight"), losses("resumed")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"  # to the last bit


def test_two_data_parallel_ranks_train_the_stages_as_one_process(two_prefixes, tmp_path):
    """torchrun with DP=2 across the boundary: the losses of one process, to rounding."""
    from parallel_harness import torchrun

    def overrides(name):
        return [
            *small("llama"),
            *data_overrides(two_prefixes, tmp_path, name),
            *staged(two_prefixes),
            "model.dropout=0.0",  # dropout streams follow the micro-batch order, which DP changes
            "train.micro_batch_size=2",
            "train.steps=12",
        ]

    ranks = torchrun(2, overrides("dp2"))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "step 7: data stage 2 of 2" in ranks.stdout
    run(load_config("configs/llama_tiny.yaml", overrides("one")))
    dp2 = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "dp2/logs") if "loss" in r}
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one/logs") if "loss" in r}
    assert sorted(dp2) == sorted(one) == list(range(1, 13))
    assert max(abs(dp2[s] - one[s]) for s in one) < 2e-5
