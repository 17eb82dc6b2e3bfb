"""Checkpoint integrity: every file's checksum is stored at save and verified on load, a damaged
newest checkpoint falls back to the previous complete one (on every rank together), and a failed
save is reported at once, keeps the previous checkpoint and is retried; two failures in a row,
or a failed last save, raise CheckpointSaveError. Real saves of a tiny model; 2 gloo ranks."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from parallel_harness import run_ranks

from pretrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    CorruptCheckpointError,
    checkpoint_candidates,
    find_resume_checkpoint,
    load_checkpoint,
    load_model,
    load_newest_intact,
    reshard_checkpoint,
    save_checkpoint,
)
from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer

MODEL = {"flavour": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 100, "seq_length": 16}
MODEL_FILE, OPTIMIZER_FILE = "model_tp0_pp0_part0.safetensors", "optimizer_tp0_pp0_part0.safetensors"


def setup(**checkpoint):
    config = config_from_dict({"model": MODEL, "checkpoint": checkpoint})
    torch.manual_seed(0)
    model = GPT(config.model)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    train_step(model, optimizer)
    return config, model, optimizer


def train_step(model, optimizer) -> None:
    model(torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16))).backward()
    optimizer.step()
    optimizer.zero_grad()


def fresh(config):
    torch.manual_seed(123)
    model = GPT(config.model)
    return model, build_optimizer(model.parameters(), config.optimizer)


def flip_byte(path: Path, from_end: int = 10) -> None:
    """One bit of one byte of the tensor data (near the end: past the header) flipped."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x01
    path.write_bytes(bytes(data))


def state(model, optimizer) -> dict:
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for index, s in optimizer.state_dict()["state"].items():
        out.update({f"opt/{index}/{k}": v.clone() for k, v in s.items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- checksums ----------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_every_file_has_its_checksum_in_meta(tmp_path, async_save):
    config, model, optimizer = setup()
    saver = Checkpointer(tmp_path, config, async_save=async_save)
    path = saver.save(3, model=model, optimizer=optimizer, train_state={"consumed_samples": 24})
    saver.finish()
    sums = json.loads((path / "meta.json").read_text())["checksums"]
    files = sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert sorted(sums) == files == ["config.yaml", MODEL_FILE, OPTIMIZER_FILE, "rng_rank0.pt"]
    for name, entry in sums.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    assert saver.stats["failed"] == 0.0 and saver.stats["written_bytes"] > 0

    # The offline writer (tools/reshard_checkpoint, convert_from_hf) records them too.
    out = reshard_checkpoint(path, tmp_path / "resharded", ["parallel.tensor=1"], data_parallel=2)
    sums = json.loads((out / "meta.json").read_text())["checksums"]
    assert sorted(sums) == sorted(p.name for p in out.iterdir() if p.name != "meta.json")
    for name, entry in sums.items():
        assert entry["crc32"] == f"{zlib.crc32((out / name).read_bytes()):08x}", name
    load_model(out)


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, "rng_rank0.pt", "config.yaml"])
def test_a_flipped_byte_raises_corrupt_checkpoint_error_naming_the_file(tmp_path, name):
    config, model, optimizer = setup()
    path = save_checkpoint(
        tmp_path, step=1, model=model, optimizer=optimizer, config=config, train_state={"consumed_samples": 8}
    )
    if name == "config.yaml":  # a change YAML still reads: only the checksum can tell
        text = (path / name).read_text()
        (path / name).write_text(text.replace("seed: 1234", "seed: 1235", 1))
        assert (path / name).read_text() != text
    else:
        flip_byte(path / name)
    model2, optimizer2 = fresh(config)
    with pytest.raises(CorruptCheckpointError) as caught:
        load_checkpoint(path, model=model2, optimizer=optimizer2, config=config)
    error = caught.value
    assert error.step_dir == path and error.file == path / name
    assert str(path) in str(error) and name in str(error) and "checksum" in str(error)
    assert isinstance(error, CheckpointError)
    if name in (MODEL_FILE, "config.yaml"):  # what load_model reads
        with pytest.raises(CorruptCheckpointError, match=name):
            load_model(path)


