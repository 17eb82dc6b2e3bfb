"""Checkpoints: save, publish atomically, find the one to resume from, load safely.

Layout of one checkpoint, `{checkpoint.dir}/step_N/`:
  meta.json       format version, step, parallel layout, trainer state (data position, ...)
  config.yaml     the whole run config, so a checkpoint alone rebuilds its model
  model.pt        model state dict (tensors only)
  optimizer.pt    optimizer state dict (tensors and numbers only)
  rng.pt          RNG states (torch CPU, CUDA)
`{checkpoint.dir}/latest` holds the name of the newest complete checkpoint.

A checkpoint is written into a hidden temporary directory, synced, and renamed into place;
`latest` is replaced atomically only after that. A crash at any moment leaves the previous
`latest` pointing at a complete checkpoint. Every file is read with `weights_only=True`, so
loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from pretrain.config import RunConfig, config_from_dict, to_dict

FORMAT_VERSION = 1
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says which and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _layout(config: RunConfig, *, data_parallel: int) -> dict:
    p = config.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_stages": p.virtual_stages,
            "data": data_parallel, "zero_stage": p.zero_stage}


def save_checkpoint(root: str | Path, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, config: RunConfig, train_state: dict,
                    data_parallel: int = 1) -> Path:
    """Write step_N under root and point `latest` at it; returns the published directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=root))
    try:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        meta = {"format_version": FORMAT_VERSION, "step": step,
                "layout": _layout(config, data_parallel=data_parallel), "train_state": train_state}
        _write(tmp / "model.pt", lambda f: torch.save(model.state_dict(), f))
        _write(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
        _write(tmp / "rng.pt", lambda f: torch.save(rng, f))
        _write(tmp / "config.yaml", lambda f: f.write(yaml.safe_dump(to_dict(config), sort_keys=False).encode()))
        # meta.json last: its presence marks the directory complete.
        _write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
            trash = Path(tempfile.mkdtemp(prefix=f".old-step_{step}-", dir=root))
            final.rename(trash / "old")
            shutil.rmtree(trash)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp"
    _write(pointer, lambda f: f.write(f"{final.name}\n".encode()))
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    return final


def prune_checkpoints(root: str | Path, *, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints (never the one `latest` names)."""
    if keep_last <= 0:
        return
    root = Path(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    steps = sorted((int(p.name.split("_", 1)[1]), p) for p in root.glob("step_*")
                   if p.name.split("_", 1)[1].isdigit() and (p / "meta.json").exists())
    for _, path in steps[:-keep_last]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a checkpoint root whose `latest` names one -> the step directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        step_dir = path / pointer.read_text().strip()
        if (step_dir / "meta.json").is_file():
            return step_dir
        raise CheckpointError(f"{pointer} names {step_dir.name}, which is missing or incomplete")
    raise CheckpointError(f"{path} is not a checkpoint: no meta.json and no '{LATEST}' file in it")


def find_resume_checkpoint(root: str, resume: str) -> Optional[Path]:
    """Which checkpoint checkpoint.resume asks for: None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        if root and (Path(root) / LATEST).exists():
            return resolve_checkpoint(root)
        return None
    return resolve_checkpoint(resume)


def read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}/meta.json is unreadable: {e}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{step_dir} has checkpoint format version {version}; this version of "
                              f"pretrain reads version {FORMAT_VERSION}")
    return meta


def _load_tensors(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors, or a damaged file
        raise CheckpointError(f"{path} cannot be loaded safely: {e}") from None


def read_config(step_dir: Path) -> RunConfig:
    raw = yaml.safe_load((step_dir / "config.yaml").read_text())
    return config_from_dict(raw)


def load_model_state(step_dir: Path, model: torch.nn.Module) -> None:
    state = _load_tensors(step_dir / "model.pt")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{step_dir}: weights do not fit this model (a different model shape?): "
                              f"{e}") from None


def load_checkpoint(step_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: RunConfig, data_parallel: int = 1) -> dict:
    """Restore model, optimizer and RNG in place; returns the meta (step, train_state)."""
    meta = read_meta(step_dir)
    here = _layout(config, data_parallel=data_parallel)
    if meta["layout"] != here:
        raise CheckpointError(f"{step_dir} was saved with layout {meta['layout']}, this run has {here}; "
                              "loading into another layout is not supported yet")
    load_model_state(step_dir, model)
    optimizer.load_state_dict(_load_tensors(step_dir / "optimizer.pt"))
    rng = _load_tensors(step_dir / "rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta


def load_model(checkpoint_dir: str | Path):
    """(single-device GPT with the checkpoint's weights, its run config), in eval mode."""
    from pretrain.models.gpt import GPT

    step_dir = resolve_checkpoint(checkpoint_dir)
    read_meta(step_dir)
    config = read_config(step_dir)
    model = GPT(config.model)
    load_model_state(step_dir, model)
    return model.eval(), config
