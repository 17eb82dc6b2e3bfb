"""Saving: every rank snapshots its tensors to host memory, then writes them, in the background
when checkpoint.async_save is on; rank 0 publishes the step once every rank has written.

Only the snapshot blocks training (a copy of this rank's share of the weights and optimizer state
into host memory). The write, the agreement that every rank succeeded, the atomic publish and the
pruning of old checkpoints run on a background thread over a dedicated gloo group, so they never
interleave with the training collectives; the next save (and the end of training) waits for it.

Without ZeRO, data-parallel replicas hold the same tensors, so the DP ranks of one TP/PP
position split the tensors between them, each writing one part: all ranks write in parallel and
nothing is written twice. Under ZeRO each DP rank holds its own partition of the fp32 master
weights and Adam moments and writes exactly that (pretrain/parallel/zero_state.py): per
parameter a run of its flattened TP shard, with the run's offset in the file metadata. Nothing
is gathered, so a rank's host memory during a save is its own share (async: one copy of it;
synchronous: none, DeepSpeed's buffers are written as they are).

Each file's size and CRC-32 are computed as it is written and gathered to rank 0, which records
them in meta.json (files.py). A save that fails (a full disk, a permission, any error on any
rank) is reported at once by rank 0, its temporary directory removed, `latest` left naming the
previous checkpoint; training goes on and the next save retries. Two failed saves in a row, or
a failed last save (`finish`), raise CheckpointSaveError on every rank.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint.files import (
    LATEST,
    TMP_PREFIX,
    FileChecksum,
    prune_checkpoints,
    publish,
    remove_leftovers,
    rng_file,
    write_file,
    write_meta_and_config,
)
from pretrain.checkpoint.state import HostBuffers, ReplicatedState, Shard
from pretrain.config import RunConfig
from pretrain.device import cuda_rng_state
from pretrain.parallel.bootstrap import group_timeout
from pretrain.parallel.topology import Topology, single_process


def _rng_state(device: torch.device) -> dict:
    """The CPU stream and this rank's own GPU's (not every visible GPU's: see pretrain/device.py)."""
    rng = {"torch": torch.get_rng_state()}
    cuda = cuda_rng_state(device)
    if cuda is not None:
        rng["cuda"] = cuda
    return rng


class CheckpointSaveError(RuntimeError):
    """Checkpoint saves keep failing: two in a row, or the run's last one. The run stops rather
    than train on with nothing recent to resume from (pretrain.stopping.EXIT_CHECKPOINT_FAILED).
    Not a ValueError: that is a user's mistake (exit code 2), this is a fault of the storage."""


class _Fatal(Exception):
    """Not a failed save but a broken run (the ranks could not even agree: a peer is gone)."""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class Checkpointer:
    """Saves checkpoints of one run under `root` (every rank builds one, at the same point: it
    creates the process group the background writes agree over).

    A failed save is reported at once (`report`, rank 0; stderr by default) and does not stop
    training: `failures` counts the failed saves since the last one that succeeded, `last_error`
    describes the latest failure ("step N, rank R: OSError: ..."; None once a save succeeds).
    Every rank raises CheckpointSaveError from `save`/`wait` once two saves in a row have failed,
    and from `finish` (the end of the run) when the last one did."""

    max_failures = 2  # in a row

    def __init__(
        self,
        root: str | Path,
        config: RunConfig,
        topo: Topology | None = None,
        *,
        async_save: bool | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.root, self.config = Path(root), config
        self.topo = topo or single_process()
        self.async_save = config.checkpoint.async_save if async_save is None else async_save
        # gloo whatever the training backend (host-side agreement from a background thread), with
        # the run's timeout: a new group would otherwise wait 30 min for a lost peer.
        self.group = (
            dist.new_group(backend="gloo", timeout=group_timeout(config.parallel.timeout_minutes))
            if self.topo.world_size > 1
            else None
        )
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._host = HostBuffers(copy=self.async_save)
        self.report = report or (lambda message: print(message, file=sys.stderr, flush=True))
        # of the last save: snapshot_s (training blocked), bytes; once written: write_s, written_bytes, failed (0/1)
        self.stats: dict[str, float] = {}
        self.failures = 0  # failed saves in a row
        self.total_failures = 0
        self.last_error: str | None = None
        self._errors: list[str] = []  # the failures in a row, described

    def save(self, step: int, *, train_state: dict, state=None, model=None, optimizer=None) -> Path:
        """Snapshot this rank's tensors (`state`: a pretrain.checkpoint.state object, which knows
        how its strategy holds them) and write step_N (in the background when async). Every
        rank calls it. Returns the directory the checkpoint will have once published. Raises
        CheckpointSaveError when this save is the second failure in a row (synchronous) or the
        previous two were (async: known only once the write in flight has finished)."""
        self.wait()
        start = time.perf_counter()
        state = state or ReplicatedState(model, optimizer)
        shard = state.take_shard(topo=self.topo, host=self._host)
        if any(t.is_pinned() for d in (shard.weights, shard.optimizer) for t in d.values()):
            torch.cuda.synchronize()  # the device-to-host copies are asynchronous
        rng = _rng_state(self.topo.device)
        self.stats = {"snapshot_s": time.perf_counter() - start, "bytes": float(shard.nbytes())}
        job = (step, shard, rng, dict(train_state), state.has_optimizer)
        if self.async_save:
            self._thread = threading.Thread(target=self._background, args=job, name="checkpoint-writer")
            self._thread.start()
        else:
            self._run(*job)
            self._check()
        return self.root / f"step_{step}"

    def wait(self) -> None:
        """Block until the save in flight is done (published, or failed and reported). Raises
        CheckpointSaveError once max_failures saves in a row have failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._check()

    def finish(self) -> None:
        """The end of the run: wait for the last save, and raise CheckpointSaveError if it failed
        (a run must not report success without its final checkpoint)."""
        self.wait()
        if self.failures:
            raise CheckpointSaveError(
                f"the last checkpoint save failed ({self.last_error}); {self._newest()}. {self._advice()}"
            )

    def _check(self) -> None:
        if self._fatal is not None:
            error, self._fatal = self._fatal, None
            raise error
        if self.failures >= self.max_failures:
            raise CheckpointSaveError(
                f"{self.failures} checkpoint saves in a row failed ({'; '.join(self._errors)}); "
                f"{self._newest()}. {self._advice()}"
            )

    def _advice(self) -> str:
        return f"Free space in {self.root} or fix its permissions, then resume (checkpoint.resume=auto)"

    def _previous(self) -> Path | None:
        """The checkpoint `latest` names: what a failed save leaves in place."""
        try:
            return self.root / (self.root / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def _newest(self) -> str:
        previous = self._previous()
        return (
            f"the newest checkpoint is {previous}"
            if previous
            else f"no checkpoint of this run has been published in {self.root}"
        )

    def _background(self, *job) -> None:
        try:
            _lower_priority()
            self._run(*job)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._fatal = e

    def _run(self, step: int, *job) -> None:
        """One save, its failure counted and reported (rank 0) as soon as it is known."""
        failure = self._write(step, *job)
        if failure is None:
            self.failures, self.last_error, self._errors = 0, None, []
            return
        self.failures += 1
        self.total_failures += 1
        self.last_error = f"step {step}, {failure}"
        self._errors.append(self.last_error)
        if self.topo.rank == 0:
            then = (
                "the save is retried at the next checkpoint interval; training continues"
                if self.failures < self.max_failures
                else f"{self.failures} saves in a row have failed: the run stops (CheckpointSaveError)"
            )
            previous = self._previous()
            kept = (
                f"keeping the previous checkpoint {previous} ('{LATEST}' unchanged)"
                if previous
                else f"no earlier checkpoint exists in {self.root}"
            )
            self.report(
                f"checkpoint save of step {step} FAILED on {failure}; the partial save is removed, {kept}; {then}"
            )

    def _exchange(self, error: BaseException | None, payload=None) -> tuple[str | None, list]:
        """Every rank's outcome and payload (a barrier that also carries failures): the first
        failing rank's error ("rank R: ..."), or None when all succeeded, and all payloads."""
        mine = (None if error is None else _describe(error), payload)
        if self.group is None:
            outcomes = [mine]
        else:
            outcomes = [None] * self.topo.world_size
            try:
                dist.all_gather_object(outcomes, mine, group=self.group)
            except Exception as e:  # a peer is gone: not a failed save the run can shrug off
                raise _Fatal(f"checkpoint writers could not agree ({_describe(e)})") from e
        failed = [f"rank {rank}: {message}" for rank, (message, _) in enumerate(outcomes) if message is not None]
        if len(failed) > 1:
            failed[0] += f" (and {len(failed) - 1} more rank(s))"
        return (failed[0] if failed else None), [p for _, p in outcomes]

    def _write(self, step: int, shard: Shard, rng: dict, train_state: dict, has_optimizer: bool) -> str | None:
        """Write, agree, publish. Returns None once step_N is published, or the failure every
        rank agreed on ("rank R: error"), its temporary directory removed and `latest` untouched."""
        start = time.perf_counter()
        failure, error, written = self._write_agreed(step, shard, rng, train_state, has_optimizer)
        self.stats.update(
            write_s=time.perf_counter() - start,
            written_bytes=float(written if failure is None else 0),
            failed=float(failure is not None),
        )
        if failure is not None:
            if self.topo.rank == 0:
                remove_leftovers(self.root)  # the partial save; published checkpoints are never touched
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and the like: after the agreement, so no peer waits
            return failure
        if self.topo.rank == 0:
            try:  # the save itself succeeded: a checkpoint left over is not a failed save
                prune_checkpoints(self.root, keep_last=self.config.checkpoint.keep_last)
            except Exception as e:
                self.report(f"warning: could not delete old checkpoints in {self.root}: {_describe(e)}")
        return None

    def _write_agreed(
        self, step: int, shard: Shard, rng: dict, train_state: dict, has_optimizer: bool
    ) -> tuple[str | None, BaseException | None, int]:
        """The three phases of a save, each ended by an agreement of all ranks so that none goes
        on after another failed: rank 0 makes the temporary directory; every rank writes its
        files; rank 0 writes meta.json (with every rank's checksums) and publishes. Returns
        (the agreed failure or None, this rank's own error, bytes this rank wrote)."""
        topo, rank = self.topo, self.topo.rank
        tmp = self.root / f"{TMP_PREFIX}step_{step}"
        error = _attempt(lambda: self._make_temporary(tmp)) if rank == 0 else None
        failure, _ = self._exchange(error)
        if failure is not None:
            return failure, error, 0
        sums: dict[str, FileChecksum] = {}

        def write_files() -> None:
            sums.update(shard.write(tmp, tp=topo.tp_rank, pp=topo.pp_rank, part=topo.replica_rank))
            sums[rng_file(rank)] = write_file(tmp / rng_file(rank), _pt_bytes(rng))

        error = _attempt(write_files)
        written = sum(c.size for c in sums.values())
        failure, every = self._exchange(error, sums)
        if failure is not None:
            return failure, error, written
        checksums = {name: c for rank_sums in every for name, c in rank_sums.items()}
        publish_it = lambda: self._publish(tmp, step, checksums, train_state=train_state, has_optimizer=has_optimizer)
        error = _attempt(publish_it) if rank == 0 else None
        failure, _ = self._exchange(error)
        return failure, error, written

    def _make_temporary(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.root)  # of saves that crashed; none is in flight now
        tmp.mkdir()

    def _publish(self, tmp: Path, step: int, checksums: dict, *, train_state: dict, has_optimizer: bool) -> None:
        write_meta_and_config(
            tmp,
            self.config,
            step=step,
            data_parallel=self.topo.dp,
            context=self.topo.cp,
            has_optimizer=has_optimizer,
            has_rng=True,
            train_state=train_state,
            checksums=checksums,
        )
        publish(tmp, self.root / f"step_{step}")


def _attempt(action: Callable[[], None]) -> BaseException | None:
    """Run action; what it raised (anything: a peer must hear of a KeyboardInterrupt too)."""
    try:
        action()
    except BaseException as e:
        return e
    return None


def _lower_priority() -> None:
    """Let training have the CPU first: the writer's copies into the page cache otherwise take
    cores from the step (on CPU training, and from the GPU's host threads). Linux nice is per
    thread; elsewhere this is a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _pt_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    config: RunConfig,
    train_state: dict,
    topo: Topology | None = None,
    state=None,
    model=None,
    optimizer=None,
) -> Path:
    """One synchronous save (collective: every rank calls it); returns step_N."""
    saver = Checkpointer(root, config, topo, async_save=False)
    path = saver.save(step, state=state or ReplicatedState(model, optimizer), train_state=train_state)
    saver.finish()
    return path