def test_a_truncated_file_is_named_before_it_is_read(tmp_path):
    config, model, optimizer = setup()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, config=config, train_state={})
    data = (path / OPTIMIZER_FILE).read_bytes()
    (path / OPTIMIZER_FILE).write_bytes(data[:-4])
    with pytest.raises(CorruptCheckpointError, match=rf"{OPTIMIZER_FILE} has {len(data) - 4} bytes, {len(data)} "):
        load_checkpoint(path, model=model, optimizer=optimizer, config=config)


def test_checkpoints_without_checksums_still_load(tmp_path):
    """Written before checksums existed: loaded unverified (a flipped bit goes unnoticed)."""
    config, model, optimizer = setup()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, config=config, train_state={})
    meta = json.loads((path / "meta.json").read_text())
    del meta["checksums"]
    (path / "meta.json").write_text(json.dumps(meta))
    flip_byte(path / MODEL_FILE)
    model2, optimizer2 = fresh(config)
    assert load_checkpoint(path, model=model2, optimizer=optimizer2, config=config)["step"] == 1
    load_model(path)


# -- falling back ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [MODEL_FILE, OPTIMIZER_FILE, "rng_rank0.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, bad):
    """The damaged file is found after the weights (optimizer) or everything else (RNG) were
    already loaded from it: the fallback must overwrite all of that."""
    config, model, optimizer = setup()
    save_checkpoint(
        tmp_path, step=1, model=model, optimizer=optimizer, config=config, train_state={"consumed_samples": 8}
    )
    train_step(model, optimizer)
    torch.rand(5)  # a different RNG state in step 2
    save_checkpoint(
        tmp_path, step=2, model=model, optimizer=optimizer, config=config, train_state={"consumed_samples": 16}
    )
    flip_byte(tmp_path / "step_2" / bad)

    candidates = checkpoint_candidates(tmp_path, find_resume_checkpoint(str(tmp_path), "auto"))
    assert candidates == [tmp_path / "step_2", tmp_path / "step_1"]
    model2, optimizer2 = fresh(config)
    said = []
    chosen, meta = load_newest_intact(candidates, model=model2, optimizer=optimizer2, config=config, warn=said.append)
    assert chosen == tmp_path / "step_1" and meta["step"] == 1 and meta["train_state"]["consumed_samples"] == 8
    assert len(said) == 1 and str(tmp_path / "step_2" / bad) in said[0] and "step_1" in said[0]
    got, rng = state(model2, optimizer2), torch.get_rng_state()

    model3, optimizer3 = fresh(config)
    load_checkpoint(tmp_path / "step_1", model=model3, optimizer=optimizer3, config=config)
    assert_same(got, state(model3, optimizer3))
    assert torch.equal(rng, torch.get_rng_state())


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    config, model, optimizer = setup()
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=optimizer, config=config, train_state={})
        flip_byte(tmp_path / f"step_{step}" / MODEL_FILE)
    said = []
    with pytest.raises(CheckpointError, match="no intact checkpoint") as caught:
        load_newest_intact(
            checkpoint_candidates(tmp_path, tmp_path / "step_2"),
            model=model,
            optimizer=optimizer,
            config=config,
            warn=said.append,
        )
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert len(said) == 2 and "step_1" in str(caught.value) and "step_2" in str(caught.value)
    # Not damage: a different model fails at once, without trying older checkpoints.
    other = config_from_dict({"model": {**MODEL, "num_layers": 2}})
    model2, optimizer2 = fresh(other)
    with pytest.raises(CheckpointError, match="model.num_layers"):
        load_newest_intact([tmp_path / "step_2"], model=model2, optimizer=optimizer2, config=other)


# -- failed saves -------------------------------------------------------------------------------


