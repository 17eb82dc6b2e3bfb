"""Run a few training steps of a tiny GPT on a TP x PP x DP grid of real gloo ranks.

Every layout sees the same global batches (synthetic tokens from a fixed seed, split across DP
ranks the way the loader splits them), so its losses can be compared with the single-process
run. Used by tests/test_parallel.py; also runnable by hand:
    python tests/parallel_harness.py parallel.tensor=2 parallel.pipeline=2
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import config_from_dict

BASE = {
    "model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 250, "seq_length": 32},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "seed": 7, "steps": 3},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "clip_grad": 1.0},
    "schedule": {"warmup_steps": 1},
}


def make_config(overrides: list[str]):
    return config_from_dict(BASE, overrides)


def global_batches(config, steps: int) -> torch.Tensor:
    """[steps, global_batch, seq + 1] token ids, the same for every layout."""
    g = torch.Generator().manual_seed(1234)
    t = config.train
    return torch.randint(
        0, config.model.vocab_size, (steps, t.global_batch_size, config.model.seq_length + 1), generator=g
    )


def rank_batches(data: torch.Tensor, *, micro: int, dp: int, dp_rank: int, segments: bool = False):
    """This DP rank's micro-batches in order: chunks of micro*dp samples, rank r takes slice r.
    `segments`: add document numbers, with every token divisible by 17 ending a document."""
    for step in data:
        for start in range(0, step.shape[0], micro * dp):
            sample = step[start + dp_rank * micro : start + (dp_rank + 1) * micro]
            batch = {"tokens": sample[:, :-1], "labels": sample[:, 1:]}
            if segments:
                ends = (batch["tokens"] % 17 == 0).long()
                batch["segments"] = ends.cumsum(1) - ends
            yield batch


def build_trainer(config, steps: int):
    """This process's Trainer on its part of the grid, fed the shared synthetic batches."""
    from pretrain.parallel.bootstrap import init_distributed
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.strategy import weight_dtype
    from pretrain.trainer import Trainer

    torch.manual_seed(config.train.seed)
    topo = init_distributed(config, device=torch.device("cpu"))
    chunks = build_model_chunks(config.model, topo, init_seed=config.train.seed, dtype=weight_dtype(config))
    batches = rank_batches(
        global_batches(config, steps),
        micro=config.train.micro_batch_size,
        dp=topo.dp,
        dp_rank=topo.dp_rank,
        segments=config.data.document_attention_mask,
    )
    return Trainer(config, topo, chunks, train_batches=batches)


def train_steps(config, steps: int) -> dict:
    """Train `steps` steps on this process's part of the grid; returns losses and grad norms."""
    trainer = build_trainer(config, steps)
    topo = trainer.topo
    records = [trainer.step(step) for step in range(1, steps + 1)]
    return {
        "rank": topo.rank,
        "logging": topo.is_logging_rank,
        "buckets": len(trainer.strategy.grad_sync.buckets),
        "overlapped": trainer.strategy.grad_sync.overlapped,
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
    }


def train_steps_float64(overrides: list[str], steps: int) -> dict:
    """`train_steps` with float64 weights and activations (exactness checks): fp32 rounding,
    which AdamW's first updates magnify (update ~ g / |g| per element), is taken out, so what
    differs between a layout and one process is the layout's own doing."""
    from unittest import mock

    from pretrain.strategy import DataParallel

    torch.set_default_dtype(torch.float64)
    try:
        with mock.patch.object(DataParallel, "weight_dtype", staticmethod(lambda config: torch.float64)):
            return train_steps(make_config(overrides), steps)
    finally:
        torch.set_default_dtype(torch.float32)


