"""Falling back to an earlier checkpoint when the newest is damaged.

`load_newest_intact` loads the first of its candidates (newest first) that every rank reads
without finding a damaged file: a checksum mismatch, a file cut short, missing or unreadable
(CorruptCheckpointError, OSError) on any rank makes all ranks move on to the next candidate
together, after one small all-reduce that tells them. Other errors (a different model shape, a
format this version cannot read) are not damage, and an older checkpoint of the same run would
fail the same way: every rank raises at once instead. `checkpoint_candidates` lists what a
resume tries: the checkpoint `find_resume_checkpoint` chose, then the older complete ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint.files import CheckpointError, CorruptCheckpointError, complete_steps, read_meta
from pretrain.checkpoint.restore import load_state
from pretrain.checkpoint.state import ReplicatedState
from pretrain.config import RunConfig
from pretrain.device import cuda_rng_state, restore_cuda_rng_state
from pretrain.parallel.topology import Topology, single_process

OK, DAMAGED, FAILED = 0, 1, 2  # a rank's outcome; the worst one decides for all
_MESSAGE_BYTES = 512  # of each rank's error, shared only when a load failed somewhere


def _step_of(path: Path) -> int | None:
    suffix = path.name.split("_", 1)[1] if path.name.startswith("step_") else ""
    return int(suffix) if suffix.isdigit() else None


def checkpoint_candidates(root: str | Path, first: str | Path | None) -> list[Path]:
    """`first` (the checkpoint find_resume_checkpoint chose), then the complete step_N/
    directories under `root` older than it, newest first: what load_newest_intact tries."""
    if first is None:
        return []
    first = Path(first)
    step = _step_of(first)
    steps = complete_steps(Path(root)) if root and Path(root).is_dir() else []
    older = [path for n, path in steps if (step is None or n < step) and path.resolve() != first.resolve()]
    return [first, *reversed(older)]


def first_readable(candidates: list[Path], *, warn: Callable[[str], None] | None = None) -> tuple[list[Path], dict]:
    """The candidates from the first whose meta.json reads on, and that meta (no communication:
    every rank reads the same small file before the process groups start). A damaged meta.json
    is skipped with a warning, like a damaged tensor file in load_newest_intact."""
    for index, step_dir in enumerate(candidates):
        try:
            return candidates[index:], read_meta(step_dir)
        except CorruptCheckpointError as e:
            if warn is not None:
                warn(f"warning: skipping checkpoint {step_dir}: {e}")
    raise CheckpointError(
        f"no checkpoint with a readable meta.json: {len(candidates)} tried ("
        + ", ".join(str(c) for c in candidates)
        + ")"
    )


def step_of(step_dir: Path, meta: dict) -> int:
    """A checkpoint's step: from its name step_N when it has one (a damaged meta.json cannot say)."""
    step = _step_of(Path(step_dir))
    return meta["step"] if step is None else step


def load_newest_intact(
    candidates: list[str | Path],
    *,
    config: RunConfig,
    topo: Topology | None = None,
    state=None,
    model=None,
    optimizer=None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, dict]:
    """Load the first candidate checkpoint no rank finds damaged (collective: every rank calls
    it with the same list) into `state` (pretrain/checkpoint/state.py; model= and optimizer=
    stand for a ReplicatedState); returns (its directory, its meta). `warn(message)` (pass it on rank 0
    only) names each damaged file skipped. Raises CheckpointError when none is intact."""
    topo = topo or single_process()
    state = state or ReplicatedState(model, optimizer)
    if not candidates:
        raise CheckpointError("no checkpoint to load")
    # A failed attempt may have restored a candidate's RNG streams on some ranks: each attempt
    # starts from the streams the run had (the model and optimizer are overwritten in full).
    rng = torch.get_rng_state(), cuda_rng_state(topo.device)
    skipped: list[str] = []
    for index, step_dir in enumerate(candidates):
        if index:
            torch.set_rng_state(rng[0])
            restore_cuda_rng_state(rng[1], topo.device)
        meta, outcome, error = _try_load(step_dir, state, config=config, topo=topo)
        worst, message = _agree(outcome, error, topo)
        if worst == OK:
            return Path(step_dir), meta
        if worst == FAILED:
            if outcome == FAILED:
                raise error
            raise CheckpointError(f"loading {step_dir} failed on another rank: {message}")
        skipped.append(message)
        if warn is not None:
            nxt = (
                f"falling back to the previous complete checkpoint, {candidates[index + 1]}"
                if index + 1 < len(candidates)
                else "no older complete checkpoint is left to try"
            )
            warn(f"warning: skipping checkpoint {step_dir}: {message}; {nxt}")
    raise CheckpointError(
        f"no intact checkpoint to resume from: {len(candidates)} tried, all damaged ("
        + "; ".join(skipped)
        + "). Restore one from a backup, or start without "
        "(checkpoint.resume=none and another checkpoint.dir)"
    )


def _try_load(step_dir, state, *, config: RunConfig, topo: Topology) -> tuple[dict | None, int, BaseException | None]:
    """This rank's attempt at one candidate: (meta, OK, None), or (None, DAMAGED, error) for a
    damaged or unreadable file (the next candidate may do), or (None, FAILED, error) for
    anything else (a bug or a wrong config: no older checkpoint would fare better)."""
    try:
        if Path(step_dir).is_dir() and not (Path(step_dir) / "meta.json").is_file():
            raise CorruptCheckpointError(
                f"{step_dir}/meta.json is missing: the checkpoint is incomplete",
                step_dir=step_dir,
                file=Path(step_dir) / "meta.json",
            )
        return load_state(step_dir, state, config=config, topo=topo), OK, None
    except (CorruptCheckpointError, OSError) as e:
        return None, DAMAGED, e
    except Exception as e:
        return None, FAILED, e


def _agree(outcome: int, error: BaseException | None, topo: Topology) -> tuple[int, str]:
    """The worst outcome over all ranks and, when it is not OK, the first failing rank's error
    (one int all-reduce when all went well; a second, of the messages, only after a failure)."""
    text = "" if error is None else _describe(error)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return outcome, text
    flag = torch.tensor([outcome], dtype=torch.int32, device=topo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    worst = int(flag.item())
    if worst == OK:
        return worst, ""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = torch.zeros(world, _MESSAGE_BYTES, dtype=torch.int32, device=topo.device)
    if outcome == worst:
        raw = list(f"on rank {rank}: {text}".encode()[:_MESSAGE_BYTES])
        rows[rank, : len(raw)] = torch.tensor(raw, dtype=torch.int32, device=topo.device)
    dist.all_reduce(rows)  # each rank filled only its own row: the sum is every failing rank's message
    messages = [bytes(row[row > 0].tolist()).decode(errors="replace") for row in rows.cpu()]
    failed = [m for m in messages if m]
    more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    return worst, failed[0] + more


def _describe(error: BaseException) -> str:
    if isinstance(error, CheckpointError):
        return str(error)
    return f"{type(error).__name__}: {error}"
