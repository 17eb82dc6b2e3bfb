"""Dry run: chosen ranks of a run of any world size, each simulated on this CPU at full size
(`dry_run`). For each rank: its real model chunks, its real training strategy (our data
parallelism, or DeepSpeed's real ZeRO engine) and two real training steps of the real schedule,
over a fake process group of the real world size on fake tensors (fake_world.py), under a
tracker of live storages (live_memory.py); then one checkpoint snapshot, taken by the real
checkpoint code, without writing.

Each rank runs in a fresh process (the fake process group, DeepSpeed's globals and fake mode
are per process), several at once. What a rank reports is its peak device memory split into
weights, gradients, optimizer state and activations at the moment of the peak, what stays live
after the step, and the host memory a checkpoint save fills.

A rank that fails (a shape that does not divide, a layout the schedule cannot run, a buffer
sized for another rank) raises DryRunError naming the rank and its grid coordinates.

Activations are those of the CPU code paths (torch's CPU attention and reference kernels), on
the simulated device: the GPU kernels save about the same (flash attention keeps no score
matrix on either). Allocator rounding and fragmentation, CUDA context and NCCL buffers are not
tensors and are not counted.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pretrain.config import RunConfig, validate_layout
from pretrain.parallel.topology import CPU, Topology, grid_position
from pretrain.planner.live_memory import MemoryBreakdown
from pretrain.planner.measure import SaveReport


@dataclass(frozen=True)
class RankReport:
    """What one simulated rank holds during and after a training step (bytes)."""

    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    peak: MemoryBreakdown
    """Peak device memory during the steps, by category at the moment of the peak."""
    peak_step: int
    steady: MemoryBreakdown
    """What stays live after the last step."""
    save: SaveReport
    """Host memory one checkpoint save fills, against this rank's share."""
    parameters: int
    """This rank's parameters (its TP/PP shard)."""
    micro_batches: int
    """Micro-batches each step ran (the config's, unless dry_run was asked for fewer)."""
    zero_stage: int
    """parallel.zero_stage; its optimizer and gradient partitions were simulated by
    DeepSpeed's real engine, not estimated."""
    seconds: float
    """Wall time of this rank's simulation (its own process)."""

    def describe(self) -> str:
        return f"rank {self.rank} (tp_rank {self.tp_rank}, pp_rank {self.pp_rank}, dp_rank {self.dp_rank})"


class DryRunError(RuntimeError):
    """A simulated rank failed; the message names it, the notes carry its traceback."""


def dry_run(
    config: RunConfig,
    *,
    world_size: int,
    ranks: list[int] | None = None,
    steps: int = 2,
    micro_batches: int | None = None,
    jobs: int | None = None,
) -> list[RankReport]:
    """Simulate `ranks` (default: `default_ranks`) of `config` at `world_size`, `jobs` at a time
    (default: as many as there are CPUs), each for `steps` training steps (the second one has the
    optimizer state of the first, as every later step does). Raises ConfigError for a layout
    that does not fit the world size, DryRunError for a rank that fails.

    `micro_batches`: run at most this many micro-batches per step instead of the config's (a
    step's time grows with them, its memory does not once the schedule has reached its steady
    state: see `fewer_micro_batches`); None runs the config's own."""
    dp = validate_layout(config, world_size)
    if micro_batches is not None:
        config = fewer_micro_batches(config, dp=dp, micro_batches=micro_batches)
    ranks = sorted(set(ranks)) if ranks else default_ranks(config, world_size)
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ValueError(f"ranks {bad} are not in a world of {world_size}")
    jobs = max(1, min(len(ranks), jobs or os.cpu_count() or 1))
    outcomes = _run_all(config, world_size=world_size, ranks=ranks, steps=steps, jobs=jobs)
    failures = [(r, outcome) for r, outcome in zip(ranks, outcomes) if not isinstance(outcome, RankReport)]
    if failures:
        raise _failure(config, world_size, failures)
    return outcomes


def fewer_micro_batches(config: RunConfig, *, dp: int, micro_batches: int) -> RunConfig:
    """A copy of config whose steps run `micro_batches` micro-batches per DP rank (never more than
    the config's, never fewer than the schedule needs to show all its phases: for 1F1B and the
    interleaved schedule two full rounds of its virtual stages, so the pipeline fills, runs in
    steady state and drains; without a pipeline three: the first backward creates the gradients,
    a middle one accumulates, the last one reduces). From there on memory repeats from one
    micro-batch to the next, so the peak is the same but for the micro-batch losses the last
    stage keeps until the step ends, 4 bytes each (tests/test_dry_run.py checks it byte for
    byte)."""
    p = config.parallel
    least = 2 * p.pipeline * p.virtual_stages if p.pipeline > 1 else 3
    wanted = min(config.accumulation_steps(dp), max(micro_batches, least))
    fewer = copy.deepcopy(config)
    fewer.train.global_batch_size = config.train.micro_batch_size * dp * wanted
    return fewer


