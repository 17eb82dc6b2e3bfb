"""ZeRO's communication per optimizer step, counted on gloo ranks: how many collectives on which
group, how many bytes, and how much of the data-parallel gradient reduction is left for after
the step's last backward pass (the part no compute can hide).

Each layout trains a gpt2-flavour GPT under ZeRO (parallel.zero_stage, default 1) with
pretrain's own Trainer on tests/parallel_harness.py's synthetic batches. Inside every rank
pretrain.parallel.nccl_rules.CommRecorder records every collective (DeepSpeed's and ours all
end in torch.distributed) with its group and the bytes each rank contributes (a reduction's
input; an all-gather's own part), and each one gets the phase of the step it was issued in:
  forward   before a backward pass starts (losses, TP activations)
  backward  inside a backward pass (autograd hooks: DeepSpeed's bucket reductions, SP sums)
  between   after a backward pass ended, before the next one starts (stages 2/3 flush their
            last bucket of every micro-batch here)
  after     after the step's last backward pass ended (what the optimizer step waits for)
The phases come from ZeroEngine's own per-pass callbacks (`_backward_start`, `_backward_end`),
which exist unchanged in the driver before issue 13, so the bench runs against both (copy the
recorder along):

    python bench/zero_comm.py                          # this checkout
    git worktree add /tmp/old COMMIT && cp bench/zero_comm.py /tmp/old/bench/ \\
        && cp pretrain/parallel/nccl_rules.py /tmp/old/pretrain/parallel/ \\
        && python /tmp/old/bench/zero_comm.py          # the driver before

"DP reduction" = all_reduce / reduce / reduce_scatter on the data-parallel group of more than
16 bytes (gradient buckets; the loss and the norm's scalars are left out). "TP all-reduces in
backward" = all_reduce on the tensor-parallel group inside backward passes: with sequence
parallelism these are the SP gradient sums (the layers themselves use all-gather and
reduce-scatter under SP; the vocabulary-parallel loss all-reduces in its forward).

The last line: `RESULT zero_comm ... ratio=R`, R = DP reduction bytes per step / DP reduction
bytes issued after the last backward (1.0: nothing overlapped, as a driver that reduces after
the backward passes; higher: that much less left for after), for ZeRO-1 at DP4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from parallel_harness import build_trainer, free_port  # noqa: E402

from pretrain.config import config_from_dict  # noqa: E402
from pretrain.models.sharding import sharding  # noqa: E402
from pretrain.parallel.nccl_rules import CommRecorder  # noqa: E402

# name -> (overrides, DP size); world = TP x DP
LAYOUTS = {
    "dp2": ([], 2),
    "dp4": ([], 4),
    "tp2_sp_dp2": (["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
}
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def phased_calls(events, group_names: dict[tuple[int, ...], str], world: int) -> list[dict]:
    """One step's collectives from a CommRecorder trace, each with the phase of the step it was
    issued in; the phases come from the "start"/"end" marks of every backward pass."""
    calls, phase, last_end = [], "forward", 0
    for e in events:
        if e.kind == "mark":
            # What follows the step's last pass is "after"; what follows an earlier one until
            # the next pass starts, "between" (stage 2/3's per-micro-batch flush).
            phase = "backward" if e.label == "start" else "between"
            last_end = len(calls) if e.label == "end" else last_end
            continue
        for op in e.ops if e.kind == "post" else ():
            if op.kind == "collective":
                group = group_names.get(op.ranks, "world" if len(op.ranks) == world else "other")
                calls.append({"name": op.name, "group": group, "bytes": op.nbytes, "phase": phase})
    for call in calls[last_end:]:
        call["phase"] = "after"
    return calls


def make_config(args, overrides: list[str], *, dp: int, steps: int):
    base = {
        "model": {
            "flavour": "gpt2",
            "num_layers": args.layers,
            "hidden_size": args.hidden,
            "num_heads": args.heads,
            "vocab_size": args.vocab,
            "seq_length": args.seq,
        },
        "train": {
            "micro_batch_size": 1,
            "global_batch_size": args.micro_batches * dp,
            "seed": 7,
            "steps": steps,
            "device": "cpu",
        },
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "clip_grad": 1.0},
        "schedule": {"warmup_steps": 1},
        "parallel": {"zero_stage": args.stage, "bucket_mb": args.bucket_mb},
    }
    return config_from_dict(base, overrides)


def _rank(rank: int, world: int, port: int, args, overrides: list[str], dp: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from pretrain.parallel.zero import ZeroEngine

    steps = 1 + args.steps
    config = make_config(args, overrides, dp=dp, steps=steps)
    recorder = CommRecorder().__enter__()  # this process only, until it exits
    start, end = ZeroEngine._backward_start, ZeroEngine._backward_end

    def backward_start(self):
        recorder.mark("start")
        return start(self)

    def backward_end(self):
        # Queued by _backward_start for when autograd has finished the pass: every gradient
        # hook has run by then.
        recorder.mark("end")
        return end(self)

    ZeroEngine._backward_start, ZeroEngine._backward_end = backward_start, backward_end
    trainer = build_trainer(config, steps)
    topo = trainer.topo
    groups = {"DP": topo.dp_group, "TP": topo.tp_group}
    names = {tuple(dist.get_process_group_ranks(g)): n for n, g in groups.items() if g is not None}
    per_step = []
    for step in range(1, steps + 1):
        recorder.clear()
        trainer.step(step)
        if step > 1:  # the first step builds DeepSpeed's buffers
            per_step.append(phased_calls(recorder.events, names, world))
    sp_params = sum(1 for c in trainer.chunks for p in c.parameters() if sharding(p).sequence_parallel)
    result = {
        "rank": topo.rank,
        "steps": per_step,
        "sp_params": sp_params,
        "accumulation": trainer.accum,
        "params": trainer.num_params,
        "bucket_bytes": trainer.strategy.ds_config["zero_optimization"]["reduce_bucket_size"] * 4,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see bench/parallel.py: a gloo rank may abort in interpreter teardown


def summarize(step: list[dict]) -> dict:
    def pick(**match):
        return [c for c in step if all(c[k] == v if not isinstance(v, tuple) else c[k] in v for k, v in match.items())]

    dp_red = [c for c in pick(group="DP", name=REDUCTIONS) if c["bytes"] > 16]
    dp_after = [c for c in dp_red if c["phase"] == "after"]
    out = {"collectives": len(step)}
    for group in ("DP", "TP"):
        calls = pick(group=group)
        out[f"{group}_calls"] = len(calls)
        out[f"{group}_bytes"] = sum(c["bytes"] for c in calls)
    out.update(
        dp_reduce_calls=len(dp_red),
        dp_reduce_bytes=sum(c["bytes"] for c in dp_red),
        dp_reduce_calls_after=len(dp_after),
        dp_reduce_bytes_after=sum(c["bytes"] for c in dp_after),
        tp_allreduce_backward=len(pick(group="TP", name="all_reduce", phase="backward")),
        tp_allreduce_after=len(pick(group="TP", name="all_reduce", phase="after")),
        tp_allreduce=len(pick(group="TP", name="all_reduce")),
    )
    out["after_share"] = out["dp_reduce_bytes_after"] / max(1, out["dp_reduce_bytes"])
    return out


def run_layout(args, name: str) -> dict:
    overrides, dp = LAYOUTS[name]
    cfg = make_config(args, overrides, dp=dp, steps=1)
    world = cfg.parallel.tensor * dp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, free_port(), args, overrides, dp, out), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    per_step = [summarize(s) for s in r0["steps"]]
    summary = {k: statistics.mean(s[k] for s in per_step) for k in per_step[0]}
    return {
        "layout": name,
        "world": world,
        "dp": dp,
        "sp_params": r0["sp_params"],
        "accumulation": r0["accumulation"],
        "params_per_rank": r0["params"],
        "bucket_bytes": r0["bucket_bytes"],
        **summary,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per rank per step")
    p.add_argument("--bucket-mb", type=float, default=2.0, help="parallel.bucket_mb (DeepSpeed's reduce bucket)")
    p.add_argument("--steps", type=int, default=2, help="counted steps (after one untimed first step)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"torch {torch.__version__}, gloo; ZeRO-{args.stage}; gpt2 {args.layers} layers, hidden {args.hidden}, "
        f"vocab {args.vocab}, seq {args.seq}, {args.micro_batches} micro-batches per rank, bucket "
        f"{args.bucket_mb} MB, fp32; pretrain at {ROOT}"
    )
    results = [run_layout(args, name) for name in args.layouts]
    print(
        f"\n{'layout':<12}{'ranks':>6}{'colls':>7}{'DP n':>6}{'DP MB':>8}{'TP n':>6}{'TP MB':>7}"
        f"{'red n':>6}{'red MB':>8}{'after n':>8}{'after MB':>9}{'after %':>8}{'bucket MB':>10}"
        f"{'TP ar bwd':>10}{'SP params':>10}"
    )
    for r in results:
        print(
            f"{r['layout']:<12}{r['world']:>6}{r['collectives']:>7.0f}{r['DP_calls']:>6.0f}"
            f"{r['DP_bytes'] / 2**20:>8.2f}{r['TP_calls']:>6.0f}{r['TP_bytes'] / 2**20:>7.2f}"
            f"{r['dp_reduce_calls']:>6.0f}{r['dp_reduce_bytes'] / 2**20:>8.2f}{r['dp_reduce_calls_after']:>8.0f}"
            f"{r['dp_reduce_bytes_after'] / 2**20:>9.2f}{r['after_share']:>8.1%}{r['bucket_bytes'] / 2**20:>10.2f}"
            f"{r['tp_allreduce_backward']:>10.0f}{r['sp_params']:>10}"
        )
    print(
        "per step on rank 0 (mean of the counted steps): colls = all collectives; DP/TP n, MB = calls and bytes "
        "on that group; red = DP gradient reductions; after = those issued after the step's last backward pass "
        "ended; TP ar bwd = TP all-reduces inside backward passes (SP gradient sums)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    by = {r["layout"]: r for r in results}
    fields = []
    for name, r in by.items():
        fields.append(f"{name}_after_share={r['after_share']:.3f}")
        if r["sp_params"]:
            fields.append(f"{name}_tp_allreduce_backward={r['tp_allreduce_backward']:.0f}")
    ref = by.get("dp4") or results[-1]
    ratio = ref["dp_reduce_bytes"] / max(1, ref["dp_reduce_bytes_after"])
    print(f"RESULT zero_comm {' '.join(fields)} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
