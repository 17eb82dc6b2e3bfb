"""Per-rank peak memory three ways, side by side: measured on real gloo ranks, simulated by the
dry run on fake tensors, and computed by the planner.

Each layout trains a GPT-2 of 4 layers (hidden 256, sequence 256, vocabulary 4000, micro-batch
2) for two real steps. Measured: the ranks run pretrain's Trainer on real CPU tensors under
pretrain/planner/live_memory.py's tracker (live storages, each once, split at the peak into
weights, gradients, optimizer state and everything else), allocating as a GPU rank does where
the CPU path differs (the loss's logits buffer: fake_world.gpu_allocations). Dry run: the same
ranks simulated at the same world size (pretrain/planner/dry_run.py). Planner: pretrain/planner/
memory.py without its estimated overheads (the framework-owned parts: weights, gradients,
optimizer state, the larger of the activations and the optimizer step's transient, and the
communication buckets).

    python bench/planner_memory.py                      # every layout (~5 min on 2 cores)
    python bench/planner_memory.py --layouts tp2 zero3

Last lines: `RESULT planner_memory_<layout>_rank<R> measured_mib=... dry_run_mib=... planner_mib=...
dry_ratio=<dry run / measured> planner_ratio=<planner / measured>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from parallel_harness import run_ranks  # noqa: E402

from pretrain.config import config_from_dict  # noqa: E402
from pretrain.planner.dry_run import dry_run  # noqa: E402
from pretrain.planner.memory import MIB, plan_memory  # noqa: E402

MODEL = {"flavour": "gpt2", "num_layers": 4, "hidden_size": 256, "num_heads": 8, "vocab_size": 4000, "seq_length": 256}
BF16 = ["train.precision=bf16"]
# name -> (world size, overrides)
LAYOUTS = {
    "single_fp32": (1, ["model.activation_checkpointing=none"]),
    "single_bf16_selective": (1, BF16 + ["model.activation_checkpointing=selective"]),
    "single_bf16_full": (1, BF16 + ["model.activation_checkpointing=full"]),
    "tp2_sp_bf16": (2, BF16 + ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2_interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_stages=2", "train.global_batch_size=8"]),
    "dp2_zero0_bf16": (2, BF16),
    "dp2_zero1_bf16": (2, BF16 + ["parallel.zero_stage=1"]),
    "dp2_zero2_bf16": (2, BF16 + ["parallel.zero_stage=2"]),
    "dp2_zero3_bf16": (2, BF16 + ["parallel.zero_stage=3"]),
}


def config_of(world: int, overrides: list[str]):
    # Buckets of 1 MiB: at the default 25 MiB DeepSpeed's reduce buckets would outweigh this
    # small model's gradients (8 MiB), which no real run sees.
    raw = {
        "model": MODEL,
        "train": {"micro_batch_size": 2, "global_batch_size": 4 * world},
        "parallel": {"bucket_mb": 1.0},
    }
    return config_from_dict(raw, overrides)


def measure(world: int, overrides: list[str]) -> dict:
    """In a real gloo rank: its peak, by category."""
    from pretrain.parallel.bootstrap import init_distributed
    from pretrain.planner.fake_world import gpu_allocations
    from pretrain.planner.live_memory import LiveMemory
    from pretrain.planner.measure import measure_training

    config = config_of(world, overrides)
    topo = init_distributed(config, device=torch.device("cpu"))
    with gpu_allocations(), LiveMemory() as tracker:
        measured = measure_training(config, topo, tracker=tracker)
    return {"pp_rank": topo.pp_rank, **dataclasses.asdict(measured.peak)}


def compare(name: str) -> list[dict]:
    world, overrides = LAYOUTS[name]
    config = config_of(world, overrides)
    measured = run_ranks(world, measure, world, overrides)
    simulated = dry_run(config, world_size=world, ranks=list(range(world)))
    planned = plan_memory(config, world, overhead=False)
    rows = []
    for rank, (real, dry) in enumerate(zip(measured, simulated)):
        real_total = sum(real[k] for k in ("weights", "gradients", "optimizer", "activations"))
        planner_total = planned[real["pp_rank"]].memory.owned
        rows.append(
            {
                "layout": name,
                "rank": rank,
                "measured": real_total,
                "dry_run": dry.peak.total,
                "planner": planner_total,
                "measured_parts": {k: real[k] for k in ("weights", "gradients", "optimizer", "activations")},
                "dry_parts": dataclasses.asdict(dry.peak),
                "planner_parts": _planner_parts(planned[real["pp_rank"]].memory),
            }
        )
    return rows


def _planner_parts(memory) -> dict:
    return {
        "weights": memory.weights,
        "gradients": memory.gradients,
        "optimizer": memory.optimizer,
        # The tracker counts DeepSpeed's buckets among activations (or gradients: its reduce
        # buffers): the planner's own column for them is added here.
        "activations": max(memory.activations, memory.step_transient) + memory.comm_buffers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    rows = [row for name in args.layouts for row in compare(name)]
    header = ("measured MiB", "dry run", "planner", "dry/meas", "plan/meas")
    print(f"{'layout':<24}{'rank':>5}{header[0]:>14}" + "".join(f"{h:>10}" for h in header[1:]))
    for r in rows:
        dry, plan = r["dry_run"] / r["measured"], r["planner"] / r["measured"]
        print(
            f"{r['layout']:<24}{r['rank']:>5}{r['measured'] / MIB:>14.1f}{r['dry_run'] / MIB:>10.1f}"
            f"{r['planner'] / MIB:>10.1f}{dry:>10.3f}{plan:>10.3f}"
        )
        for source in ("measured", "dry", "planner"):
            parts = r[f"{source}_parts"]
            print(f"    {source:<9}" + "  ".join(f"{k} {v / MIB:.1f}" for k, v in parts.items()))
    for r in rows:
        figures = (
            f"measured_mib={r['measured'] / MIB:.1f} dry_run_mib={r['dry_run'] / MIB:.1f} "
            f"planner_mib={r['planner'] / MIB:.1f} dry_ratio={r['dry_run'] / r['measured']:.3f} "
            f"planner_ratio={r['planner'] / r['measured']:.3f}"
        )
        print(f"RESULT planner_memory_{r['layout']}_rank{r['rank']} {figures}")


if __name__ == "__main__":
    main()