def default_ranks(config: RunConfig, world_size: int) -> list[int]:
    """Rank 0 (first pipeline stage, first TP and DP rank) and the last rank (last stage, last
    TP rank, last DP rank: the one that holds the padding of ZeRO's partitions), so both ends of
    the pipeline and both ends of every group are built."""
    return sorted({0, world_size - 1})


def coordinates(config: RunConfig, world_size: int, rank: int) -> Topology:
    """The grid position of `rank` (no process group)."""
    p = config.parallel
    dp = world_size // (p.tensor * p.pipeline * p.context)
    return grid_position(
        rank=rank,
        tp=p.tensor,
        pp=p.pipeline,
        dp=dp,
        cp=p.context,
        virtual_stages=p.virtual_stages,
        context_attention=p.context_attention,
        pipeline_schedule=p.pipeline_schedule,
    )


def _run_all(config: RunConfig, *, world_size: int, ranks: list[int], steps: int, jobs: int) -> list:
    """One fresh spawned process per rank (max_tasks_per_child=1): fork would inherit this
    process's torch and process-group state."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_child, config, rank=r, world_size=world_size, steps=steps) for r in ranks]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except BrokenProcessPool as e:  # the process died (killed, out of memory, a crash)
                outcomes.append(("the simulating process died", f"{type(e).__name__}: {e}"))
        return outcomes


def _child(config: RunConfig, *, rank: int, world_size: int, steps: int):
    """In the rank's own process: its report, or (error line, details) for the parent to raise
    (an exception object may not survive pickling). What the process prints (DeepSpeed's start-up
    lines, torch's warnings, once per rank) is kept out of the caller's output, and shown with
    the error when the rank fails."""
    with tempfile.TemporaryFile(mode="w+") as output:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(output.fileno(), 1)  # this process is the rank's alone: nothing to restore
        os.dup2(output.fileno(), 2)
        try:
            return simulate_rank(config, rank=rank, world_size=world_size, steps=steps)
        except BaseException as e:
            sys.stdout.flush()
            sys.stderr.flush()
            output.seek(0)
            printed = output.read()[-_PRINTED_TAIL:]
            details = traceback.format_exc() + (f"\nwhat it printed (the end):\n{printed}" if printed.strip() else "")
            return (f"{type(e).__name__}: {e}", details)


_PRINTED_TAIL = 4000  # characters of a failed rank's output shown with its error


def simulate_rank(config: RunConfig, *, rank: int, world_size: int, steps: int = 2) -> RankReport:
    """Simulate one rank in this process (it joins, then leaves, a fake process group)."""
    from pretrain.parallel.bootstrap import layout_topology
    from pretrain.planner.fake_world import fake_process_group, fake_tensors, gpu_allocations
    from pretrain.planner.live_memory import LiveMemory
    from pretrain.planner.measure import measure_training
    from pretrain.strategy import strategy_class

    start = time.perf_counter()
    dp = validate_layout(config, world_size)
    p = config.parallel
    strategy_class(config).check_environment(config)
    with fake_process_group(rank=rank, world_size=world_size):
        topo = layout_topology(config, dp=dp, device=CPU)
        with gpu_allocations(), fake_tensors(deepspeed=p.zero_stage > 0), LiveMemory(device_type=CPU.type) as tracker:
            measured = measure_training(config, topo, tracker=tracker, steps=steps)
    return RankReport(
        rank=rank,
        tp_rank=topo.tp_rank,
        pp_rank=topo.pp_rank,
        dp_rank=topo.dp_rank,
        peak=measured.peak,
        peak_step=measured.peak_step,
        steady=measured.steady,
        save=measured.save,
        parameters=measured.parameters,
        micro_batches=config.accumulation_steps(dp),
        zero_stage=p.zero_stage,
        seconds=time.perf_counter() - start,
    )


def _failure(config: RunConfig, world_size: int, failures: list[tuple[int, tuple[str, str]]]) -> DryRunError:
    lines = []
    for rank, (message, _) in failures:
        c = coordinates(config, world_size, rank)
        lines.append(
            f"dry run of rank {rank} (tp_rank {c.tp_rank}, pp_rank {c.pp_rank}, dp_rank {c.dp_rank}) "
            f"of world size {world_size}: {message}"
        )
    error = DryRunError("\n".join(lines))
    for rank, (_, details) in failures:
        error.add_note(f"rank {rank}: {details}")
    return error
