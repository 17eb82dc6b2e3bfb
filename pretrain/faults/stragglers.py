"""Which rank is slow: every log interval, each rank's own work is compared with the median.

A collective finishes when its slowest member arrives, so every rank's wall-clock step time is
the same and cannot point at the slow one. What differs is how long each rank waited for the
others (pretrain/parallel/waits.py): a rank's own work is its step time minus that wait. A rank
whose own work exceeds the median's by faults.straggler_factor is reported, with its host, on
the console and in metrics.jsonl (`stragglers`): the node to drain before it turns into a hang.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch
import torch.distributed as dist

from pretrain.parallel.waits import blocked_seconds


class StragglerMeter:
    """`start()` and `stop()` around each step on every rank; `report()` (collective, all ranks at
    the same steps) compares the ranks' own work since the last report."""

    def __init__(self, *, factor: float, world_size: int, device: torch.device) -> None:
        self.factor, self.world_size, self.device = factor, world_size, device
        self.enabled = factor > 0 and world_size > 1
        self.own_work = 0.0
        self._started = (0.0, 0.0)
        self.hosts = [socket.gethostname()]
        if self.enabled:  # once: which host each rank is on
            self.hosts = [""] * world_size
            dist.all_gather_object(self.hosts, socket.gethostname())

    def start(self) -> None:
        self._started = (time.perf_counter(), blocked_seconds())

    def stop(self) -> None:
        wall, blocked = self._started
        self.own_work += (time.perf_counter() - wall) - (blocked_seconds() - blocked)

    def report(self) -> list[dict]:
        """The ranks slower than factor x the median since the last report (every rank gets the
        same list); resets the tally."""
        if not self.enabled:
            return []
        mine = torch.tensor([self.own_work], dtype=torch.float64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        self.own_work = 0.0
        work = [float(t) for t in everyone]
        return slow_ranks(work, hosts=self.hosts, factor=self.factor)


def slow_ranks(work: list[float], *, hosts: list[str], factor: float) -> list[dict]:
    median = statistics.median(work)
    if median <= 0:
        return []
    return [
        {
            "rank": rank,
            "host": hosts[rank],
            "own_work_s": round(seconds, 4),
            "median_s": round(median, 4),
            "ratio": round(seconds / median, 2),
        }
        for rank, seconds in enumerate(work)
        if seconds > factor * median
    ]
