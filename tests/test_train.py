"""The trainer end to end: the shipped tiny configs learn, a resumed run is bit-identical to an
uninterrupted one, and data/config mistakes stop the run before training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_model
from pretrain.config import ConfigError, load_config
from pretrain.train import run

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def data_overrides(data, tmp_path, name="run"):
    return [
        f"data.path={data['prefix']}",
        f"data.tokenizer={data['tokenizer']}",
        f"checkpoint.dir={tmp_path}/{name}/ckpt",
        f"logging.dir={tmp_path}/{name}/logs",
    ]


@pytest.mark.parametrize("config_name", ["gpt_tiny", "llama_tiny"])
def test_tiny_config_trains_and_loss_falls(config_name, stdlib_data, tmp_path):
    """`python -m pretrain.train configs/<tiny>.yaml train.steps=40` as a user runs it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            f"configs/{config_name}.yaml",
            "train.steps=40",
            "train.eval_interval=20",
            *data_overrides(stdlib_data, tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run/logs")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= r.keys()
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1.0
    assert train[0]["peak_source"]  # which peak MFU used, so runs can be compared
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert [r["step"] for r in val] == [0, 20, 40]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.5
    assert (tmp_path / "run/ckpt/latest").read_text().strip() == "step_40"
    assert list((tmp_path / "run/logs/tensorboard").glob("events.out.tfevents.*"))
    model, config = load_model(tmp_path / "run/ckpt")
    assert config.train.steps == 40 and config.model.flavour == {"gpt_tiny": "gpt2", "llama_tiny": "llama"}[config_name]


def small(flavour):
    """A model small enough that two 40-step runs take seconds; dropout on to test RNG restore."""
    return [
        f"model.flavour={flavour}",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=4",
        f"model.num_kv_heads={2 if flavour == 'llama' else 4}",
        "model.seq_length=64",
        "model.vocab_size=2000",
        "model.dropout=0.1",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.log_interval=1",
        "train.eval_interval=10",
        "train.eval_iters=2",
        "schedule.warmup_steps=5",
        "schedule.decay_steps=40",
        "logging.tensorboard=false",
        "logging.peak_tflops=1",
    ]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_resume_is_bit_exact(flavour, stdlib_data, tmp_path):
    config = "configs/gpt_tiny.yaml"
    straight = small(flavour) + data_overrides(stdlib_data, tmp_path, "straight")
    run(load_config(config, straight + ["train.steps=40"]))
    resumed = small(flavour) + data_overrides(stdlib_data, tmp_path, "resumed")
    run(load_config(config, resumed + ["train.steps=20"]))
    assert (tmp_path / "resumed/ckpt/latest").read_text().strip() == "step_20"
    run(load_config(config, resumed + ["train.steps=40"]))

    def losses(name):
        return {
            r["step"]: (r["loss"], r["grad_norm"], r["lr"])
            for r in read_metrics(tmp_path / name / "logs")
            if "loss" in r
        }

    a, b = losses("straight"), losses("resumed")
    assert sorted(b) == list(range(1, 41))
    for step in range(21, 41):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"  # to the last bit
    model_a, _ = load_model(tmp_path / "straight/ckpt")
    model_b, _ = load_model(tmp_path / "resumed/ckpt")
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_gradient_accumulation_matches_one_big_batch(stdlib_data, tmp_path):
    """micro 2 x 4 accumulation steps == micro 8 x 1 (same samples, mean over the global batch)."""
    base = small("llama") + ["model.dropout=0.0", "train.steps=3", "train.eval_interval=0", "optimizer.clip_grad=0"]
    run(
        load_config(
            "configs/gpt_tiny.yaml",
            base + ["train.micro_batch_size=2"] + data_overrides(stdlib_data, tmp_path, "accum"),
        )
    )
    run(
        load_config(
            "configs/gpt_tiny.yaml", base + ["train.micro_batch_size=8"] + data_overrides(stdlib_data, tmp_path, "big")
        )
    )
    a = [r["loss"] for r in read_metrics(tmp_path / "accum/logs") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "big/logs") if "loss" in r]
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_callbacks_see_every_step_and_its_record(stdlib_data, tmp_path):
    """What a user adds to the loop (a profiler, a logger) is a callback(step, record)."""
    seen = []
    overrides = small("llama") + ["train.steps=4", "train.log_interval=2", "checkpoint.interval=2"]
    last = run(
        load_config("configs/gpt_tiny.yaml", overrides + data_overrides(stdlib_data, tmp_path)),
        callbacks=[lambda step, record: seen.append((step, record["loss"], record["lr"]))],
    )
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    logged = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run/logs") if "loss" in r}
    assert {s: loss for s, loss, _ in seen if s in logged} == logged and last["step"] == 4


