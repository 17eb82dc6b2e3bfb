"""Restoring a live run from a checkpoint of any layout.

A checkpoint holds every tensor under its global name with its TP shard spec, whole or as ZeRO
fragments (pretrain/checkpoint/files.py). Restoring at another layout is therefore: for each
parameter this rank holds, read the saved shards of that name, put the full tensor together,
and keep this rank's slice of it; the same for its optimizer state. With partitioned optimizer
state (ZeRO) a rank needs only its fragments' ranges, and at the saved layout reads only its own
files (`restore_partitioned`). The vocabulary tensors are cut or zero-padded when the padding
differs (it grows with the TP size; padding rows take no part in the loss). Which of the two a
run uses is its training strategy's business (pretrain/checkpoint/state.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.checkpoint.files import (
    CheckpointError,
    Checksums,
    load_pt,
    read_config,
    read_meta,
    resolve_checkpoint,
    rng_file,
)
from pretrain.checkpoint.reader import VOCAB_PARAMS, SavedCheckpoint, check_same_model
from pretrain.config import RunConfig
from pretrain.device import restore_cuda_rng_state
from pretrain.parallel.topology import Topology, single_process
from pretrain.parallel.zero_state import ADAM_KEYS


def load_state(step_dir: str | Path, state, *, config: RunConfig, topo: Topology | None = None) -> dict:
    """Restore this rank's `state` (pretrain/checkpoint/state.py: its weights, and optimizer
    state when it has one) in place from a checkpoint of any layout, and the RNG states when the
    layout is the same; returns the meta (step, train_state).

    Every file this rank reads is checked against the checksum meta.json recorded (once, and
    only those: see reader.py); a damaged one raises CorruptCheckpointError naming it. Every
    parameter and optimizer state tensor is set (a state the checkpoint lacks is dropped), so
    loading another checkpoint after a failed attempt leaves nothing of the first behind, except
    under ZeRO where a weights-only checkpoint leaves the Adam moments as they were."""
    topo = topo or single_process()
    step_dir = resolve_checkpoint(step_dir)
    meta = read_meta(step_dir)
    checksums = Checksums(step_dir, meta)
    check_same_model(read_config(step_dir, checksums).model, config.model, step_dir)
    with_state = bool(meta.get("has_optimizer", True)) and state.has_optimizer
    state.restore(step_dir, meta, config=config, topo=topo, with_state=with_state)
    _restore_rng(step_dir, meta, topo, checksums)
    return meta


def _check_names(saved: SavedCheckpoint, names) -> None:
    missing = sorted(set(names) - set(saved.names))
    if missing:
        saved.blame()
        raise CheckpointError(
            f"{saved.dir} lacks weights this model needs ({', '.join(missing[:3])}): "
            "a different model shape, or an incomplete checkpoint"
        )


def restore_replicated(
    step_dir: Path, chunks: list, *, optimizer, config: RunConfig, topo: Topology, with_state: bool
) -> None:
    """Whole TP shards on every DP replica: a rank reads its position's shards (and their
    optimizer state when `optimizer` is given)."""
    saved = SavedCheckpoint(step_dir)
    # (name, parameter) pairs, not a dict: a rank holding both copies of the tied embedding
    # (zb-v's rank 0) loads the one saved tensor into each.
    params = [(name, p) for chunk in chunks for name, p in chunk.named_parameters()]
    _check_names(saved, [name for name, _ in params])
    # At the saved TP size a rank needs exactly its own position's files: read them whole.
    saved.read_whole_files = saved.tp == topo.tp and saved.pp == topo.pp

    def shard(name: str, key: str | None = None) -> torch.Tensor:
        return saved.shard(
            name,
            key,
            tp_rank=topo.tp_rank,
            tp_size=topo.tp,
            rows=config.model.vocab_rows,
            pp_rank=topo.pp_rank if saved.pp == topo.pp else None,
        )

    with torch.no_grad():
        for name, param in params:
            value = shard(name)
            if value.shape != param.shape:
                saved.blame()
                raise CheckpointError(
                    f"{saved.dir}: {name} has shape {tuple(value.shape)} for this rank, the "
                    f"model has {tuple(param.shape)} (a different model shape?)"
                )
            param.copy_(value)
        if optimizer is not None:
            restored: set[str] = set()
            for name, param in params:
                keys = saved.optimizer_keys(name) if with_state else []
                if keys:
                    state = {k: shard(name, k).to(param.device) for k in keys}
                    if name in restored:
                        # The tied embedding's second copy (zb-v's rank 0): state tensors of its own,
                        # not the first copy's (a file read whole hands out the same tensor twice).
                        state = {k: v.clone() for k, v in state.items()}
                    optimizer.state[param] = state
                    restored.add(name)
                else:  # as a fresh optimizer has it (and nothing of an earlier attempt's load)
                    optimizer.state.pop(param, None)


def restore_partitioned(
    step_dir: Path, meta: dict, chunks: list, *, engine, config: RunConfig, topo: Topology, with_state: bool
) -> None:
    """Partitioned optimizer state (ZeRO): a rank needs only its own fragments (zero_state.py): the
    runs of the flattened TP shards its partition holds. Saved at this very layout, those are
    its own files' fragments, and it reads its own two files and nothing else; saved at any
    other layout, it reads the ranges of its fragments from wherever they lie (other DP size:
    the overlapping parts of other ranks' fragments; without ZeRO: rows of whole shards)."""
    fragments = [f for chunk in chunks for f in engine.local_fragments(chunk, with_state=False)]
    # engine.load_local_state is collective (stages 1/2 all-gather the weights over DP): a rank
    # whose files are damaged must still take part, or its peers would wait in the all-gather.
    # It reads zeros from the failure on and raises after the collective; a caller (such as
    # load_newest_intact) then loads another checkpoint over the whole state.
    failure: Exception | None = None
    try:
        saved, step = _partition_source(
            step_dir, meta, chunks, fragments, engine=engine, config=config, topo=topo, with_state=with_state
        )
    except (CheckpointError, OSError) as e:
        saved, step, failure = None, None, e
    pp_rank = None if saved is None else topo.pp_rank if saved.pp == topo.pp else None
    shapes = {f.name: f.shape for f in fragments}

    def read(name: str, key: str | None, start: int, numel: int) -> torch.Tensor:
        nonlocal failure
        if failure is None:
            try:
                rows = config.model.vocab_rows
                if (
                    key is None
                    and saved.shapes.get(name) is not None
                    and not _fits(saved, name, shapes[name], topo, rows)
                ):
                    raise CheckpointError(
                        f"{saved.dir}: {name} does not fit this model's shard {shapes[name]} (a different model shape?)"
                    )
                return saved.shard_range(
                    name,
                    key,
                    tp_rank=topo.tp_rank,
                    tp_size=topo.tp,
                    start=start,
                    numel=numel,
                    rows=rows,
                    pp_rank=pp_rank,
                )
            except (CheckpointError, OSError) as e:
                failure = e
        return torch.zeros(numel)

    engine.load_local_state(chunks, read=read, step=step if failure is None else None)
    if failure is not None:
        raise failure


def _partition_source(
    step_dir: Path,
    meta: dict,
    chunks: list,
    fragments: list,
    *,
    engine,
    config: RunConfig,
    topo: Topology,
    with_state: bool,
) -> tuple[SavedCheckpoint, float | None]:
    """The files a ZeRO rank reads its fragments from, and the Adam step count when it loads
    optimizer state (no communication)."""
    layout, p = meta["layout"], config.parallel
    saved = None
    if (
        layout["tensor"],
        layout["pipeline"],
        layout.get("virtual_stages", 1),
        layout["data"],
        layout.get("context", 1),
        layout.get("zero_stage", 0),
    ) == (topo.tp, topo.pp, p.virtual_stages, topo.dp, topo.cp, engine.stage):
        own = SavedCheckpoint(step_dir, parts=[(topo.tp_rank, topo.pp_rank, topo.replica_rank)])
        keys = [None, *ADAM_KEYS] if with_state and own.has_optimizer else [None]
        if all(
            own.has_range(f.name, k, tp_rank=topo.tp_rank, pp_rank=topo.pp_rank, start=f.start, numel=f.numel)
            for f in fragments
            for k in keys
        ):
            saved, own.read_whole_files = own, True  # one sequential read per file
    if saved is None:
        saved = SavedCheckpoint(step_dir)
        _check_names(saved, [n for chunk in chunks for n, _ in chunk.named_parameters()])
    pp_rank = topo.pp_rank if saved.pp == topo.pp else None
    step = None
    if with_state and saved.has_optimizer:
        with_step = next((f.name for f in fragments if "step" in saved.optimizer_keys(f.name)), None)
        if with_step is not None:  # one count for the whole run (every partition steps together)
            step = float(saved.shard(with_step, "step", tp_rank=topo.tp_rank, tp_size=topo.tp, pp_rank=pp_rank))
    return saved, step


def _fits(saved: SavedCheckpoint, name: str, shape: list[int], topo: Topology, rows: int) -> bool:
    """Whether the saved tensor, resharded to this layout, has this rank's shard shape."""
    full = list(saved.shapes[name])
    if name in VOCAB_PARAMS:
        full[0] = rows
    spec = saved.specs.get(name)
    if spec is not None:
        full[spec.dim] //= topo.tp
    return full == list(shape)


def _restore_rng(step_dir: Path, meta: dict, topo: Topology, checksums: Checksums) -> None:
    """The RNG streams continue exactly only at the saved layout; elsewhere ranks keep the
    streams they were seeded with (dropout masks then differ from an uninterrupted run)."""
    layout = meta["layout"]
    saved = (layout["tensor"], layout["pipeline"], layout.get("context", 1), meta["world_size"])
    if saved != (topo.tp, topo.pp, topo.cp, topo.world_size):
        return
    if not meta.get("has_rng", True):  # written offline (resharded, imported): fresh streams
        return
    rng = load_pt(step_dir / rng_file(topo.rank), checksums)
    torch.set_rng_state(rng["torch"])
    restore_cuda_rng_state(rng.get("cuda"), topo.device)