def fail_with(monkeypatch, where: str, error: OSError, times: int) -> dict:
    """Make the saver's write (or publish) raise `error` the next `times` calls."""
    import pretrain.checkpoint.saver as saver_module
    import pretrain.checkpoint.state as state_module

    saver_module = state_module if where == "write_safetensors" else saver_module  # shards write themselves
    real = getattr(saver_module, where)
    left = {"n": times}

    def failing(*args, **kwargs):
        if left["n"] > 0:
            left["n"] -= 1
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(saver_module, where, failing)
    return left


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "where, error",
    [
        ("write_safetensors", OSError(28, "No space left on device")),
        ("publish", PermissionError(13, "Permission denied")),
    ],
    ids=["disk_full", "permission"],
)
def test_a_failed_save_is_reported_keeps_latest_and_is_retried(tmp_path, monkeypatch, capfd, async_save, where, error):
    config, model, optimizer = setup()
    saver = Checkpointer(tmp_path, config, async_save=async_save)
    saver.save(1, model=model, optimizer=optimizer, train_state={})
    saver.wait()
    capfd.readouterr()
    fail_with(monkeypatch, where, error, times=1)
    saver.save(2, model=model, optimizer=optimizer, train_state={})
    saver.wait()  # one failure: reported, not raised
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "step 2" in lines[0] and "rank 0" in lines[0] and error.strerror in lines[0]
    assert str(tmp_path / "step_1") in lines[0] and "retried" in lines[0]
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert not (tmp_path / "step_2").exists() and leftovers(tmp_path) == []
    assert saver.failures == 1 and error.strerror in saver.last_error and saver.stats["failed"] == 1.0

    saver.save(3, model=model, optimizer=optimizer, train_state={})  # the retry at the next interval
    saver.finish()
    assert (tmp_path / "latest").read_text().strip() == "step_3"
    assert saver.failures == 0 and saver.last_error is None and saver.total_failures == 1
    assert capfd.readouterr().err == ""
    load_model(tmp_path)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_two_failed_saves_in_a_row_raise_checkpoint_save_error(tmp_path, monkeypatch, capfd, async_save):
    config, model, optimizer = setup()
    saver = Checkpointer(tmp_path, config, async_save=async_save)
    saver.save(1, model=model, optimizer=optimizer, train_state={})
    saver.wait()
    fail_with(monkeypatch, "write_safetensors", OSError(28, "No space left on device"), times=2)
    saver.save(2, model=model, optimizer=optimizer, train_state={})
    if async_save:
        saver.save(3, model=model, optimizer=optimizer, train_state={})  # the write fails in the background
        with pytest.raises(CheckpointSaveError, match="2 checkpoint saves in a row failed") as caught:
            saver.wait()
    else:
        with pytest.raises(CheckpointSaveError, match="2 checkpoint saves in a row failed") as caught:
            saver.save(3, model=model, optimizer=optimizer, train_state={})
    assert not isinstance(caught.value, ValueError)  # not exit code 2 (a user's mistake)
    assert "step 2" in str(caught.value) and "step 3" in str(caught.value) and "step_1" in str(caught.value)
    err = capfd.readouterr().err
    assert err.count("FAILED") == 2 and "the run stops" in err
    assert (tmp_path / "latest").read_text().strip() == "step_1" and leftovers(tmp_path) == []
    with pytest.raises(CheckpointSaveError):
        saver.finish()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_last_save_raises_at_finish(tmp_path, monkeypatch, async_save):
    config, model, optimizer = setup()
    saver = Checkpointer(tmp_path, config, async_save=async_save, report=lambda message: None)
    saver.save(1, model=model, optimizer=optimizer, train_state={})
    saver.wait()
    fail_with(monkeypatch, "write_safetensors", OSError(28, "No space left on device"), times=1)
    saver.save(2, model=model, optimizer=optimizer, train_state={})
    with pytest.raises(CheckpointSaveError, match=r"last checkpoint save failed \(step 2, rank 0: OSError"):
        saver.finish()
    assert (tmp_path / "latest").read_text().strip() == "step_1"


# -- two ranks ----------------------------------------------------------------------------------


