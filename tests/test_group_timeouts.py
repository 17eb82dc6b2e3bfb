"""Every wait is bounded: each process group the run creates (the TP/DP/PP/model/embedding grid,
the checkpoint writer's gloo group, DeepSpeed's own) times out after parallel.timeout_minutes.
Two real gloo ranks; one skips a collective and the other must raise within the timeout, not
after torch's 30-minute default for new groups."""

import datetime
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.parallel_harness import make_config, run_ranks

TIMEOUT_MIN = 0.05  # 3 s
MARGIN_S = 15.0


def _worker(out: str) -> dict:
    """rank 0: group name -> [seconds waited, exception type, message], or None where the
    collective completed; rank 1 ({}) only stays connected meanwhile."""
    from pretrain.checkpoint.saver import Checkpointer
    from pretrain.parallel.bootstrap import build_topology
    from pretrain.parallel.zero_mpu import groups_time_out_after

    # The default group's own timeout is long, so only the groups' timeouts can end the waits.
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank()
    # Each layout puts both ranks in different groups of the grid.
    topo = build_topology(tp=1, pp=1, dp=2, timeout_minutes=TIMEOUT_MIN)
    tp2 = build_topology(tp=2, pp=1, dp=1, timeout_minutes=TIMEOUT_MIN)
    pp2 = build_topology(tp=1, pp=2, dp=1, timeout_minutes=TIMEOUT_MIN)
    config = make_config([f"parallel.timeout_minutes={TIMEOUT_MIN}"])
    saver = Checkpointer(Path(out) / "ckpt", config, topo)
    with groups_time_out_after(TIMEOUT_MIN):
        deepspeed_like = dist.new_group([0, 1])  # as deepspeed.comm creates its groups
    groups = {
        "dp": topo.dp_group,
        "tp": tp2.tp_group,
        "model": tp2.model_group,
        "pp": pp2.pp_group,
        "embedding": pp2.embedding_group,
        "checkpoint": saver.group,
        "deepspeed": deepspeed_like,
    }
    waited = {}
    for name, group in groups.items():
        if rank == 0:  # rank 1 never joins: rank 0's collective must time out
            start = time.perf_counter()
            try:
                dist.all_reduce(torch.ones(4), group=group)
                waited[name] = None
            except Exception as e:  # gloo raises RuntimeError / DistBackendError on timeout
                waited[name] = [time.perf_counter() - start, type(e).__name__, str(e)[:200]]
    if rank == 1:
        # Stay alive (connections open) until rank 0 is done: a peer that exits would end the
        # waits by a closed connection rather than by the timeout under test.
        while not Path(out, "rank0.done").exists():
            time.sleep(0.2)
    else:
        Path(out, "rank0.done").touch()
    # Tear down without a collective (run_ranks adds none once the group is gone): the groups saw failures.
    dist.destroy_process_group()
    return waited


def test_every_group_times_out_after_parallel_timeout_minutes():
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        waited, _ = run_ranks(2, _worker, out)
    for name, result in waited.items():
        assert result is not None, f"{name}: the collective completed without its peer"
        seconds, kind, message = result
        assert seconds < 60 * TIMEOUT_MIN + MARGIN_S, f"{name} group waited {seconds:.1f} s ({kind}: {message})"
    assert time.perf_counter() - start < 4 * (60 * TIMEOUT_MIN + MARGIN_S) + 30
