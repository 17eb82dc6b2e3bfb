"""Checkpoints: save, publish atomically, find the one to resume from, load safely.

Layout of one checkpoint, `{checkpoint.dir}/step_N/`:
  meta.json                  format version, step, parallel layout, trainer state (data position)
  config.yaml                the whole run config, so a checkpoint alone rebuilds its model
  model_tp{T}_pp{P}.pt       the weights one TP/PP position holds, with each tensor's shard spec
  optimizer_tp{T}_pp{P}.pt   that position's optimizer state
  optimizer_tp{T}_pp{P}_dp{D}.pt   instead, under ZeRO: each DP rank's partition of it
  rng_rank{R}.pt             every rank's RNG states (torch CPU, CUDA)
`{checkpoint.dir}/latest` holds the name of the newest complete checkpoint.

Every rank writes its own files, in parallel, into one hidden temporary directory; after a
barrier rank 0 writes meta.json, renames the directory into place, and only then replaces
`latest` atomically. A crash at any moment leaves the previous `latest` pointing at a complete
checkpoint. Data-parallel replicas hold equal weights and optimizer state, so only DP rank 0
writes them. Under ZeRO the optimizer state is partitioned over the DP ranks, so each writes its
own partition (DeepSpeed's state, converted to plain tensors and numbers), and the weight file
holds the fp32 master weights gathered whole, so `load_model` reads ZeRO checkpoints unchanged.
Every file is read with `weights_only=True`: loading never runs code from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from pretrain.config import RunConfig, config_from_dict, to_dict
from pretrain.models.layers import ShardSpec, unshard_tensors

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


def _chunks(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _shard_state(chunks: list[torch.nn.Module], full: Optional[list[dict]] = None) -> dict:
    """This rank's weights, and for each TP-sharded one, how to put the full tensor together.
    `full`: per chunk, parameters to store instead of the module's own (ZeRO's fp32 masters;
    the module may hold 16-bit copies or, under ZeRO-3, only a shard)."""
    state, specs = {}, {}
    for index, chunk in enumerate(chunks):
        state.update(chunk.state_dict())
        if full is not None:
            state.update(full[index])
        for name, param in chunk.named_parameters():
            spec = getattr(param, "tp_spec", None)
            if spec is not None:
                specs[name] = [spec.dim, spec.parts]
    return {"state": state, "specs": specs}


def _barrier(topo) -> None:
    if topo is not None and topo.world_size > 1:
        dist.barrier()


def save_checkpoint(root: str | Path, *, step: int, model, optimizer: torch.optim.Optimizer,
                    config: RunConfig, train_state: dict, topo=None, zero=None) -> Path:
    """Write step_N under root from every rank and point `latest` at it (collective: every rank
    calls it). `model` is a module or this rank's list of pipeline chunks; `zero` the ZeroEngine
    that owns weights and optimizer state under ZeRO (then `optimizer` is unused). Returns step_N."""
    root = Path(root)
    rank = topo.rank if topo else 0
    tp_rank, pp_rank, dp_rank = (topo.tp_rank, topo.pp_rank, topo.dp_rank) if topo else (0, 0, 0)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that crashed
        tmp.mkdir()
    _barrier(topo)
    try:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _write(tmp / f"rng_rank{rank}.pt", lambda f: torch.save(rng, f))
        suffix = f"tp{tp_rank}_pp{pp_rank}"
        if zero is not None:
            # Gathering the master weights is collective over the DP group: every DP rank joins.
            weights = _shard_state(_chunks(model), full=[zero.full_parameters(c) for c in _chunks(model)])
            if dp_rank == 0:
                _write(tmp / f"model_{suffix}.pt", lambda f: torch.save(weights, f))
            _write(tmp / f"optimizer_{suffix}_dp{dp_rank}.pt", lambda f: torch.save(zero.optimizer_state(), f))
        elif dp_rank == 0:
            _write(tmp / f"model_{suffix}.pt", lambda f: torch.save(_shard_state(_chunks(model)), f))
            _write(tmp / f"optimizer_{suffix}.pt", lambda f: torch.save(optimizer.state_dict(), f))
        _barrier(topo)
        if rank == 0:
            meta = {"format_version": FORMAT_VERSION, "step": step,
                    "layout": _layout(config, data_parallel=topo.dp if topo else 1),
                    "world_size": topo.world_size if topo else 1, "train_state": train_state}
            _write(tmp / "config.yaml",
                   lambda f: f.write(yaml.safe_dump(to_dict(config), sort_keys=False).encode()))
            # meta.json last: its presence marks the directory complete.
            _write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
                trash = Path(tempfile.mkdtemp(prefix=f".old-step_{step}-", dir=root))
                final.rename(trash / "old")
                shutil.rmtree(trash)
            tmp.rename(final)
            pointer = root / f".{LATEST}.tmp"
            _write(pointer, lambda f: f.write(f"{final.name}\n".encode()))
            os.replace(pointer, root / LATEST)
            _fsync_dir(root)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(topo)
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


def _load_shard(step_dir: Path, *, tp_rank: int, pp_rank: int) -> dict:
    shard = _load_tensors(step_dir / f"model_tp{tp_rank}_pp{pp_rank}.pt")
    if not isinstance(shard, dict) or "state" not in shard:
        raise CheckpointError(f"{step_dir}: model_tp{tp_rank}_pp{pp_rank}.pt is not a pretrain weight shard")
    return shard


def _load_into(step_dir: Path, chunks: list[torch.nn.Module], state: dict) -> None:
    expected = {name for chunk in chunks for name in chunk.state_dict()}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(f"{step_dir}: weights do not fit this model (a different model shape?): "
                              f"unexpected {', '.join(unexpected[:5])}")
    for chunk in chunks:
        own = {name: state[name] for name in chunk.state_dict() if name in state}
        try:
            chunk.load_state_dict(own)
        except RuntimeError as e:
            raise CheckpointError(f"{step_dir}: weights do not fit this model (a different model shape?): "
                                  f"{e}") from None


def merged_state_dict(step_dir: Path) -> dict:
    """The single-device state dict from the shards of any TP/PP layout."""
    layout = read_meta(step_dir)["layout"]
    merged: dict[str, torch.Tensor] = {}
    for pp_rank in range(layout["pipeline"]):
        shards = [_load_shard(step_dir, tp_rank=t, pp_rank=pp_rank) for t in range(layout["tensor"])]
        for name, tensor in shards[0]["state"].items():
            spec = shards[0]["specs"].get(name)
            if spec is None:
                merged[name] = tensor  # replicated (a tied embedding copy on the last stage too)
            else:
                merged[name] = unshard_tensors([s["state"][name] for s in shards], ShardSpec(*spec))
    return merged


def load_checkpoint(step_dir: Path, *, model, optimizer: torch.optim.Optimizer, config: RunConfig,
                    topo=None, zero=None) -> dict:
    """Restore this rank's weights, optimizer and RNG in place; returns the meta (step, train_state).
    The data-parallel size may differ from the saved one (not under ZeRO); tensor and pipeline
    layout may not."""
    meta = read_meta(step_dir)
    saved, here = meta["layout"], _layout(config, data_parallel=topo.dp if topo else 1)
    keys = ("tensor", "pipeline", "virtual_stages", "zero_stage")
    if any(saved[k] != here[k] for k in keys):
        raise CheckpointError(f"{step_dir} was saved with layout {saved}, this run has {here}; loading "
                              "into another tensor/pipeline layout or ZeRO stage is not supported yet")
    if zero is not None and saved["data"] != here["data"]:
        raise CheckpointError(f"{step_dir} holds ZeRO optimizer state partitioned over {saved['data']} "
                              f"data-parallel ranks; this run has {here['data']}. Resume a ZeRO run with the "
                              "same data-parallel size (resharding ZeRO partitions is not supported yet)")
    tp_rank, pp_rank = (topo.tp_rank, topo.pp_rank) if topo else (0, 0)
    if zero is None or zero.stage < 3:  # ZeRO-3 restores its weight shards from the optimizer state
        _load_into(step_dir, _chunks(model), _load_shard(step_dir, tp_rank=tp_rank, pp_rank=pp_rank)["state"])
    if zero is not None:
        dp_rank = topo.dp_rank if topo else 0
        zero.load_optimizer_state(_load_tensors(step_dir / f"optimizer_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.pt"))
    else:
        optimizer.load_state_dict(_load_tensors(step_dir / f"optimizer_tp{tp_rank}_pp{pp_rank}.pt"))
    rank = topo.rank if topo else 0
    rng_file = step_dir / f"rng_rank{rank}.pt"
    if not rng_file.exists():  # fewer ranks saved it (a DP change): take a same-position rank's
        rng_file = step_dir / f"rng_rank{rank % meta.get('world_size', 1)}.pt"
    rng = _load_tensors(rng_file)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta


def load_model(checkpoint_dir: str | Path):
    """(single-device GPT with the checkpoint's weights, its run config), from any layout, in
    eval mode."""
    from pretrain.models.gpt import GPT

    step_dir = resolve_checkpoint(checkpoint_dir)
    read_meta(step_dir)
    config = read_config(step_dir)
    model = GPT(config.model, init_seed=0)
    _load_into(step_dir, [model], merged_state_dict(step_dir))
    return model.eval(), config