def _two_ranks(root: str) -> dict:
    """TP 2: each rank reads its own tensor files. Only rank 1's file of step 2 is damaged:
    both ranks must fall back to step 1. Then a save fails on rank 1 only."""
    import torch.distributed as dist

    import pretrain.checkpoint.files as files
    from pretrain.parallel.bootstrap import init_distributed
    from pretrain.parallel.model_chunks import build_model_chunks

    config = config_from_dict({"model": MODEL, "parallel": {"tensor": 2, "timeout_minutes": 1}})
    topo = init_distributed(config, device=torch.device("cpu"))
    rank = topo.rank
    chunks = build_model_chunks(config.model, topo, init_seed=0)
    params = [p for c in chunks for p in c.parameters()]
    optimizer = build_optimizer(params, config.optimizer)

    def set_all(value: float) -> None:  # every tensor of "step N" holds N
        with torch.no_grad():
            for p in params:
                p.fill_(value)
                optimizer.state[p] = {
                    "step": torch.tensor(value),
                    "exp_avg": torch.full_like(p, value),
                    "exp_avg_sq": torch.full_like(p, value),
                }

    reports: list[str] = []
    saver = Checkpointer(root, config, topo, async_save=True, report=reports.append)
    for step in (1, 2):
        set_all(float(step))
        saver.save(step, model=chunks, optimizer=optimizer, train_state={"consumed_samples": step})
    saver.finish()
    dist.barrier()
    if rank == 1:
        flip_byte(Path(root, "step_2", "model_tp1_pp0_part0.safetensors"))
    dist.barrier()

    verified: list[str] = []
    check = files.Checksums.check

    def recording(self, path, checksum):
        verified.append(Path(path).name)
        return check(self, path, checksum)

    files.Checksums.check = recording
    set_all(7.0)
    said: list[str] = []
    chosen, meta = load_newest_intact(
        checkpoint_candidates(root, Path(root, "step_2")),
        model=chunks,
        optimizer=optimizer,
        config=config,
        topo=topo,
        warn=said.append if rank == 0 else None,
    )
    files.Checksums.check = check
    loaded = all(bool(torch.all(p == 1.0)) and bool(torch.all(optimizer.state[p]["exp_avg"] == 1.0)) for p in params)

    # A save that fails on rank 1 only: reported once, by rank 0, naming rank 1.
    import pretrain.checkpoint.state as state_module

    real = state_module.write_safetensors

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if rank == 1:
        state_module.write_safetensors = failing
    saver.save(3, model=chunks, optimizer=optimizer, train_state={"consumed_samples": 3})
    saver.wait()
    first = {
        "failures": saver.failures,
        "last_error": saver.last_error,
        "reports": list(reports),
        "latest": Path(root, "latest").read_text().strip(),
        "leftovers": leftovers(Path(root)),
    }
    saver.save(4, model=chunks, optimizer=optimizer, train_state={"consumed_samples": 4})
    try:
        saver.wait()
        second = "no error"
    except CheckpointSaveError as e:
        second = str(e)
    state_module.write_safetensors = real
    return {
        "chosen": str(chosen),
        "step": meta["step"],
        "said": said,
        "loaded": loaded,
        "verified": sorted(set(verified)),
        "first": first,
        "second": second,
    }


def test_two_ranks_fall_back_together_and_agree_on_failed_saves(tmp_path):
    root = tmp_path / "ckpt"
    r0, r1 = run_ranks(2, _two_ranks, str(root))
    for r in (r0, r1):
        assert r["chosen"] == str(root / "step_1") and r["step"] == 1 and r["loaded"]
    bad = str(root / "step_2" / "model_tp1_pp0_part0.safetensors")
    assert len(r0["said"]) == 1 and bad in r0["said"][0] and "rank 1" in r0["said"][0] and r1["said"] == []
    # Each rank verified only the files it read (its own TP rank's, its RNG, the config): at 128
    # ranks nobody reads the whole checkpoint.
    assert r0["verified"] == [
        "config.yaml",
        "model_tp0_pp0_part0.safetensors",
        "optimizer_tp0_pp0_part0.safetensors",
        "rng_rank0.pt",
    ]
    assert "model_tp0_pp0_part0.safetensors" not in r1["verified"] and "rng_rank0.pt" not in r1["verified"]

    for r in (r0, r1):
        first = r["first"]
        assert first["failures"] == 1 and "rank 1: OSError" in first["last_error"]
        assert first["latest"] == "step_2" and "2 checkpoint saves in a row failed" in r["second"]
    assert r0["first"]["leftovers"] == []  # rank 0 removes the partial save before its wait() returns
    assert len(r0["first"]["reports"]) == 1 and "rank 1" in r0["first"]["reports"][0]
    assert r1["first"]["reports"] == []
    assert not (root / "step_3").exists() and not (root / "step_4").exists()
