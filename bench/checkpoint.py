"""Checkpoint save/load throughput against a plain sequential write/read of the same bytes to the
same disk, and the training stall of a background (async) save against a synchronous one.

One process builds a GPT (default ~85M parameters: ~1 GB of fp32 weights + Adam moments) and,
alternating so that disk and page-cache state are shared fairly, repeats:
- ours, sync: `Checkpointer(async_save=False).save(...)`: snapshot, per-tensor safetensors
  files, fsync, atomic publish; timed end to end.
- plain write: the same tensors' bytes written into one file with a Python write loop + fsync
  (the ceiling for one writer), and `dd if=/dev/zero bs=1M conv=fsync` of the same size.
- ours, load: `load_checkpoint` into a fresh model + optimizer, against a plain sequential read
  of the plain file into one buffer (both from the page cache, which the write just filled:
  this measures our parsing/copying overhead, not the disk).
- async stall: a stand-in training loop (matmuls on the same cores) runs N steps, with one save
  in the middle. Reported: the time `save()` blocks the loop (async: the copy into host
  buffers reused from the previous save; sync: the whole save), and the loop's extra wall time
  over the same loop without a save (with an async save on this 2-core CPU that includes the
  writer competing for the cores the stand-in steps use; on a GPU node it would not).

    python bench/checkpoint.py                      # ~1 GB, 5 repeats (~3 min)
    python bench/checkpoint.py --hidden 512 --layers 4 --repeats 2

Last lines: `RESULT checkpoint_save ratio=<ours/plain>`, `RESULT checkpoint_load ratio=...`,
`RESULT checkpoint_async_stall fraction=<async stall / sync save time>`.
Goals (issue 6): save >= 0.70 of the plain write; async stall < 10% of the synchronous save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import Checkpointer, load_checkpoint
from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer


def build(args):
    config = config_from_dict(
        {
            "model": {
                "flavour": "llama",
                "num_layers": args.layers,
                "hidden_size": args.hidden,
                "num_heads": args.hidden // 64,
                "vocab_size": args.vocab,
            },
            "checkpoint": {"keep_last": 1},
        }
    )
    model = GPT(config.model, init_seed=0)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    for p in model.parameters():  # Adam's state as after a step, without paying for one
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.randn_like(p),
            "exp_avg_sq": torch.rand_like(p),
        }
    return config, model, optimizer


def tensors(model, optimizer) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        out += [p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]]
    return out


def plain_write(path: Path, ts: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        for t in ts:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def touch(model, optimizer) -> float:
    """Read every byte of the weights and optimizer state (page in what is still mapped lazily)."""
    return float(sum(t.sum() for t in tensors(model, optimizer)))


def plain_read(path: Path, nbytes: int) -> float:
    """Into fresh memory, as any loader must (its page faults are part of reading)."""
    start = time.perf_counter()
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(buffer.numpy()))
    return time.perf_counter() - start


def dd_write(path: Path, nbytes: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={nbytes // 2**20}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def stand_in_step(a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(4):
        a = torch.tanh(a @ b)


def train_loop(steps: int, save=None) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g) / 32
    start = time.perf_counter()
    for step in range(steps):
        stand_in_step(a, b)
        if save is not None and step == steps // 4:
            save()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="stand-in training steps around the async save")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir on the disk of /tmp)")
    args = parser.parse_args()

    config, model, optimizer = build(args)
    ts = tensors(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    print(
        f"model: {params / 1e6:.1f}M parameters; {nbytes / 1e9:.2f} GB of weights + Adam moments; "
        f"writing under {work}; {torch.get_num_threads()} threads",
        flush=True,
    )
    gb = nbytes / 1e9
    ours_save, plain, dd, ours_load, plain_load = [], [], [], [], []
    try:
        for rep in range(args.repeats):
            root = work / "ours"
            saver = Checkpointer(root, config, async_save=False)
            start = time.perf_counter()
            saver.save(rep + 1, model=model, optimizer=optimizer, train_state={})
            ours_save.append(time.perf_counter() - start)
            plain.append(plain_write(work / "plain.bin", ts))
            dd.append(dd_write(work / "dd.bin", nbytes))
            fresh_config, fresh, fresh_opt = config, GPT(config.model, init_seed=1), None
            fresh_opt = build_optimizer(fresh.parameters(), fresh_config.optimizer)
            start = time.perf_counter()
            load_checkpoint(root, model=fresh, optimizer=fresh_opt, config=fresh_config)
            touch(fresh, fresh_opt)  # safetensors maps lazily: count the reads, as training would do them
            ours_load.append(time.perf_counter() - start)
            plain_load.append(plain_read(work / "plain.bin", nbytes))
            (work / "dd.bin").unlink()
            print(
                f"repeat {rep + 1}: save ours {gb / ours_save[-1]:.2f} GB/s, plain {gb / plain[-1]:.2f}, dd "
                f"{gb / dd[-1]:.2f}; load ours {gb / ours_load[-1]:.2f} GB/s, plain read {gb / plain_load[-1]:.2f}",
                flush=True,
            )

        # Stall: the same loop without a save, with a synchronous save, with a background save.
        sync_saver = Checkpointer(work / "sync", config, async_save=False)
        async_saver = Checkpointer(work / "async", config, async_save=True)
        step_counter = iter(range(1, 10**6))

        def save_with(saver):
            def go():
                start = time.perf_counter()
                saver.save(next(step_counter), model=model, optimizer=optimizer, train_state={})
                go.blocked = time.perf_counter() - start

            return go

        # A run saves many times; the first save also allocates the host buffers the later ones reuse.
        first = save_with(async_saver)
        first()
        async_saver.wait()
        save_with(sync_saver)()
        bare, with_sync, with_async, blocked_sync, blocked_async = [], [], [], [], []
        for _ in range(args.repeats):
            bare.append(train_loop(args.steps))
            go = save_with(sync_saver)
            with_sync.append(train_loop(args.steps, go))
            blocked_sync.append(go.blocked)
            go = save_with(async_saver)
            with_async.append(train_loop(args.steps, go))
            async_saver.wait()  # outside the timed loop: the loop is long enough to hide it
            blocked_async.append(go.blocked)
        med = statistics.median
        sync_stall = med(with_sync) - med(bare)
        async_stall = max(0.0, med(with_async) - med(bare))
        print(
            f"stand-in loop of {args.steps} steps: {med(bare):.2f} s bare, {med(with_sync):.2f} s with a sync "
            f"save, {med(with_async):.2f} s with an async save; save() blocked {med(blocked_sync):.2f} s (sync) "
            f"vs {med(blocked_async):.3f} s (async, the host snapshot; {first.blocked:.3f} s at the first save, "
            "which allocates the host buffers)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # This disk's speed swings several-fold from minute to minute; each repeat runs ours and the
    # plain write back to back, so the ratio is taken per repeat, then the median of those.
    save_ratio = med([p / o for p, o in zip(plain, ours_save)])
    load_ratio = med([p / o for p, o in zip(plain_load, ours_load)])
    print(
        f"RESULT checkpoint_save ours_gbps={gb / med(ours_save):.2f} plain_gbps={gb / med(plain):.2f} "
        f"dd_gbps={gb / med(dd):.2f} ratio={save_ratio:.2f}"
    )
    print(
        f"RESULT checkpoint_load ours_gbps={gb / med(ours_load):.2f} plain_gbps={gb / med(plain_load):.2f} "
        f"ratio={load_ratio:.2f}"
    )
    print(
        f"RESULT checkpoint_async_stall sync_stall_s={sync_stall:.2f} async_stall_s={async_stall:.3f} "
        f"async_blocked_s={med(blocked_async):.3f} fraction={async_stall / sync_stall:.3f} "
        f"blocked_fraction={med(blocked_async) / med(blocked_sync):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
