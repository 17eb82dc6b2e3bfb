"""Training-step throughput and communication share of each parallel layout, on CPU with gloo.

Every layout trains the same llama-flavour GPT on the same global batches (synthetic tokens,
split across DP ranks the way the loader splits them; tests/parallel_harness.py's data), with
pretrain's own Trainer (schedule, gradient sync, clipping, AdamW): a few warm-up steps, then
timed steps; each layout runs --repeat times (passes over all layouts) and its fastest run is
kept, since other jobs on a shared machine only ever slow a run down. Each rank is a real
process (torch.multiprocessing spawn, gloo over loopback) running torch.set_num_threads(1); the
single-process baseline runs the same way, in one spawned process with one thread.

Communication time is measured inside each rank with pretrain.parallel.nccl_rules.CommRecorder,
which records every torch.distributed collective and point-to-point call (batched groups
included) with the wall time spent in it and in each wait on its request. So it is the time a
rank's Python thread spends inside communication calls: transfer plus waiting for the peer
(pipeline bubbles, load imbalance), not communication hidden behind compute by async ops.

    python bench/parallel.py                       # all layouts, default shape, 2 passes (~3 min)
    python bench/parallel.py --layouts single tp2  # a subset
    python bench/parallel.py --layouts cp2 cp2_ring --cp-memory-seq 4096
    python bench/parallel.py --layouts pp2_1f1b pp2_vp2 pp2_zb_h1 pp2_zb_v --cp-memory-seq 0

Context parallelism (parallel.context): besides its throughput rows (cp2: K/V all-gathered, cp2_ring:
K/V passed round the ring), a section measures the activation memory per rank of one long
sequence at CP = 1, 2, 4 with each attention: every rank's live storages counted during two
training steps (pretrain/planner/measure.py, the planner's own measurement; the peak split into
weights, gradients, optimizer state and activations by what the trainer holds). Its RESULT line's
ratio is (CP 1's activations / 4) / CP 4's: 1.0 means activations fall exactly as 1/CP.

Pipeline schedules (parallel.pipeline_schedule, issue 20): the PP=2 rows run 1F1B, interleaved
1F1B (2 chunks per rank), ZB-H1 and ZB-V at the same micro-batch count. Their bubble is measured
as the time each rank waits in the pipeline: on its receives (the executor's exchange waits,
recorded by CommRecorder: seconds inside waits on point-to-point groups), then from the end of its
own schedule until the slowest rank's ends. With fewer free cores than ranks that wall time also
holds time a peer spent descheduled, so the same steps are also replayed on dedicated cores from
each operation's measured CPU time (bench/pipeline_replay.py), next to the idle share the
schedule's model predicts (1F1B (p-1)(F+B+W), interleaved half that, the zero-bubble schedules'
own simulation at F : B : W = 4 : 4 : 3). A section measures each schedule's activation memory per pipeline rank
(the planner's live-storage measurement over two training steps, as the CP section). Its RESULT
lines: parallel_pp2_bubble ratio = interleaved's wait / the larger zero-bubble wait (> 1: both
zero-bubble schedules wait less); parallel_pp2_bubble_replayed the same for the replayed bubble
(the replayed step less the busier rank's work: the stages' imbalance taken out);
parallel_pp2_activations ratio = 1F1B's largest rank / the
largest rank of any zero-bubble schedule (1.0: the same peak).

Per layout the last lines are `RESULT parallel_<layout> tokens_per_s_per_rank=... step_s=...
comm_share=... ratio=...`, ratio = tokens/s per rank of the layout / tokens/s of the
single process: the scaling efficiency per rank (1.0: every rank as productive as one process
alone; 2 ranks at ratio r train 2r times as fast as one process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from parallel_harness import build_trainer, free_port  # noqa: E402
from pipeline_replay import OpTimer, replay  # noqa: E402

from pretrain.config import config_from_dict  # noqa: E402
from pretrain.parallel.nccl_rules import CommRecorder  # noqa: E402

# name -> (overrides, world size)
LAYOUTS = {
    "single": ([], 1),
    "tp2": (["parallel.tensor=2"], 2),
    "tp2_sp": (["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
    "pp2_1f1b": (["parallel.pipeline=2"], 2),
    "pp2_vp2": (["parallel.pipeline=2", "parallel.virtual_stages=2"], 2),
    "dp2": ([], 2),
    "tp2_pp2": (["parallel.tensor=2", "parallel.pipeline=2"], 4),
    "tp2_pp2_dp2": (["parallel.tensor=2", "parallel.pipeline=2"], 8),
    "cp2": (["parallel.context=2"], 2),
    "cp2_ring": (["parallel.context=2", "parallel.context_attention=ring"], 2),
    "pp2_zb_h1": (["parallel.pipeline=2", "parallel.pipeline_schedule=zb-h1"], 2),
    "pp2_zb_v": (["parallel.pipeline=2", "parallel.pipeline_schedule=zb-v"], 2),
}
# The PP=2 rows of the pipeline section, by schedule (the same micro-batch count in each).
PIPELINE_ROWS = {"1f1b": "pp2_1f1b", "interleaved": "pp2_vp2", "zb-h1": "pp2_zb_h1", "zb-v": "pp2_zb_v"}


def comm_seconds(events) -> dict[str, float]:
    """Wall time inside communication calls and waits, by kind (one step's CommRecorder events)."""
    kinds = {
        e.unit: "p2p" if any(op.kind != "collective" for op in e.ops) else "collective"
        for e in events
        if e.kind == "post"
    }
    seconds = {"collective": 0.0, "p2p": 0.0}
    for e in events:
        if e.kind in ("post", "wait") and e.unit in kinds:
            seconds[kinds[e.unit]] += e.seconds
    return seconds


def p2p_wait_seconds(events) -> float:
    """Seconds inside waits on point-to-point groups: for a pipeline rank, the time it waits on
    its neighbours (the executor posts a step's transfers, runs its W's, then waits)."""
    p2p = {e.unit for e in events if e.kind == "post" and any(op.kind != "collective" for op in e.ops)}
    return sum(e.seconds for e in events if e.kind == "wait" and e.unit in p2p)


def pipeline_waits(ranks: list[dict]) -> list[list[float]]:
    """Per rank, per timed step: seconds waiting on pipeline receives, plus (PP > 1) the time
    from the end of its own schedule to the end of the slowest rank's, which it spends waiting
    in the next collective (ranks start each step together, after a barrier)."""
    if not all(r["pipeline_s"] for r in ranks):  # no pipeline: the trainer made no progress calls
        return [[s["wait_s"] for s in r["steps"]] for r in ranks]
    slowest = [max(ends) for ends in zip(*(r["pipeline_s"] for r in ranks))]
    return [[s["wait_s"] + last - end for s, end, last in zip(r["steps"], r["pipeline_s"], slowest)] for r in ranks]


def make_config(args, overrides: list[str], *, steps: int):
    base = {
        "model": {
            "flavour": "llama",
            "num_layers": args.layers,
            "hidden_size": args.hidden,
            "num_heads": args.heads,
            "num_kv_heads": args.kv_heads,
            "vocab_size": args.vocab,
            "seq_length": args.seq,
        },
        "train": {
            "micro_batch_size": args.micro,
            "global_batch_size": args.global_batch,
            "seed": 7,
            "steps": steps,
            "device": "cpu",
        },
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "clip_grad": 1.0},
        "schedule": {"warmup_steps": 1},
    }
    return config_from_dict(base, overrides)


