"""Will it fit, and how fast? Per-GPU memory and estimated step time of a config's layout.

    python tools/plan.py configs/gpt_13b.yaml --gpus 128 --hardware h100
    python tools/plan.py configs/llama_70b.yaml parallel.tensor=8 --gpus 256 --hardware h100 --suggest
    python tools/plan.py configs/gpt_13b.yaml --gpus 128 --hardware h100 --dry-run

Exit code 0: the layout fits; 1: it does not (the breakdown and the fastest layout that fits
are printed), or a simulated rank failed in the dry run; 2: a bad request (unknown hardware,
a layout that cannot run on that many GPUs).
`--suggest` ranks the layouts the code supports that fit (expert parallelism for a MoE model,
context parallelism for long sequences included); `--dry-run` also builds the real
model, optimizer and schedule of the first and last pipeline rank at full size on fake tensors
over a fake process group of the requested world size and runs one training step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import ConfigError, load_config
from pretrain.hardware import get_hardware
from pretrain.planner.dry_run import DryRunError, dry_run
from pretrain.planner.report import dry_run_json, dry_run_report, json_report, suggestions_report, text_report
from pretrain.planner.suggest import plan, suggest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs (world size)")
    parser.add_argument("--hardware", default="h100", help="a100-40gb, a100-80gb, h100, h200, b200 or cpu")
    parser.add_argument("--memory-gib", type=float, help="usable memory per GPU (default: the hardware's)")
    parser.add_argument("--suggest", action="store_true", help="also rank the layouts that fit")
    parser.add_argument("--top", type=int, default=5, help="how many suggestions (default 5)")
    parser.add_argument("--dry-run", action="store_true", help="simulate one step of the real code at full size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        if args.gpus < 1:
            raise ConfigError(f"--gpus must be at least 1, got {args.gpus}")
        hardware = _hardware(args.hardware, args.memory_gib)
        config = load_config(args.config, args.overrides)
        mine = plan(config, args.gpus, hardware, tuple(args.overrides))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    alternatives = []
    if args.suggest or not mine.fits:
        alternatives = suggest(lambda extra: load_config(args.config, args.overrides + extra), args.gpus, hardware)
    try:
        # The fewest micro-batches that show every phase of the schedule: the same peak, sooner
        # (pretrain/planner/dry_run.py, fewer_micro_batches).
        simulated = dry_run(config, world_size=args.gpus, micro_batches=1) if args.dry_run else []
    except DryRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"plan": json_report(mine, args.gpus), "suggestions": [json_report(p, args.gpus) for p in alternatives]}
    if args.dry_run:
        result["dry_run"] = [dry_run_json(r) for r in simulated]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(text_report(mine, args.gpus, hardware))
        if alternatives or not mine.fits:
            print(suggestions_report(alternatives[: args.top if args.suggest else 1], args.gpus))
        if args.dry_run:
            print(dry_run_report(simulated, mine, args.gpus))
    return 0 if mine.fits else 1


def _hardware(name: str, memory_gib: float | None):
    hardware = get_hardware(name)
    if memory_gib is None:
        return hardware
    if memory_gib <= 0:
        raise ConfigError(f"--memory-gib must be positive, got {memory_gib}")
    import dataclasses

    return dataclasses.replace(hardware, memory_gib=memory_gib)


if __name__ == "__main__":
    sys.exit(main())
