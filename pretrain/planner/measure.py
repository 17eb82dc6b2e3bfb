"""Build a rank's real model and trainer, run real training steps and one checkpoint snapshot
under a LiveMemory tracker, and say what the rank held: the same code measures a dry run on
fake tensors (dry_run.py) and a real run on CPU tensors (tests, bench/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.checkpoint.state import HostBuffers, ReplicatedState
from pretrain.config import RunConfig
from pretrain.parallel.model_chunks import build_model_chunks
from pretrain.parallel.topology import Topology
from pretrain.planner.fake_world import synthetic_batches
from pretrain.planner.live_memory import LiveMemory, MemoryBreakdown, categories_of
from pretrain.strategy import weight_dtype
from pretrain.trainer import Trainer


@dataclass(frozen=True)
class SaveReport:
    """One checkpoint save's snapshot on this rank (pretrain/checkpoint/saver.py takes it the
    same way; nothing is written)."""

    host_bytes: int
    """Host memory the snapshot fills (its HostBuffers, and any tensor it hands over as is)."""
    share_bytes: int
    """This rank's share of the state a checkpoint holds: without ZeRO, the weights and optimizer
    state of its TP/PP position over the DP (x CP) ranks that split the writing (whole tensors are
    dealt out, so one rank's part can exceed the even split by up to one tensor); with ZeRO, its
    own fp32 masters and moments. A save that gathers more shows up as host_bytes above it."""
    tensors: int
    """Tensors in the snapshot."""


@dataclass(frozen=True)
class Measurement:
    peak: MemoryBreakdown
    """The highest live memory during the steps, split by category at that moment."""
    peak_step: int
    """The step (1-based) the peak happened in: step 1 allocates the optimizer state at its end,
    so the peak of a healthy run is normally in step 2 and later."""
    steady: MemoryBreakdown
    """What stays live after the last step (weights, gradient buffers, optimizer state, ...)."""
    save: SaveReport
    parameters: int
    """This rank's parameters (its TP/PP shard, before ZeRO-3 partitions it)."""


def measure_training(config: RunConfig, topo: Topology, *, tracker: LiveMemory, steps: int = 2) -> Measurement:
    """Build this rank's model and trainer and run `steps` training steps on synthetic batches,
    all under `tracker` (entered by the caller, before anything is built)."""
    chunks = build_model_chunks(config.model, topo, init_seed=config.train.seed, dtype=weight_dtype(config))
    trainer = Trainer(config, topo, chunks, train_batches=synthetic_batches(config))
    tracker.categorize = lambda: categories_of(trainer.strategy.held_tensors())
    peak, peak_step = MemoryBreakdown(), 0
    for step in range(1, steps + 1):
        tracker.reset_peak()
        _check_taken(trainer.step(step), step)
        if tracker.peak.total > peak.total:
            peak, peak_step = tracker.peak, step
    steady = tracker.now()
    return Measurement(
        peak=peak, peak_step=peak_step, steady=steady, save=measure_save(trainer, steady), parameters=trainer.num_params
    )


def _check_taken(record: dict, step: int) -> None:
    """A skipped step allocates no optimizer state: the figures would be too low."""
    if record.get("bad_step") or record.get("skipped"):
        raise RuntimeError(f"training step {step} was skipped ({record}); its memory would not be the real one's")


def measure_save(trainer: Trainer, steady: MemoryBreakdown) -> SaveReport:
    """Take this rank's checkpoint snapshot as the saver does (the strategy's checkpoint state,
    into HostBuffers that copy, as an asynchronous save does) and count its host bytes."""
    state = trainer.strategy.checkpoint_state()
    host = HostBuffers(copy=True)
    shard = state.take_shard(topo=trainer.topo, host=host)
    tensors = [*shard.weights.values(), *shard.optimizer.values()]
    if isinstance(state, ReplicatedState):
        share = (steady.weights + steady.optimizer) // trainer.topo.replicas  # data x context ranks split it
    else:  # partitioned: its own masters and moments are its share
        share = steady.optimizer
    return SaveReport(host_bytes=_unique_bytes(tensors), share_bytes=share, tensors=len(tensors))


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