def _rank(rank: int, world: int, port: int, args, overrides: list[str], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    steps = args.warmup + args.steps
    config = make_config(args, overrides, steps=steps)
    barrier = dist.barrier  # the unrecorded one: aligns ranks between steps, not timed
    recorder = CommRecorder().__enter__()  # this process only, until it exits
    trainer = build_trainer(config, steps)
    topo = trainer.topo
    timer = trainer.progress = OpTimer()  # CPU seconds of each pipeline operation (pipeline_replay.py)
    records = []
    for step in range(1, steps + 1):
        if world > 1:
            barrier()
        recorder.clear()
        timer.start_step()
        start = time.perf_counter()
        loss = trainer.step(step)["loss"]
        elapsed = time.perf_counter() - start
        calls = sum(e.kind == "post" for e in recorder.events)
        records.append(
            {
                "step_s": elapsed,
                "comm_s": comm_seconds(recorder.events),
                "wait_s": p2p_wait_seconds(recorder.events),
                "calls": calls,
                "loss": loss,
            }
        )
    result = {
        "rank": topo.rank,
        "logging": topo.is_logging_rank,
        "steps": records[args.warmup :],
        "first_loss": records[0]["loss"],
        "pp_rank": topo.pp_rank,
        "op_seconds": timer.steps[args.warmup :],
        "pipeline_s": timer.ends[args.warmup :],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()
        # A gloo rank process occasionally aborts in interpreter teardown, after all of this has
        # finished ("terminate called without an active exception", SIGABRT; seen in ~1 of 10
        # DP=2 runs here). The results are written and the group is gone: skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_layout(args, name: str) -> dict:
    overrides, world = LAYOUTS[name]
    make_config(args, overrides, steps=1)  # a bad shape fails here, before any process starts
    wall, busy, ours = time.perf_counter(), _busy_cpu_s(), _children_cpu_s()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, free_port(), args, overrides, out), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    wall = time.perf_counter() - wall
    # Other processes on the machine (other users' jobs) compete for the same cores: the CPU the
    # machine spent busy during this layout, less what our rank processes used, in cores.
    foreign = max(0.0, (_busy_cpu_s() - busy) - (_children_cpu_s() - ours)) / wall
    # The step is as slow as its slowest rank; each rank's median over the timed steps.
    step_s = max(statistics.median(s["step_s"] for s in r["steps"]) for r in ranks)
    shares = [statistics.mean(sum(s["comm_s"].values()) / s["step_s"] for s in r["steps"]) for r in ranks]
    p2p = [statistics.mean(s["comm_s"]["p2p"] / s["step_s"] for s in r["steps"]) for r in ranks]
    tokens = args.global_batch * args.seq
    (logging,) = [r for r in ranks if r["logging"]]
    return {
        "layout": name,
        "world": world,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_rank": tokens / step_s / world,
        "comm_share": statistics.mean(shares),
        "comm_share_min": min(shares),
        "comm_share_max": max(shares),
        "p2p_share": statistics.mean(p2p),
        "calls_per_step": statistics.mean(r["steps"][-1]["calls"] for r in ranks),
        # per rank (rank order): median seconds per step it waits in the pipeline, and their share
        "wait_s": [statistics.median(w) for w in pipeline_waits(ranks)],
        "wait_share": [
            statistics.mean(w / s["step_s"] for w, s in zip(waits, r["steps"]))
            for waits, r in zip(pipeline_waits(ranks), ranks)
        ],
        "op_seconds": [r["op_seconds"] for r in ranks],  # rank order (pipeline rank order at PP=2 alone)
        "first_loss": logging["first_loss"],
        "wall_s": wall,
        "foreign_cores": foreign,
    }


def _memory_rank(rank: int, world: int, port: int, args, overrides: list[str], out: str) -> None:
    """One rank of a run at `overrides`: its peak memory over two training steps, by category."""
    from pretrain.parallel.bootstrap import init_distributed
    from pretrain.planner.fake_world import gpu_allocations
    from pretrain.planner.live_memory import LiveMemory
    from pretrain.planner.measure import measure_training

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    config = make_config(args, overrides, steps=2)
    topo = init_distributed(config, device=torch.device("cpu"))
    # As a GPU allocates (no logits buffer kept between steps), as the planner's benches measure.
    with gpu_allocations(), LiveMemory() as tracker:
        measured = measure_training(config, topo, tracker=tracker)
    peak = measured.peak
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"activations": peak.activations, "total": peak.total, "pp_rank": topo.pp_rank})
    )
    if world > 1:
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as _rank: skip gloo's occasionally aborting teardown


