"""The planner's answer as text (a table a person reads) and as JSON (what scripts read)."""

from __future__ import annotations

import dataclasses

from pretrain.planner.memory import GIB, RankMemory
from pretrain.planner.suggest import Plan

ROWS = (
    ("weights", "weights", ""),
    ("gradients", "gradients", ""),
    ("optimizer", "optimizer state", ""),
    ("activations", "activations", "saved for backward by the micro-batches in flight, logits included"),
    ("step_transient", "optimizer step", "ZeRO's fp32 gradient partition, while no activations are held"),
    ("comm_buffers", "comm buffers", "ZeRO's reduce/gather buckets (parallel.bucket_mb each)"),
    ("overhead", "overhead", "estimate: CUDA context, NCCL buffers, 5% allocator slack"),
)


def describe_layout(plan: Plan, world_size: int) -> str:
    c = plan.config
    p, t = c.parallel, c.train
    dp = world_size // (p.tensor * p.pipeline * p.context)
    context = f" x context {p.context} ({p.context_attention})" if p.context > 1 else ""
    expert = f" (expert {p.expert} of them)" if p.expert > 1 else ""
    parts = [f"tensor {p.tensor} x pipeline {p.pipeline}{context} x data {dp}{expert}"]
    if p.virtual_stages > 1:
        parts.append(f"{p.virtual_stages} virtual stages")
    parts.append(f"ZeRO-{p.zero_stage}" if p.zero_stage else "no ZeRO")
    if p.sequence_parallel:
        parts.append("sequence parallel")
    parts.append(f"recompute {c.model.activation_checkpointing}")
    parts.append(f"micro-batch {t.micro_batch_size} x {c.accumulation_steps(dp)} per step, {t.precision}")
    return ", ".join(parts)


def text_report(plan: Plan, world_size: int, hardware) -> str:
    ranks = _shown_ranks(plan.ranks)
    head = f"{'per-GPU memory (GiB)':<22}" + "".join(f"{'pp rank ' + str(r.pp_rank):>12}" for r in ranks)
    lines = [f"layout: {describe_layout(plan, world_size)}", f"hardware: {hardware.description}", head]
    for key, label, note in ROWS:
        values = "".join(f"{getattr(r.memory, key) / GIB:12.2f}" for r in ranks)
        lines.append(f"  {label:<20}{values}" + (f"   ({note})" if note else ""))
    lines.append(f"  {'total':<20}" + "".join(f"{r.memory.total / GIB:12.2f}" for r in ranks))
    lines.append(f"  {'parameters':<20}" + "".join(f"{r.parameters / 1e9:11.2f}B" for r in ranks))
    if any(r.expert_parameters for r in ranks):
        lines.append(f"  {'of which experts':<20}" + "".join(f"{r.expert_parameters / 1e9:11.2f}B" for r in ranks))
    lines.append(f"  {'in flight':<20}" + "".join(f"{r.in_flight:12d}" for r in ranks))
    peak, limit = plan.peak.memory.total, plan.memory_limit
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak {peak / GIB:.1f} GiB of {limit / GIB:.0f} GiB per GPU: {verdict}")
    s, p = plan.step, plan.config.parallel
    # the context- and expert-parallel parts only where the layout has them
    context = f", context-parallel exposed {s.context_parallel:.2f}" if p.context > 1 else ""
    expert = f", expert all-to-all {s.expert_parallel:.2f}" if p.expert > 1 else ""
    active = " (of active parameters)" if plan.config.model.moe is not None else ""
    lines.append(
        f"step {s.seconds:.2f} s (compute {s.compute:.2f}, bubble {s.bubble:.2f}, tensor-parallel "
        f"{s.tensor_parallel:.2f}, pipeline sends {s.pipeline_transfers:.2f}{context}{expert}, data-parallel "
        f"exposed {s.data_parallel:.2f}, optimizer {s.optimizer:.2f}): {s.tokens_per_s_per_gpu:,.0f} tokens/s "
        f"per GPU, MFU {100 * s.mfu:.1f}%{active}"
    )
    return "\n".join(lines)


def suggestions_report(plans: list[Plan], world_size: int) -> str:
    if not plans:
        return "no layout the code supports fits on these GPUs: use more GPUs or GPUs with more memory"
    lines = ["fastest layouts that fit (estimated):"]
    for i, plan in enumerate(plans, 1):
        lines.append(
            f"{i}. {plan.step.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MFU {100 * plan.step.mfu:.1f}%, "
            f"peak {plan.peak.memory.total / GIB:.1f} GiB: {describe_layout(plan, world_size)}"
        )
        lines.append(f"   {' '.join(plan.overrides)}")
    return "\n".join(lines)


def json_report(plan: Plan, world_size: int) -> dict:
    return {
        "layout": describe_layout(plan, world_size),
        "overrides": list(plan.overrides),
        "fits": plan.fits,
        "memory_limit_bytes": plan.memory_limit,
        "peak_bytes": plan.peak.memory.total,
        "ranks": [_rank_json(r) for r in plan.ranks],
        "step": dataclasses.asdict(plan.step),
    }


def _rank_json(rank: RankMemory) -> dict:
    memory = dataclasses.asdict(rank.memory)
    return {
        "pp_rank": rank.pp_rank,
        "parameters": rank.parameters,
        "expert_parameters": rank.expert_parameters,
        "in_flight": rank.in_flight,
        **memory,
    }


def _shown_ranks(ranks: list[RankMemory]) -> list[RankMemory]:
    """Every pipeline rank up to 8 of them; else the first, the fullest and the last."""
    if len(ranks) <= 8:
        return ranks
    fullest = max(ranks, key=lambda r: r.memory.total)
    return sorted({id(r): r for r in (ranks[0], fullest, ranks[-1])}.values(), key=lambda r: r.pp_rank)


OWNED = ("weights", "gradients", "optimizer", "activations")


def dry_run_report(reports, plan: Plan, world_size: int) -> str:
    """Each simulated rank's peak by category next to the planner's figure for its pipeline rank
    (the parts the framework owns: no CUDA context, NCCL or allocator slack on fake tensors)."""
    lines = [f"dry run: the real training step at full size on fake tensors, world size {world_size}"]
    for report in reports:
        planned = plan.ranks[report.pp_rank].memory
        lines.append(f"  {report.describe()}: {report.parameters / 1e9:.2f}B parameters, {report.seconds:.0f} s")
        lines.append(f"    {'GiB':<16}{'planner':>10}{'dry run':>10}")
        for key in OWNED:
            ours = getattr(planned, key) if key != "activations" else max(planned.activations, planned.step_transient)
            lines.append(f"    {key:<16}{ours / GIB:10.2f}{getattr(report.peak, key) / GIB:10.2f}")
        lines.append(f"    {'total':<16}{planned.owned / GIB:10.2f}{report.peak.total / GIB:10.2f}")
        save = report.save
        lines.append(
            f"    checkpoint save: {save.host_bytes / GIB:.2f} GiB of host memory (this rank's share "
            f"{save.share_bytes / GIB:.2f} GiB, {save.tensors} tensors)"
        )
    return "\n".join(lines)


def dry_run_json(report) -> dict:
    return {
        "rank": report.rank,
        "coordinates": {"tp": report.tp_rank, "pp": report.pp_rank, "dp": report.dp_rank},
        "parameters": report.parameters,
        "peak": dataclasses.asdict(report.peak),
        "steady": dataclasses.asdict(report.steady),
        "save": dataclasses.asdict(report.save),
        "seconds": report.seconds,
    }
