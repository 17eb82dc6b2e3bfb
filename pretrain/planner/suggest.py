"""Layouts worth trying: every layout the code supports for a model on N GPUs, those that fit,
ranked by estimated tokens/s per GPU. Each candidate is the config re-read with its layout's
`key=value` overrides, so a suggestion passes the same validation a training run does."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pretrain.config import ConfigError, RunConfig
from pretrain.hardware import Hardware
from pretrain.planner.memory import RankMemory, model_state_floor, peak_rank, plan_memory
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
    largest = max(ranks, key=lambda r: r.parameters)
    step = estimate_step(config, world_size, hardware, largest.parameters, largest.expert_parameters)
    return Plan(overrides, config, ranks, step, int(hardware.memory_gib * 2**30))


def suggest(load: Callable[[list[str]], RunConfig], world_size: int, hardware: Hardware, *, top: int = 5) -> list[Plan]:
    """The `top` fastest layouts that fit. `load(overrides)` reads the user's config with the
    layout's overrides added (and validates it)."""
    base = load([])
    limit = int(hardware.memory_gib * 2**30)
    plans = []
    for overrides in _layouts(base, world_size, hardware):
        try:
            config = load(list(overrides))
            if model_state_floor(config, world_size) > limit:
                continue  # cannot fit whatever its activations: not worth probing them
            candidate = plan(config, world_size, hardware, overrides)
        except ConfigError:
            continue  # a layout the code refuses (shapes that do not divide, ZeRO-2 with tied PP)
        if candidate.fits:
            plans.append(candidate)
    plans.sort(key=lambda c: -c.step.tokens_per_s_per_gpu)
    return plans[:top]


def _layouts(config: RunConfig, world_size: int, hw: Hardware) -> Iterator[tuple[str, ...]]:
    """TP within a node, PP over divisors of the layers, virtual stages, ZeRO stage, sequence
    parallelism (always with TP: it only saves memory), recompute and micro-batch size; expert
    parallelism over the divisors of a MoE model's experts; context parallelism (both attention
    methods) for long sequences."""
    m = config.model
    tps = [t for t in (1, 2, 4, 8) if t <= hw.gpus_per_node and world_size % t == 0]
    pps = [p for p in range(1, min(m.num_layers, 32) + 1) if m.num_layers % p == 0]
    experts = [e for e in (1, 2, 4, 8, 16, 32, 64) if m.moe is not None and m.moe.num_experts % e == 0] or [1]
    contexts = [(1, "all_gather")] + [(c, a) for c in _context_sizes(m.seq_length) for a in ("all_gather", "ring")]
    grid = itertools.product(tps, pps, contexts, experts, (1, 2), range(4), RECOMPUTE, (1, 2, 4))
    for tp, pp, (cp, attention), ep, vp, zero, recompute, micro in grid:
        if world_size % (tp * pp * cp * ep) or (vp > 1 and pp == 1):
            continue
        layout = [
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.virtual_stages={vp}",
            f"parallel.sequence_parallel={str(tp > 1).lower()}",
        ]
        if len(contexts) > 1:
            layout += [f"parallel.context={cp}", f"parallel.context_attention={attention}"]
        if len(experts) > 1:
            layout.append(f"parallel.expert={ep}")
        yield (
            *layout,
            f"parallel.zero_stage={zero}",
            f"model.activation_checkpointing={recompute}",
            f"train.micro_batch_size={micro}",
        )


# Context parallelism is tried where each CP rank still holds this many tokens of a sequence:
# below it, the per-layer K/V collectives cost more than the attention work they split (at 256
# tokens CP 2 ran at 0.56 of one rank's speed per rank: bench/RESULTS.md, "Context parallelism"),
# and the layouts to try would multiply for every model.
CONTEXT_MIN_TOKENS = 4096


def _context_sizes(seq_length: int) -> list[int]:
    return [c for c in (2, 4, 8, 16) if seq_length // c >= CONTEXT_MIN_TOKENS and seq_length % (2 * c) == 0]