def _rank_main(rank: int, world: int, port: int, fn, args: tuple, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, Path(out, f"rank{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> list:
    """Run `fn(*args)` on `world` spawned processes that form a gloo group through the launcher's
    environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK; one thread each); returns each
    rank's result (plain data: tensors, numbers, strings, lists, dicts), in rank order. `fn` must
    be importable (module-level)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
        return [torch.load(Path(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(overrides: list[str], *, world: int, steps: int = 3) -> dict:
    """Spawn `world` ranks; returns the logging rank's losses and grad norms."""
    if world == 1:
        return train_steps(make_config(overrides), steps)
    results = run_ranks(world, _train_steps, overrides, steps)
    (logging,) = [r for r in results if r["logging"]]
    return logging


def _train_steps(overrides: list[str], steps: int) -> dict:
    return train_steps(make_config(overrides), steps)


def train_job(job: dict) -> dict:
    """This rank's part of one run: build, optionally resume (from a checkpoint of any layout),
    train steps first..last on the shared batches, optionally save at step save_at and train on."""
    from pretrain.checkpoint import Checkpointer, load_checkpoint
    from pretrain.parallel.bootstrap import init_distributed
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.strategy import weight_dtype
    from pretrain.trainer import Trainer

    if job.get("fp16_on_cpu"):
        # DeepSpeed refuses fp16 on a CPU without fp16 matmul support (this machine); torch runs
        # fp16 matmuls on it anyway, slowly, which is enough to exercise our fp16 glue.
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: True
    config = make_config(job["overrides"])
    torch.manual_seed(config.train.seed)
    topo = init_distributed(config, device=torch.device("cpu"))
    chunks = build_model_chunks(config.model, topo, init_seed=config.train.seed, dtype=weight_dtype(config))
    first, last = job.get("first", 1), job["last"]
    data = global_batches(config, last)[first - 1 :]
    batches = rank_batches(data, micro=config.train.micro_batch_size, dp=topo.dp, dp_rank=topo.dp_rank)
    trainer = Trainer(config, topo, chunks, train_batches=batches)
    read_files: list[str] = []
    if job.get("resume"):
        with _files_read(read_files):
            meta = load_checkpoint(
                Path(job["resume"]), state=trainer.strategy.checkpoint_state(), config=config, topo=topo
            )
        trainer.load_train_state(meta["train_state"])
    # Saved in the background, as training does, while this run trains on.
    saver = Checkpointer(job["save"], config, topo) if job.get("save") else None
    records = []
    for step in range(first, last + 1):
        records.append(trainer.step(step))
        if step == job.get("save_at"):  # and train on: the same run is the uninterrupted reference
            saver.save(
                step,
                state=trainer.strategy.checkpoint_state(),
                train_state={"consumed_samples": 0, **trainer.train_state()},
            )
            if job.get("dump_weights") and topo.rank == 0:  # the live weights (whole on rank 0 unless ZeRO-3)
                torch.save(
                    {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}, job["dump_weights"]
                )
    if saver is not None:
        saver.wait()
    result = {
        "rank": topo.rank,
        "dp_rank": topo.dp_rank,
        "logging": topo.is_logging_rank,
        "read_files": read_files,
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "loss_scale": [r.get("loss_scale") for r in records],
        "params": trainer.num_params,
    }
    if config.parallel.zero_stage:  # the ZeRO tests measure what each rank holds
        result["optimizer_bytes"] = trainer.strategy.optimizer_state_bytes()
        result["weight_bytes"] = trainer.strategy.weight_bytes()
    return result


@contextlib.contextmanager
def _files_read(names: list[str]):
    """Record the tensor files the checkpoint reader opens or reads (by name)."""
    from pretrain.checkpoint import reader

    opened, whole = reader.safe_open, reader.read_whole

    def safe_open(path, *args, **kwargs):
        names.append(Path(path).name)
        return opened(path, *args, **kwargs)

    def read_whole(path):
        names.append(Path(path).name)
        return whole(path)

    reader.safe_open, reader.read_whole = safe_open, read_whole
    try:
        yield
    finally:
        reader.safe_open, reader.read_whole = opened, whole


def run_job(overrides: list[str], *, world: int, last: int = 3, **job) -> list[dict]:
    """Spawn `world` ranks; every rank's result, logging rank first."""
    results = run_ranks(world, train_job, {"overrides": overrides, "last": last, **job})
    return sorted(results, key=lambda r: not r["logging"])


def torchrun(nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    """`python -m pretrain.train configs/llama_tiny.yaml OVERRIDES` under torchrun, `nproc` ranks."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "pretrain.train",
            "configs/llama_tiny.yaml",
            *overrides,
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    cfg = make_config(args)
    world = cfg.parallel.tensor * cfg.parallel.pipeline * int(os.environ.get("DP", "1"))
    print(run_layout(args, world=world))