def measure_memory(args, overrides: list[str], world: int) -> list[dict]:
    """Every rank's peak memory (rank order) of a run at `overrides` on `world` ranks."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_memory_rank, args=(world, free_port(), args, overrides, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def cp_memory(args) -> list[dict]:
    """Peak activation memory per rank (the largest over ranks) at CP = 1, 2, 4, each attention."""
    rows = []
    for cp, method in [(1, "all_gather"), (2, "all_gather"), (4, "all_gather"), (2, "ring"), (4, "ring")]:
        start = time.perf_counter()
        overrides = [
            f"parallel.context={cp}",
            f"parallel.context_attention={method}",
            f"model.seq_length={args.cp_memory_seq}",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
        ]
        ranks = measure_memory(args, overrides, cp)
        rows.append(
            {
                "cp": cp,
                "attention": "-" if cp == 1 else method,
                "activations": max(r["activations"] for r in ranks),
                "total": max(r["total"] for r in ranks),
                "wall_s": time.perf_counter() - start,
            }
        )
        print(f"  CP {cp} {rows[-1]['attention']}: {rows[-1]['wall_s']:.0f} s wall", flush=True)
    return rows


def print_cp_memory(args, rows: list[dict]) -> None:
    mib = 2**20
    base = rows[0]["activations"]
    print(
        f"\nactivation memory per rank, one sequence of {args.cp_memory_seq} tokens (llama {args.layers} layers, "
        f"hidden {args.hidden}, fp32; peak over 2 training steps, largest rank):"
    )
    print(f"{'CP':>4}{'attention':>12}{'activations MiB':>17}{'x CP 1':>8}{'1/CP':>7}{'peak total MiB':>16}")
    for r in rows:
        print(
            f"{r['cp']:>4}{r['attention']:>12}{r['activations'] / mib:>17.1f}{r['activations'] / base:>8.3f}"
            f"{1 / r['cp']:>7.3f}{r['total'] / mib:>16.1f}"
        )


def cp_memory_results(rows: list[dict]) -> list[str]:
    mib, lines = 2**20, []
    for method in ("all_gather", "ring"):
        by_cp = {r["cp"]: r["activations"] for r in rows if r["attention"] in ("-", method)}
        lines.append(
            f"RESULT parallel_cp_memory_{method} activation_mb_cp1={by_cp[1] / mib:.1f} "
            f"activation_mb_cp2={by_cp[2] / mib:.1f} activation_mb_cp4={by_cp[4] / mib:.1f} "
            f"ratio={by_cp[1] / 4 / by_cp[4]:.3f}"
        )
    return lines


def model_idle_share(schedule: str, *, pp: int, micro: int) -> float:
    """The share of a step a rank idles in the schedule's model: the zero-bubble schedules' own
    simulation (pretrain/parallel/zero_bubble.py figures), 1F1B's (p-1)(F+B+W) and interleaved's
    half of it (shares that do not depend on the costs)."""
    from pretrain.parallel.zero_bubble import figures

    if schedule in ("zb-h1", "zb-v"):
        f = figures(pp=pp, micro_batches=micro, v_shape=schedule == "zb-v")
        return (f["makespan"] - f["work"]) / f["makespan"]
    bubble = (pp - 1) / (2 if schedule == "interleaved" else 1)
    return bubble / (micro + bubble)


def replayed_waits(args, name: str, runs: list[list[dict]]) -> tuple[list[float], list[float]]:
    """(wait, busy) seconds per step per pipeline rank of a PP=2 row on dedicated cores: its
    real schedule replayed with each operation's measured CPU time (bench/pipeline_replay.py)."""
    from pipeline_replay import OpTimer

    from pretrain.parallel.pipeline import make_schedule
    from pretrain.parallel.topology import grid_position

    p = make_config(args, LAYOUTS[name][0], steps=1).parallel
    micro = args.global_batch // args.micro
    topos = [
        grid_position(rank=r, pp=2, virtual_stages=p.virtual_stages, pipeline_schedule=p.pipeline_schedule)
        for r in range(2)
    ]
    schedules = [make_schedule(topo, micro) for topo in topos]
    costs = []
    for steps in runs:
        timer = OpTimer()
        timer.steps = steps
        costs.append(timer.costs())
    return replay(topos, schedules, costs), [sum(c.values()) for c in costs]