def test_exit_after_minutes_saves_and_stops(stdlib_data, tmp_path):
    overrides = small("gpt2") + ["train.steps=1000", "train.exit_after_minutes=0.0001"]
    last = run(load_config("configs/gpt_tiny.yaml", overrides + data_overrides(stdlib_data, tmp_path)))
    assert last["stopped"] == "time limit"
    assert (tmp_path / "run/ckpt/latest").read_text().strip() == f"step_{last['step']}"
    assert last["step"] < 1000


def test_signal_saves_exits_resumable_and_resumes_exactly(stdlib_data, tmp_path):
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: the run finishes its step,
    saves, exits with 75; started again it resumes there and ends as an uninterrupted run."""
    import signal
    import time

    from pretrain.stopping import EXIT_RESUMABLE

    def command(name):
        return [
            sys.executable,
            "-m",
            "pretrain.train",
            "configs/gpt_tiny.yaml",
            *small("gpt2"),
            "train.steps=30",
            "model.dropout=0.0",
            *data_overrides(stdlib_data, tmp_path, name),
        ]

    straight = subprocess.run(command("straight"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        name = f"stopped_{sig.name}"
        proc = subprocess.Popen(command(name), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = tmp_path / name / "logs/metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len([r for r in read_metrics(metrics.parent) if "loss" in r]) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == EXIT_RESUMABLE, err[-3000:]
        assert f"stopped early ({sig.name})" in out
        stopped_at = int((tmp_path / name / "ckpt/latest").read_text().strip()[5:])
        assert 3 <= stopped_at < 30
        again = subprocess.run(command(name), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {tmp_path / name / 'ckpt'}/step_{stopped_at}" in again.stdout
        a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight/logs") if "loss" in r}
        b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "logs") if "loss" in r}
        assert sorted(b) == list(range(1, 31))
        assert [b[s] for s in range(stopped_at + 1, 31)] == [a[s] for s in range(stopped_at + 1, 31)]


def test_missing_data_and_small_vocab_fail_before_training(stdlib_data, tmp_path):
    base = ["train.steps=1"] + data_overrides(stdlib_data, tmp_path)
    with pytest.raises(ConfigError, match=r"data.path: .*nowhere.bin does not exist"):
        run(load_config("configs/gpt_tiny.yaml", base + [f"data.path={tmp_path}/nowhere"]))
    with pytest.raises(ConfigError, match="model.vocab_size: 1000 is smaller than the tokenizer"):
        run(load_config("configs/gpt_tiny.yaml", base + ["model.vocab_size=1000"]))
    with pytest.raises(ConfigError, match="global_batch_size"):
        run(load_config("configs/gpt_tiny.yaml", base + ["train.global_batch_size=12"]))
    assert not (tmp_path / "run/ckpt").exists()


def test_masked_lm_objective_trains_bidirectional_model(stdlib_data, tmp_path):
    overrides = small("llama") + [
        "data.objective=masked",
        "model.bidirectional=true",
        "model.dropout=0.0",
        "train.steps=30",
        "optimizer.lr=3e-3",
    ]
    last = run(load_config("configs/gpt_tiny.yaml", overrides + data_overrides(stdlib_data, tmp_path)))
    records = [r for r in read_metrics(tmp_path / "run/logs") if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert "val_loss" in last
    model, config = load_model(tmp_path / "run/ckpt")
    tokens = torch.randint(0, 2000, (1, 64))
    changed = tokens.clone()
    changed[0, 40] = (changed[0, 40] + 1) % 2000
    assert not torch.allclose(model(tokens)[:, :40], model(changed)[:, :40])  # sees later tokens
    with pytest.raises(ConfigError, match="model.bidirectional"):
        load_config("configs/gpt_tiny.yaml", ["data.objective=masked"])


def test_blended_data_path_trains(stdlib_data, tmp_path):
    prefix = stdlib_data["prefix"]
    overrides = small("gpt2") + ["train.steps=5", f"data.path=0.7 {prefix} 0.3 {prefix}_copy"]
    for suffix in (".bin", ".idx"):
        Path(prefix + "_copy" + suffix).write_bytes(Path(prefix + suffix).read_bytes())
    with pytest.raises(ConfigError, match="data.path"):
        load_config("configs/gpt_tiny.yaml", ["data.path=0.7 a 0.3"])
    run(load_config("configs/gpt_tiny.yaml", overrides + data_overrides(stdlib_data, tmp_path)[1:]))
    assert (tmp_path / "run/ckpt/latest").read_text().strip() == "step_5"
