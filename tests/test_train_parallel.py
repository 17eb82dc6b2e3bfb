"""`python -m pretrain.train` under torchrun on a TP x PP grid: trains, checkpoints per rank,
resumes bit-exactly, and its checkpoint loads as the single-device model."""

import json
from pathlib import Path

import torch
from parallel_harness import torchrun

from pretrain.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]


def small(data, run_dir) -> list[str]:
    return [
        f"data.path={data['prefix']}",
        f"data.tokenizer={data['tokenizer']}",
        "model.vocab_size=2000",
        "model.num_layers=4",
        "model.hidden_size=64",
        "model.seq_length=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.log_interval=1",
        "train.eval_interval=4",
        "train.eval_iters=2",
        "schedule.warmup_steps=2",
        "schedule.decay_steps=8",
        "logging.tensorboard=false",
        "logging.peak_tflops=1",
        "parallel.tensor=2",
        "parallel.pipeline=2",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
    ]


def losses(run_dir) -> dict:
    lines = (Path(run_dir) / "logs/metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def merged_validation_loss(ckpt: Path) -> float:
    """The latest checkpoint, loaded as one single-device model, over the first two validation
    micro-batches of `small`'s run (what its last evaluation logged)."""
    from pretrain.data.gpt_dataset import GPTDataset
    from pretrain.data.loader import SampleLoader

    model, config = load_model(ckpt)
    valid = GPTDataset(
        config.data.path, seq_length=64, split="valid", split_ratios=config.data.split_ratios, seed=config.train.seed
    )
    loader = iter(SampleLoader(valid, micro_batch_size=2, seed=config.train.seed))
    with torch.no_grad():
        return sum(model(b["tokens"], labels=b["labels"]).item() for b in (next(loader) for _ in range(2))) / 2


def test_tp2_pp2_trains_resumes_and_exports(stdlib_data, tmp_path):
    straight = torchrun(4, small(stdlib_data, tmp_path / "a") + ["train.steps=8"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(4, small(stdlib_data, tmp_path / "b") + ["train.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(4, small(stdlib_data, tmp_path / "b") + ["train.steps=8"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]  # bit for bit
    assert a[8] < a[1]

    files = sorted(p.name for p in (tmp_path / "a/ckpt/step_8").iterdir())
    assert [f for f in files if f.startswith("model_")] == [
        f"model_tp{t}_pp{p}_part0.safetensors" for t in (0, 1) for p in (0, 1)
    ]

    # The merged single-device model reproduces the grid's final validation loss.
    ours = merged_validation_loss(tmp_path / "a/ckpt")
    lines = (tmp_path / "a/logs/metrics.jsonl").read_text().splitlines()
    logged = [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r][-1]
    assert abs(ours - logged) < 1e-5


def test_bad_layout_fails_before_any_process_group(stdlib_data, tmp_path):
    result = torchrun(2, small(stdlib_data, tmp_path) + ["parallel.tensor=1", "parallel.pipeline=4"])
    assert result.returncode != 0
    assert "world size 2 is not divisible by parallel.tensor x parallel.pipeline = 1 x 4" in result.stderr
