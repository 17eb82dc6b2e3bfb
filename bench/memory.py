"""Per-rank memory of weights, gradients and optimizer state under ZeRO stages 0-3, measured,
next to the ZeRO paper's mixed-precision accounting (Rajbhandari et al. 2020): per parameter,
2 bytes of 16-bit weights, 2 of 16-bit gradients and 12 of optimizer state (fp32 master copy,
Adam's two moments), of which stage 1 shards the 12 over the N data-parallel ranks, stage 2
also the gradients, stage 3 also the weights:

    stage 0: 2 + 2 + 12        stage 2: 2 + (2 + 12) / N
    stage 1: 2 + 2 + 12 / N    stage 3: (2 + 2 + 12) / N

Each configuration spawns N gloo ranks (one thread each) that build a ~100M-parameter GPT and
run pretrain's Trainer: one warm-up step (so Adam's moments exist), then a step whose pieces are
measured on every rank, from the tensors the trainer and DeepSpeed's ZeRO optimizer hold:
- weights: module parameters at rest (ZeRO-3: this rank's shards);
- gradients: held at the end of the step's backward passes (2 micro-batches) and after the
  reduction, whichever is larger: whole `.grad`s plus ZeRO's partition buffers;
- optimizer: fp32 master partitions + Adam moments (stage 0: the moments; its fp32 weights are
  the master copy), read after the step;
- comm buffers (stage 0 only): flat buffers of our bucketed DP all-reduce that are not the
  gradients themselves, at the end of the backward pass. The gradients are views into the
  buckets' buffers and the all-reduce runs on them in place (pretrain/parallel/data.py), so
  the buffers are counted once, as gradients, and this column is 0 (before that change, the
  reduction concatenated the gradients into a second copy: 4 bytes/parameter).
Stages 1-3 run DeepSpeed's bf16 mode (16-bit weights and gradients); stage 0 is pretrain's own
data parallelism in bf16 autocast, which keeps fp32 weights that double as the master copy
(4 + 4 + 8 bytes: the same 16 per parameter, split differently).

    python bench/memory.py                 # DP=2 and DP=4, stages 0-3 (~5 min on 2 cores)
    python bench/memory.py --dp 2 --stages 1 3

Last lines: `RESULT memory_zero<stage>_dp<N> weights_mb=... grads_mb=... optimizer_mb=...
total_mb=... theory_mb=... ratio=<theory total / measured total>` (ratio >= 1: we hold no more
than the paper's accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from parallel_harness import free_port

MODEL = {
    "flavour": "gpt2",
    "num_layers": 12,
    "hidden_size": 768,
    "num_heads": 12,
    "vocab_size": 16000,
    "seq_length": 64,
}


def _config(stage: int, dp: int):
    from pretrain.config import config_from_dict

    return config_from_dict(
        {
            "model": MODEL,
            "train": {"micro_batch_size": 1, "global_batch_size": 2 * dp, "precision": "bf16", "steps": 2, "seed": 1},
            "optimizer": {"lr": 1e-4, "clip_grad": 1.0},
            # persistence 0: ZeRO-3 shards every weight, as the accounting assumes
            "parallel": {"zero_stage": stage, "zero3_persistence_threshold": 0, "bucket_mb": 25},
        }
    )


def _batches(config, dp_rank: int):
    g = torch.Generator().manual_seed(100 + dp_rank)
    while True:
        tokens = torch.randint(0, config.model.vocab_size, (1, config.model.seq_length + 1), generator=g)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _measure(stage: int, dp: int) -> dict:
    from pretrain.parallel.bootstrap import init_distributed
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.parallel.pipeline import forward_backward
    from pretrain.strategy import weight_dtype
    from pretrain.trainer import Trainer

    config = _config(stage, dp)
    topo = init_distributed(config, device=torch.device("cpu"))
    chunks = build_model_chunks(config.model, topo, init_seed=1, dtype=weight_dtype(config))
    trainer = Trainer(config, topo, chunks, train_batches=_batches(config, topo.dp_rank))
    trainer.step(1)  # Adam's moments are allocated by the first step

    strategy = trainer.strategy
    zero = strategy if stage else None  # ZeRO's own measurements; plain DP's are taken here
    forward_backward(
        chunks=strategy.chunks,
        topo=topo,
        batches=trainer.batches,
        micro_batches=trainer.accum,
        autocast=trainer.autocast,
        hidden_shape=trainer.hidden_shape,
        on_last_backward=strategy.on_last_backward,
    )
    comm = 0
    if zero is None:
        grads = _unique_bytes(p.grad for p in strategy.params)
        held = {p.grad.untyped_storage().data_ptr() for p in strategy.params if p.grad is not None}
        buffers = [getattr(b, "buffer", None) for b in strategy.grad_sync.buckets]
        comm = _unique_bytes(b for b in buffers if b is not None and b.untyped_storage().data_ptr() not in held)
        strategy.step(1e-4, problem=None, norm_problem=lambda norm: None)
        weights = _unique_bytes(strategy.params)
        optimizer = _unique_bytes(
            t for s in strategy.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1
        )
    else:
        grads = zero.gradient_bytes()
        zero.finish_gradients()
        grads = max(grads, zero.gradient_bytes())
        zero.step(1e-4)
        weights, optimizer = zero.weight_bytes(), zero.optimizer_state_bytes()
    return {
        "rank": topo.rank,
        "params": trainer.num_params,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "comm": comm,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _worker(rank: int, world: int, port: int, stage: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = _measure(stage, world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def theory(stage: int, dp: int, params: int) -> dict:
    """Bytes per rank in the ZeRO paper's mixed-precision accounting."""
    shard = lambda n, from_stage: n / dp if stage >= from_stage else n
    return {"weights": shard(2 * params, 3), "grads": shard(2 * params, 2), "optimizer": shard(12 * params, 1)}


