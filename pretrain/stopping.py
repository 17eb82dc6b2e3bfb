"""When to stop early: a signal (SLURM's warning before the time limit, preemption, `scancel
--signal`) or train.exit_after_minutes, decided by all ranks together.

Signals reach ranks at different moments (or only some ranks), so a handler only records the
signal; after each step every rank contributes what it saw to one small all-reduce and all of
them stop after the same step, save a checkpoint and exit with EXIT_RESUMABLE, which the SLURM
scripts answer by requeueing the job.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from pretrain.parallel.waits import waiting

# EX_TEMPFAIL from sysexits.h: "try again later" -- stopped early with a checkpoint to resume from.
EXIT_RESUMABLE = 75
# A rank made no progress for train.hang_timeout_minutes (pretrain/faults/watchdog.py): a fault,
# not a user mistake (2) nor a clean stop (75); the next free code, so launchers can tell a hang
# from a crash (1) and restart the job from its last checkpoint.
EXIT_HANG = 76
# The run diverged beyond what it repairs by itself: train.max_rollbacks rollbacks used up, or
# fp16 overflowing at its minimum loss scale (pretrain/faults/divergence.py). Restarting the same
# job would diverge again, so launchers do not retry it: a person must look.
EXIT_DIVERGED = 77
# Two checkpoint saves in a row failed (disk full, permissions), or the final one did: the run
# stops rather than train on with nothing to resume from. Not retried by launchers either.
EXIT_CHECKPOINT_FAILED = 78
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequests:
    """Install with `with StopRequests(...) as stop:`; `stop.check()` after every step."""

    def __init__(self, *, minutes: float | None, world_size: int, device: torch.device) -> None:
        self.minutes, self.world_size, self.device = minutes, world_size, device
        self.start = time.perf_counter()
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def check(self) -> str | None:
        """Why to stop now ('SIGUSR1', 'signal', 'time limit'), the same on every rank; or None."""
        timed_out = self.minutes is not None and time.perf_counter() - self.start > 60 * self.minutes
        flags = torch.tensor([float(self.received is not None), float(timed_out)], device=self.device)
        if self.world_size > 1:
            with waiting():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return self.received or "signal"  # another rank got it
        if flags[1] > 0:
            return "time limit"
        return None
