"""ZeRO reductions issued from gradient hooks during the backward pass (pretrain/parallel/
zero_grads.py) keep every group's collectives in the same order on all its members, interleaved
with pipeline transfers, under NCCL's rules (pretrain/parallel/nccl_rules.py).

Small buckets (parallel.bucket_mb=0.01) so that DeepSpeed reduces many buckets inside the
backward passes of an interleaved schedule, next to the sequence-parallel TP sums and the tied
embedding's sum. Losses of the same layouts against their non-ZeRO runs are in test_zero.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel_harness import build_trainer, free_port, make_config
from pretrain.parallel.nccl_rules import CommRecorder, check_nccl_rules, dump_trace, load_trace


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with CommRecorder() as rec:
        trainer = build_trainer(make_config(overrides), 2)
        for step in (1, 2):
            trainer.step(step)
    Path(out, f"rank{rank}.json").write_text(dump_trace(rec.events))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("overrides, world", [
    (["parallel.tensor=2", "parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.sequence_parallel=true",
      "parallel.zero_stage=1"], 8),
    (["model.flavour=llama", "model.num_kv_heads=2", "parallel.pipeline=2", "parallel.virtual_stages=2",
      "parallel.zero_stage=2"], 4),
], ids=["zero1_tp2_pp2_dp2_sp_tied", "zero2_pp2_dp2"])
def test_zero_reductions_inside_backward_follow_nccl_rules(overrides, world):
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), [*overrides, "parallel.bucket_mb=0.01"], out), nprocs=world,
                 join=True)
        traces = {r: load_trace(Path(out, f"rank{r}.json").read_text()) for r in range(world)}
    summary = check_nccl_rules(traces)
    assert summary["p2p"] > 0 and summary["collectives"] > 0
