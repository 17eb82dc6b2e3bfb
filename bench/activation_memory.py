"""Activation bytes a transformer layer keeps for its backward pass, measured, as k * s * b * h / t
(s sequence, b micro-batch, h hidden, t tensor-parallel size): the figure behind the memory
header of slurm/pretrain_gpt_13b.sh, which used Megatron's 34 (Korthikanti et al. 2022, with
selective recompute and sequence parallelism).

The model is configs/gpt_13b.yaml shrunk (gpt2 flavour, its activation_checkpointing, dropout
0), with its weights in bf16 as DeepSpeed's ZeRO keeps them (the config trains under ZeRO-1,
bf16) and the forward under bf16 autocast, as the trainer runs it. At t > 1 the layers are
tensor-parallel with sequence parallelism, on t gloo ranks.

What is counted: every tensor autograd saves during the forward of the transformer blocks
(torch.autograd.graph.saved_tensors_hooks), plus the inputs activation checkpointing keeps for
its recomputation (non-reentrant checkpoint holds them outside autograd's saved tensors), each
storage once. The forward runs at micro-batch 2 and 4 and half the difference is used, so what
does not grow with the batch (bf16 weights, RoPE tables) drops out; per layer = that / layers.
(Not micro-batch 1: there the sequence-parallel split of the embedding output is a view that
keeps the whole [1, s, h] tensor alive as the first layer's saved input, t times its share,
once per model; at b > 1 the split copies.) The rest of the model (embedding, final norm,
output layer and loss) is reported per token.

    python bench/activation_memory.py                 # t = 1, 2, 4 (~1 min on 2 cores)
    python bench/activation_memory.py --tp 1 2 --hidden 128 --seq 64

Last line: `RESULT activation_memory bytes_per_layer_coef=<k at the largest t> coef_tp1=... coef_tp2=...
... header_coef=34 ratio=<34 / k>` (ratio < 1: the old header under-counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from parallel_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
HEADER_COEF = 34  # what slurm/pretrain_gpt_13b.sh assumed before this measurement


class SavedBytes:
    """Storages kept for backward, each counted once (and held, so no address is reused)."""

    def __init__(self) -> None:
        self.storages: dict[int, torch.UntypedStorage] = {}

    def add(self, t) -> None:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def _config(args, tp: int):
    from pretrain.config import load_config

    overrides = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_heads={args.heads}",
        f"model.vocab_size={args.vocab}",
        f"model.seq_length={args.seq}",
        f"parallel.tensor={tp}",
        f"parallel.sequence_parallel={str(tp > 1).lower()}",
    ]
    if args.recompute:
        overrides.append(f"model.activation_checkpointing={args.recompute}")
    return load_config(str(ROOT / args.config), overrides)


def measure(args, topo) -> dict:
    import pretrain.models.gpt as gpt_module
    from pretrain.models.build import build_gpt
    from pretrain.models.layers import DenseLayers
    from pretrain.parallel.tensor import TensorParallelLayers
    from pretrain.strategy import weight_dtype

    config = _config(args, topo.tp)
    m = config.model
    layers = TensorParallelLayers(topo) if topo.tp > 1 else DenseLayers()
    model = build_gpt(m, init_seed=1, dtype=weight_dtype(config), layers=layers, device=torch.device("cpu"))
    recorder = SavedBytes()
    real_checkpoint = gpt_module.checkpoint

    def checkpoint(fn, *inputs, **kwargs):  # non-reentrant checkpoint keeps its inputs for the recompute
        for t in inputs:
            recorder.add(t)
        return real_checkpoint(fn, *inputs, **kwargs)

    gpt_module.checkpoint = checkpoint
    blocks, whole = {}, {}
    try:
        for b in (2, 4):
            tokens = torch.randint(0, m.vocab_size, (b, m.seq_length), generator=torch.Generator().manual_seed(b))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                recorder.storages.clear()
                with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
                    x = model.embed_tokens(tokens)
                    embed_bytes = recorder.bytes
                    y = model.run_blocks(x)
                    blocks[b] = recorder.bytes - embed_bytes
                    loss = model.head_loss(y, tokens)
                    whole[b] = recorder.bytes
            loss.backward()  # the graph is complete (and every rank's collectives matched)
    finally:
        gpt_module.checkpoint = real_checkpoint
    s, h, t = m.seq_length, m.hidden_size, topo.tp
    per_layer = (blocks[4] - blocks[2]) / 2 / m.num_layers  # per sequence of the micro-batch
    rest = ((whole[4] - whole[2]) - (blocks[4] - blocks[2])) / 2
    return {
        "tp": t,
        "per_layer_bytes": per_layer,
        "coef": per_layer / (s * h / t),
        "rest_bytes_per_token": rest / s,
        "recompute": m.activation_checkpointing,
        "seq": s,
        "hidden": h,
        "layers": m.num_layers,
        "vocab_rows": m.vocab_rows,
    }


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    from pretrain.parallel.bootstrap import build_topology

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    topo = build_topology(tp=world, pp=1, dp=1, sequence_parallel=True)
    result = measure(args, topo)
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(args, tp: int) -> dict:
    if tp == 1:
        from pretrain.parallel.topology import single_process

        return measure(args, single_process())
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(tp, free_port(), args, out), nprocs=tp, join=True)
        return json.loads(Path(out, "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gpt_13b.yaml")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--recompute", choices=["none", "selective", "full"], help="default: the config's")
    args = p.parse_args()
    rows = [run(args, tp) for tp in args.tp]
    r0 = rows[0]
    print(
        f"{args.config} shrunk: {r0['layers']} layers, hidden {r0['hidden']}, seq {r0['seq']}, "
        f"{r0['vocab_rows']} vocabulary rows; bf16 weights, bf16 autocast, recompute {r0['recompute']}"
    )
    print("| t | bytes per layer (b = 1) | k = bytes / (s b h / t) | rest of the model, bytes per token |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['per_layer_bytes']:.0f} | {r['coef']:.2f} | {r['rest_bytes_per_token']:.0f} |")
    last = rows[-1]
    print(
        f"RESULT activation_memory bytes_per_layer_coef={last['coef']:.2f} tp={last['tp']} "
        + " ".join(f"coef_tp{r['tp']}={r['coef']:.2f}" for r in rows)
        + f" header_coef={HEADER_COEF} ratio={HEADER_COEF / last['coef']:.3f}"
    )


if __name__ == "__main__":
    main()
