"""Layouts worth trying: every layout the code supports for a model on N GPUs, those that fit,
ranked by estimated tokens/s per GPU. Each candidate is the config re-read with its layout's
`key=value` overrides, so a suggestion passes the same validation a training run does."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pretrain.config import ConfigError, RunConfig
from pretrain.hardware import Hardware
from pretrain.planner.memory import RankMemory, peak_rank, plan_memory
from pretrain.planner.timing import StepTime, estimate_step

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Plan:
    """One layout's figures on given GPUs."""

    overrides: tuple[str, ...]
    config: RunConfig
    ranks: list[RankMemory]
    step: StepTime
    memory_limit: int

    @property
    def peak(self) -> RankMemory:
        return peak_rank(self.ranks)

    @property
    def fits(self) -> bool:
        return self.peak.memory.total <= self.memory_limit


def plan(config: RunConfig, world_size: int, hardware: Hardware, overrides: tuple[str, ...] = ()) -> Plan:
    """Memory and step time of the config's own layout (ConfigError when it cannot run)."""
    ranks = plan_memory(config, world_size)
    params = max(r.parameters for r in ranks)
    step = estimate_step(config, world_size, hardware, params)
    return Plan(overrides, config, ranks, step, int(hardware.memory_gib * 2**30))


def suggest(load: Callable[[list[str]], RunConfig], world_size: int, hardware: Hardware, *, top: int = 5) -> list[Plan]:
    """The `top` fastest layouts that fit. `load(overrides)` reads the user's config with the
    layout's overrides added (and validates it)."""
    base = load([])
    plans = []
    for overrides in _layouts(base, world_size, hardware):
        try:
            candidate = plan(load(list(overrides)), world_size, hardware, overrides)
        except ConfigError:
            continue  # a layout the code refuses (shapes that do not divide, ZeRO-2 with tied PP)
        if candidate.fits:
            plans.append(candidate)
    plans.sort(key=lambda c: -c.step.tokens_per_s_per_gpu)
    return plans[:top]


def _layouts(config: RunConfig, world_size: int, hw: Hardware) -> Iterator[tuple[str, ...]]:
    """TP within a node, PP over divisors of the layers, virtual stages, ZeRO stage, sequence
    parallelism (always with TP: it only saves memory), recompute and micro-batch size."""
    m = config.model
    tps = [t for t in (1, 2, 4, 8) if t <= hw.gpus_per_node and world_size % t == 0]
    pps = [p for p in range(1, min(m.num_layers, 32) + 1) if m.num_layers % p == 0]
    for tp, pp, vp, zero, recompute, micro in itertools.product(tps, pps, (1, 2), range(4), RECOMPUTE, (1, 2, 4)):
        if world_size % (tp * pp) or (vp > 1 and pp == 1):
            continue
        yield (
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.virtual_stages={vp}",
            f"parallel.sequence_parallel={str(tp > 1).lower()}",
            f"parallel.zero_stage={zero}",
            f"model.activation_checkpointing={recompute}",
            f"train.micro_batch_size={micro}",
        )