def run(stage: int, dp: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(dp, free_port(), stage, out), nprocs=dp, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(dp)]
    # Ranks differ by padding at most; report the largest (what has to fit on every device).
    row = {key: max(r[key] for r in ranks) for key in ("weights", "grads", "optimizer", "comm", "peak_rss")}
    row.update(stage=stage, dp=dp, params=ranks[0]["params"], theory=theory(stage, dp, ranks[0]["params"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    rows = [run(stage, dp) for dp in args.dp for stage in args.stages]
    mb = lambda n: n / 2**20
    params = rows[0]["params"]
    print(
        f"\nmodel: gpt2 flavour, {MODEL['num_layers']} layers, hidden {MODEL['hidden_size']}, vocab "
        f"{MODEL['vocab_size']}: {params / 1e6:.1f}M parameters; bf16; per-rank MiB (largest rank), "
        f"measured / theory"
    )
    print("| stage | DP | weights | gradients | optimizer state | total | theory total | comm buffers | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["theory"]
        total, ideal = r["weights"] + r["grads"] + r["optimizer"], sum(t.values())
        print(
            f"| {r['stage']} | {r['dp']} | {mb(r['weights']):.0f} / {mb(t['weights']):.0f} | "
            f"{mb(r['grads']):.0f} / {mb(t['grads']):.0f} | {mb(r['optimizer']):.0f} / {mb(t['optimizer']):.0f} | "
            f"{mb(total):.0f} | {mb(ideal):.0f} | {mb(r['comm']):.0f} | {mb(r['peak_rss']):.0f} |"
        )
    for r in rows:
        total, ideal = r["weights"] + r["grads"] + r["optimizer"], sum(r["theory"].values())
        print(
            f"RESULT memory_zero{r['stage']}_dp{r['dp']} weights_mb={mb(r['weights']):.1f} "
            f"grads_mb={mb(r['grads']):.1f} optimizer_mb={mb(r['optimizer']):.1f} total_mb={mb(total):.1f} "
            f"theory_mb={mb(ideal):.1f} ratio={ideal / total:.3f}"
        )


if __name__ == "__main__":
    main()