def pipeline_memory(args) -> dict[str, list[int]]:
    """Peak activation bytes per pipeline rank (rank order) of each PP=2 schedule."""
    memory = {}
    for schedule, name in PIPELINE_ROWS.items():
        start = time.perf_counter()
        overrides, world = LAYOUTS[name]
        ranks = sorted(measure_memory(args, overrides, world), key=lambda r: r["pp_rank"])
        memory[schedule] = [r["activations"] for r in ranks]
        print(f"  activations {schedule}: {time.perf_counter() - start:.0f} s wall", flush=True)
    return memory


def print_pipeline(args, best: dict[str, dict], memory: dict[str, list[int]]) -> None:
    micro, mib = args.global_batch // args.micro, 2**20
    print(
        f"\npipeline schedules, PP=2, {micro} micro-batches, seconds per step per pipeline rank (r0, r1): work = "
        "CPU time of its F, B and W operations; wait = wall time it waits in the pipeline (on its receives, "
        "then until the slowest rank's schedule ends; median over timed steps); replay = the same steps on "
        "dedicated cores from the measured CPU times (bench/pipeline_replay.py): each rank's wait, and the "
        "bubble = step - the busier rank's work (what is left when the stages' imbalance is taken out); "
        "model = idle share of the schedule's own simulation (F : B : W = 4 : 4 : 3, zero_bubble.COSTS)"
    )
    print(
        f"{'schedule':<13}{'work r0':>9}{'work r1':>9}{'wait r0':>9}{'wait r1':>9}{'share':>7}{'replay r0':>11}"
        f"{'replay r1':>11}{'bubble':>8}{'share':>7}{'model':>7}{'per rank':>10}"
    )
    for schedule, name in PIPELINE_ROWS.items():
        r = best[name]
        waits, work = replayed_waits(args, name, r["op_seconds"])
        step = waits[0] + work[0]  # every rank's wait + work is the replayed step
        r["replay_wait_s"], r["replay_bubble_s"] = waits, step - max(work)
        print(
            f"{schedule:<13}{work[0]:>9.3f}{work[1]:>9.3f}{r['wait_s'][0]:>9.3f}{r['wait_s'][1]:>9.3f}"
            f"{statistics.mean(r['wait_share']):>7.1%}{waits[0]:>11.3f}{waits[1]:>11.3f}"
            f"{r['replay_bubble_s']:>8.3f}{r['replay_bubble_s'] / step:>7.1%}"
            f"{model_idle_share(schedule, pp=2, micro=micro):>7.1%}{r['ratio']:>10.3f}"
        )
    print("per rank = the layout table's per-rank efficiency")
    if memory:
        print(
            "\npeak activation memory per pipeline rank over two training steps (live storages, as the CP "
            "section; zb-v's rank 0 holds the first and the last stage)"
        )
        print(f"{'schedule':<13}{'MiB r0':>9}{'MiB r1':>9}{'peak / 1F1B peak':>18}")
        for schedule, act in memory.items():
            print(f"{schedule:<13}{act[0] / mib:>9.1f}{act[1] / mib:>9.1f}{max(act) / max(memory['1f1b']):>18.3f}")


