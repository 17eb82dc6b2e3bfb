"""Checkpoint save/load: atomic publication, safe loading, clear errors."""

import json

import pytest
import torch

from pretrain.checkpoint import (CheckpointError, load_checkpoint, load_model, prune_checkpoints,
                                 resolve_checkpoint, save_checkpoint)
from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer


def setup():
    config = config_from_dict({"model": {"flavour": "llama", "num_layers": 1, "hidden_size": 32,
                                         "num_heads": 2, "vocab_size": 100, "seq_length": 16}})
    torch.manual_seed(0)
    model = GPT(config.model)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    model(torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16))).backward()
    optimizer.step()
    return config, model, optimizer


def save(root, step, config, model, optimizer):
    return save_checkpoint(root, step=step, model=model, optimizer=optimizer, config=config,
                           train_state={"consumed_samples": 8 * step})


def test_save_load_round_trip(tmp_path):
    config, model, optimizer = setup()
    saved_rng = torch.get_rng_state()
    path = save(tmp_path, 5, config, model, optimizer)
    assert path == tmp_path / "step_5" and (tmp_path / "latest").read_text().strip() == "step_5"
    assert resolve_checkpoint(tmp_path) == path
    loaded, loaded_config = load_model(tmp_path)
    tokens = torch.randint(0, 100, (2, 16))
    assert torch.equal(loaded(tokens), model.eval()(tokens))
    assert loaded_config == config

    torch.manual_seed(1)
    fresh = GPT(config.model)
    fresh_opt = build_optimizer(fresh.parameters(), config.optimizer)
    torch.rand(3)
    meta = load_checkpoint(path, model=fresh, optimizer=fresh_opt, config=config)
    assert meta["step"] == 5 and meta["train_state"]["consumed_samples"] == 40
    assert torch.equal(torch.get_rng_state(), saved_rng)  # RNG restored to the saved state
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    for a, b in zip(fresh_opt.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_crash_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    config, model, optimizer = setup()
    save(tmp_path, 1, config, model, optimizer)
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:  # die while writing the optimizer state
            raise OSError("disk full")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save(tmp_path, 2, config, model, optimizer)
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert not (tmp_path / "step_2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    load_model(tmp_path)  # still loadable


def test_keep_last(tmp_path):
    config, model, optimizer = setup()
    for step in (1, 2, 3):
        save(tmp_path, step, config, model, optimizer)
        prune_checkpoints(tmp_path, keep_last=2)
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

    other = config_from_dict({"model": {"flavour": "llama", "num_layers": 1, "hidden_size": 32,
                                        "num_heads": 2, "vocab_size": 100, "seq_length": 16},
                              "parallel": {"tensor": 2}})
    with pytest.raises(CheckpointError, match="layout"):
        load_checkpoint(path, model=model, optimizer=optimizer, config=other)

    bigger = GPT(config_from_dict({"model": {"flavour": "llama", "num_layers": 2, "hidden_size": 32,
                                             "num_heads": 2, "vocab_size": 100}}).model)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path, model=bigger, optimizer=build_optimizer(bigger.parameters(), config.optimizer), config=config)

    (tmp_path / "latest").write_text("step_7\n")
    with pytest.raises(CheckpointError, match="step_7"):
        load_model(tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    config, model, optimizer = setup()
    path = save(tmp_path, 1, config, model, optimizer)
    torch.save({"state": {"weights": Evil()}}, path / "model_tp0_pp0.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_model(path)
    (path / "model_tp0_pp0.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(path)
