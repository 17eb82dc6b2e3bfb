"""ZeRO checkpoints per rank: host memory during a save and bytes read by a resume, against the
rank's own share of the training state.

DP ranks train a llama-flavour GPT (default ~68M parameters) one step under ZeRO (default
stage 1, DP 4) on gloo, then each rank, measured inside its own process:
- saves synchronously, then in the background (checkpoint.async_save), each time with its
  peak RSS reset first (`echo 5 > /proc/self/clear_refs` sets VmHWM to the current RSS), and
  reports VmHWM after the save minus VmRSS before it: the host memory the save took (the
  rank processes run with MALLOC_MMAP_THRESHOLD_=128 KiB, so that large buffers are fresh
  mappings, not heap memory earlier frees left resident, which the RSS would not show);
- resumes from that checkpoint at the same layout (pretrain.checkpoint.load_checkpoint into
  the live trainer) and reports /proc/self/io `rchar` (bytes read through read() calls) over
  the load, against the size of its own files (model_/optimizer_..._part{dp_rank}).

"Share" = this rank's part of the fp32 master weights and both Adam moments (12 bytes per
element of its flat ZeRO partition): what the rank holds and what its files hold. A saver that
gathers the state of the rank's tensor-parallel shard (DeepSpeed's safe_get_full_* on every
rank, which pretrain did before issue 13) holds 12 bytes per parameter of the whole shard,
DP times the share: that is the peer of the RESULT ratio. The script runs on older pretrain
checkouts too (copy it into one), to measure the code before a change.

    python bench/zero_checkpoint.py                    # DP 4, ZeRO-1, ~68M parameters

Last line: `RESULT zero_checkpoint save_over_share=S async_save_over_share=A
load_read_over_own_files=L ratio=R`, with S, A the largest over ranks (goal: A within 1.2),
L = rchar of the load / bytes of the rank's own files (goal: 1.0, plus the small meta, config
and RNG files), R = full TP-shard state / peak memory of the async save.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


def reset_peak() -> int:
    """Set VmHWM to the current RSS; returns the RSS (bytes)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS") * 1024


def make_config(args, directory: str, *, async_save: bool):
    return config_from_dict(
        {
            "model": {
                "flavour": "llama",
                "num_layers": args.layers,
                "hidden_size": args.hidden,
                "num_heads": args.heads,
                "num_kv_heads": args.heads,
                "vocab_size": args.vocab,
                "seq_length": args.seq,
            },
            "train": {"micro_batch_size": 1, "global_batch_size": args.dp, "seed": 7, "steps": 2, "device": "cpu"},
            "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
            "schedule": {"warmup_steps": 1},
            "parallel": {"zero_stage": args.stage},
            "checkpoint": {"dir": directory, "async_save": async_save},
        }
    )


def _rank(rank: int, world: int, port: int, args, root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from pretrain.checkpoint import Checkpointer, load_checkpoint

    config = make_config(args, root, async_save=False)
    trainer = build_trainer(config, 2)
    topo, zero = trainer.topo, trainer.strategy
    trainer.step(1)  # Adam state exists from here
    opt = zero.optimizer
    flats = opt.fp32_partitioned_groups_flat if zero.stage == 3 else opt.single_partition_of_fp32_groups
    share = 12 * sum(f.numel() for f in flats)  # fp32 masters + two Adam moments of this rank's partition
    full = 12 * trainer.num_params  # the same of this rank's whole TP shard
    result = {"rank": rank, "dp_rank": topo.dp_rank, "share": share, "full": full, "params": trainer.num_params}

    for mode, step in (("sync", 1), ("async", 2)):
        saver = Checkpointer(Path(root) / mode, make_config(args, root, async_save=mode == "async"), topo)
        dist.barrier()
        before = reset_peak()
        saver.save(step, state=zero.checkpoint_state(), train_state={"consumed_samples": 0})
        saver.wait()
        result[f"{mode}_save_bytes"] = status_kb("VmHWM") * 1024 - before
        result[f"{mode}_written"] = saver.stats.get("written_bytes", 0.0)
        del saver
        gc.collect()

    step_dir = Path(root) / "sync" / "step_1"
    own = sum(
        (step_dir / f"{kind}_tp{topo.tp_rank}_pp{topo.pp_rank}_part{topo.dp_rank}.safetensors").stat().st_size
        for kind in ("model", "optimizer")
    )
    small = sum((step_dir / name).stat().st_size for name in ("meta.json", "config.yaml", f"rng_rank{rank}.pt"))
    dist.barrier()
    start = rchar()
    load_checkpoint(step_dir, state=zero.checkpoint_state(), config=config, topo=topo)
    result.update(
        load_read=rchar() - start,
        own_files=own,
        small_files=small,
        position_files=sum(p.stat().st_size for p in step_dir.glob(f"*_tp{topo.tp_rank}_pp{topo.pp_rank}_*")),
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see bench/parallel.py: a gloo rank may abort in interpreter teardown


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # glibc otherwise serves large allocations from heap memory that earlier frees left resident
    # (its mmap threshold grows with every large free), and a save's buffers would not show in
    # the RSS; with a fixed threshold they are mapped fresh and unmapped when freed.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    print(
        f"torch {torch.__version__}; ZeRO-{args.stage} at DP {args.dp} (gloo); llama {args.layers} layers, hidden "
        f"{args.hidden}, vocab {args.vocab}; fp32; pretrain at {ROOT}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as root, tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(args.dp, free_port(), args, root, out), nprocs=args.dp, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.dp)]
    mb = 2**20
    print(
        f"\n{'rank':>4}{'share MB':>10}{'TP shard MB':>12}{'sync save MB':>13}{'/share':>8}{'async save MB':>14}"
        f"{'/share':>8}{'load read MB':>13}{'own files MB':>13}{'/own':>7}{'position MB':>12}"
    )
    for r in ranks:
        print(
            f"{r['rank']:>4}{r['share'] / mb:>10.1f}{r['full'] / mb:>12.1f}{r['sync_save_bytes'] / mb:>13.1f}"
            f"{r['sync_save_bytes'] / r['share']:>8.2f}{r['async_save_bytes'] / mb:>14.1f}"
            f"{r['async_save_bytes'] / r['share']:>8.2f}{r['load_read'] / mb:>13.1f}{r['own_files'] / mb:>13.1f}"
            f"{r['load_read'] / r['own_files']:>7.3f}{r['position_files'] / mb:>12.1f}"
        )
    print("bytes written per rank: " + " ".join(f"{r['sync_written'] / mb:.1f}" for r in ranks) + " MB")
    print(
        f"{ranks[0]['params'] / 1e6:.1f}M parameters per TP shard; share = 12 bytes per element of the rank's "
        "ZeRO partition; save MB = VmHWM after the save - VmRSS before it; load read = rchar over "
        "load_checkpoint at the saved layout (own files, meta/config/RNG "
        f"{ranks[0]['small_files'] / 1024:.0f} KB not included in 'own files'); position = all files of the TP/PP "
        "position"
    )
    sync = max(r["sync_save_bytes"] / r["share"] for r in ranks)
    asyn = max(r["async_save_bytes"] / r["share"] for r in ranks)
    load = max(r["load_read"] / r["own_files"] for r in ranks)
    ratio = min(r["full"] / max(r["async_save_bytes"], 1) for r in ranks)
    print(
        f"RESULT zero_checkpoint save_over_share={sync:.3f} async_save_over_share={asyn:.3f} "
        f"load_read_over_own_files={load:.3f} ratio={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