def pipeline_results(best: dict[str, dict], memory: dict[str, list[int]]) -> list[str]:
    waits = {schedule: statistics.mean(best[name]["wait_s"]) for schedule, name in PIPELINE_ROWS.items()}
    bubbles = {schedule: best[name]["replay_bubble_s"] for schedule, name in PIPELINE_ROWS.items()}
    lines = [
        "RESULT parallel_pp2_bubble "
        + " ".join(f"wait_s_{s.replace('-', '_')}={w:.4f}" for s, w in waits.items())
        + f" ratio={waits['interleaved'] / max(waits['zb-h1'], waits['zb-v']):.3f}",
        "RESULT parallel_pp2_bubble_replayed "
        + " ".join(f"bubble_s_{s.replace('-', '_')}={w:.4f}" for s, w in bubbles.items())
        + f" ratio={bubbles['interleaved'] / max(bubbles['zb-h1'], bubbles['zb-v']):.3f}",
    ]
    if memory:
        mib = 2**20
        peaks = {s: max(a) for s, a in memory.items()}
        lines.append(
            "RESULT parallel_pp2_activations "
            + " ".join(f"peak_mb_{s.replace('-', '_')}={p / mib:.1f}" for s, p in peaks.items())
            + f" ratio={peaks['1f1b'] / max(peaks['zb-h1'], peaks['zb-v']):.3f}"
        )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000, help="padded to 4096 rows for TP 1 and 2")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=1, help="micro-batch size (sequences)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--repeat", type=int, default=2, help="passes over the layouts; the fastest run is kept")
    p.add_argument(
        "--pp-memory",
        type=int,
        default=1,
        help="1: measure the activation memory of each PP=2 schedule (when all four PP=2 rows run); 0 skips it",
    )
    p.add_argument(
        "--cp-memory-seq",
        type=int,
        default=4096,
        help="sequence length of the context-parallel memory section (a multiple of 8); 0 skips it",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "single" not in args.layouts:
        args.layouts = ["single"] + args.layouts  # the baseline of every ratio
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, {cores} CPU cores, gloo; 1 thread per rank (torch.set_num_threads(1))")
    print(
        f"model: llama, {args.layers} layers, hidden {args.hidden}, heads {args.heads} (kv {args.kv_heads}), "
        f"vocab {args.vocab}, seq {args.seq}; global batch {args.global_batch} x micro {args.micro}, fp32, "
        f"AdamW; {args.warmup} warm-up + {args.steps} timed steps"
    )
    print("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    # Passes over all layouts; per layout the run with the fastest step is kept (others' jobs on
    # a shared machine only ever slow a run down).
    best: dict[str, dict] = {}
    for rep in range(args.repeat):
        for name in args.layouts:
            r = run_layout(args, name)
            print(
                f"  pass {rep + 1} {name}: {r['step_s']:.3f} s/step, comm {r['comm_share']:.1%}, "
                f"{r['wall_s']:.0f} s wall, other load {r['foreign_cores']:.2f} cores",
                flush=True,
            )
            if name not in best or r["step_s"] < best[name]["step_s"]:
                best[name] = r
    results = [best[name] for name in args.layouts]
    print_layouts(results, cores)
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    memory = cp_memory(args) if args.cp_memory_seq else []
    if memory:
        print_cp_memory(args, memory)
    pipelines = all(name in best for name in PIPELINE_ROWS.values())
    pp_memory = pipeline_memory(args) if pipelines and args.pp_memory else {}
    if pipelines:
        print_pipeline(args, best, pp_memory)
    print()
    for r in results:
        print(
            f"RESULT parallel_{r['layout']} tokens_per_s_per_rank={r['tokens_per_s_per_rank']:.1f} "
            f"step_s={r['step_s']:.4f} comm_share={r['comm_share']:.4f} ranks={r['world']} "
            f"ratio={r['ratio']:.3f}"
        )
    for line in cp_memory_results(memory) if memory else []:
        print(line)
    for line in pipeline_results(best, pp_memory) if pipelines else []:
        print(line)


def print_layouts(results: list[dict], cores: int) -> None:
    """The layout table; sets each result's ratio (per-rank efficiency) and per_core."""
    base = results[0]["tokens_per_s"]
    print(
        f"\n{'layout':<13}{'ranks':>6}{'step s':>8}{'tok/s':>8}{'tok/s/rank':>11}{'per rank':>9}"
        f"{'per core':>9}{'comm':>7}{'(p2p)':>7}{'min-max':>13}{'loss@1':>9}{'other':>7}"
    )
    for r in results:
        r["ratio"] = r["tokens_per_s_per_rank"] / base
        # With more ranks than cores, per-rank figures also count time spent descheduled.
        r["per_core"] = r["tokens_per_s"] / min(r["world"], cores) / base
        over = " *" if r["world"] > cores else ""
        print(
            f"{r['layout'] + over:<13}{r['world']:>6}{r['step_s']:>8.3f}{r['tokens_per_s']:>8.0f}"
            f"{r['tokens_per_s_per_rank']:>11.0f}{r['ratio']:>9.3f}{r['per_core']:>9.3f}"
            f"{r['comm_share']:>7.1%}{r['p2p_share']:>7.1%}"
            f"{r['comm_share_min']:>6.0%}-{r['comm_share_max']:<6.0%}{r['first_loss']:>9.5f}"
            f"{r['foreign_cores']:>7.2f}"
        )
    if any(r["world"] > cores for r in results):
        print(
            f"* more ranks than the {cores} cores: ranks time-share cores (oversubscribed); their "
            f"per-rank throughput and comm share include waiting to be scheduled"
        )
    print(
        "per rank = (tok/s / ranks) / single tok/s; per core = tok/s / min(ranks, cores) / single tok/s; "
        "comm = share of step time inside torch.distributed calls (mean over ranks; p2p part; min-max over "
        "ranks); loss@1 = first-step loss (equal across layouts: same model, same data); other = CPU "
        "cores busy with other processes during the kept run"
    )


if __name__ == "__main__":
    main()
