"""Checkpoint save/load on one process: round trips (synchronous and in the background), atomic
publication under failures and kills, pruning, safe loading and clear errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    SavedCheckpoint,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from pretrain.checkpoint import files as ckfiles
from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"flavour": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 100, "seq_length": 16}


def setup(**checkpoint):
    config = config_from_dict({"model": MODEL, "checkpoint": checkpoint})
    torch.manual_seed(0)
    model = GPT(config.model)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    model(torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16))).backward()
    optimizer.step()
    return config, model, optimizer


def save(root, step, config, model, optimizer):
    return save_checkpoint(
        root, step=step, model=model, optimizer=optimizer, config=config, train_state={"consumed_samples": 8 * step}
    )


def optimizer_states(optimizer):
    """name-independent view: parameter index -> state, in parameter order."""
    return optimizer.state_dict()["state"]


@pytest.mark.parametrize("async_save", [False, True])
def test_save_load_round_trip(tmp_path, async_save):
    config, model, optimizer = setup()
    saved_rng = torch.get_rng_state()
    saver = Checkpointer(tmp_path, config, async_save=async_save)
    path = saver.save(5, model=model, optimizer=optimizer, train_state={"consumed_samples": 40})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # training goes on while the background write runs
        for p in model.parameters():
            p.add_(1.0)
    saver.wait()
    assert path == tmp_path / "step_5" and (tmp_path / "latest").read_text().strip() == "step_5"
    assert resolve_checkpoint(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "meta.json",
        "model_tp0_pp0_part0.safetensors",
        "optimizer_tp0_pp0_part0.safetensors",
        "rng_rank0.pt",
    ]
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config == config
    for name, p in loaded.named_parameters():  # the snapshot, not the weights changed afterwards
        assert torch.equal(p, before[name]), name

    torch.manual_seed(1)
    fresh = GPT(config.model)
    fresh_opt = build_optimizer(fresh.parameters(), config.optimizer)
    torch.rand(3)
    meta = load_checkpoint(path, model=fresh, optimizer=fresh_opt, config=config)
    assert meta["step"] == 5 and meta["train_state"]["consumed_samples"] == 40
    assert torch.equal(torch.get_rng_state(), saved_rng)  # RNG restored to the saved state
    ours, theirs = optimizer_states(fresh_opt), optimizer_states(optimizer)
    assert sorted(ours) == sorted(theirs)
    for index in theirs:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours[index][key], theirs[index][key])


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_save_keeps_previous_latest(tmp_path, monkeypatch, async_save):
    config, model, optimizer = setup()
    save(tmp_path, 1, config, model, optimizer)
    real = ckfiles.write_safetensors
    calls = {"n": 0}

    def failing(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # die while writing the optimizer state
            raise OSError("disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr("pretrain.checkpoint.state.write_safetensors", failing)
    saver = Checkpointer(tmp_path, config, async_save=async_save)
    # One failed save is reported and counted, not raised (two in a row raise CheckpointSaveError:
    # tests/test_checkpoint_integrity.py).
    saver.save(2, model=model, optimizer=optimizer, train_state={})
    saver.wait()
    assert saver.failures == 1 and "disk full" in saver.last_error
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert not (tmp_path / "step_2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    load_model(tmp_path)  # still loadable
    monkeypatch.setattr("pretrain.checkpoint.state.write_safetensors", real)
    saver.save(2, model=model, optimizer=optimizer, train_state={})  # and the next save works
    saver.wait()
    assert (tmp_path / "latest").read_text().strip() == "step_2"


def test_keep_last_deletes_only_after_a_newer_one_is_complete(tmp_path):
    config, model, optimizer = setup(keep_last=2)
    saver = Checkpointer(tmp_path, config, async_save=True)
    for step in (1, 2, 3):
        saver.save(step, model=model, optimizer=optimizer, train_state={})
        # step N-2 goes only when step N is published: while N is written, 2 complete remain
        assert len([p for p in tmp_path.glob("step_*") if (p / "meta.json").exists()]) >= min(step - 1, 2)
    saver.wait()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_2", "step_3"]


def test_bad_checkpoints_fail_clearly(tmp_path):
    config, model, optimizer = setup()
    path = save(tmp_path, 1, config, model, optimizer)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "nothing")

    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(path)
    (path / "meta.json").write_text(json.dumps(meta))

    bigger = config_from_dict({"model": {**MODEL, "num_layers": 2}})
    model2 = GPT(bigger.model)
    with pytest.raises(CheckpointError, match=r"model.num_layers: checkpoint 1, this run 2"):
        load_checkpoint(
            path, model=model2, optimizer=build_optimizer(model2.parameters(), bigger.optimizer), config=bigger
        )

    weights = path / "model_tp0_pp0_part0.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model_tp0_pp0_part0.safetensors"):
        load_model(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model_tp0_pp0_part0.safetensors is missing"):
        load_model(path)
    weights.write_bytes(data)

    (tmp_path / "latest").write_text("step_7\n")
    with pytest.raises(CheckpointError, match="step_7"):
        load_model(tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    config, model, optimizer = setup()
    path = save(tmp_path, 1, config, model, optimizer)
    torch.save({"torch": Evil()}, path / "rng_rank0.pt")
    # A forger updates the checksum too (CRC-32 is no defence against one): weights_only is.
    meta = json.loads((path / "meta.json").read_text())
    data = (path / "rng_rank0.pt").read_bytes()
    meta["checksums"]["rng_rank0.pt"] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path, model=model, optimizer=optimizer, config=config)


# -- kills ------------------------------------------------------------------------------------

SAVER = r"""
import sys, torch
from pretrain.checkpoint import Checkpointer
from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer

config = config_from_dict({"model": {"flavour": "llama", "num_layers": 4, "hidden_size": 256, "num_heads": 4,
                                     "vocab_size": 4000}, "checkpoint": {"keep_last": 2}})
model = GPT(config.model, init_seed=0)
optimizer = build_optimizer(model.parameters(), config.optimizer)
for p in model.parameters():
    optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
saver = Checkpointer(sys.argv[1], config, async_save=sys.argv[2] == "async")
start = int(sys.argv[3])
print("ready", flush=True)
for step in range(start, start + 1000):
    with torch.no_grad():  # every tensor of step N holds the value N: a mix of steps is detectable
        for p in model.parameters():
            p.fill_(step)
            optimizer.state[p]["exp_avg"].fill_(step)
            optimizer.state[p]["step"].fill_(step)
    saver.save(step, model=model, optimizer=optimizer, train_state={"consumed_samples": step})
"""


def check_latest_is_whole(root: Path) -> int:
    saved = SavedCheckpoint(root)
    step = saved.meta["step"]
    assert saved.meta["train_state"]["consumed_samples"] == step
    for name in saved.names:
        assert torch.all(saved.full(name) == step), name
        assert torch.all(saved.full(name, "exp_avg") == step), name
        assert float(saved.full(name, "step")) == step
    model, _ = load_model(root)
    assert all(torch.all(p == step) for p in model.parameters())
    return step


def test_kill_at_random_moments_leaves_a_loadable_latest(tmp_path):
    """SIGKILL a process that saves checkpoints back to back (~12 MB each, synchronous and in
    the background, keep_last=2), at random moments, 8 times over the same directory: each time
    `latest` names a whole checkpoint of one step, and the next process saves on from there."""
    rng = random.Random(0)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    last, published = 0, []
    for trial in range(8):
        mode = "async" if trial % 2 else "sync"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), mode, str(last + 1)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (root / "latest").exists():
            last = check_latest_is_whole(root)
            published.append(last)
    assert len(published) >= 6 and published == sorted(published) and published[-1] > 2
    complete = [p for p in root.glob("step_*") if (p / "meta.json").exists()]
    assert len(complete) <= 3  # keep_last=2, plus at most one published just before the kill
