"""How long this thread has been blocked waiting for its peers, for the straggler meter.

A collective ends on every rank when the slowest one arrives, so wall-clock step times are equal
across ranks and cannot show which rank is slow. The time a rank spends *inside* blocking
communication can: the slow rank barely waits, its peers wait for it. Every blocking call of the
training path (the TP/SP collectives in comm.py, the pipeline exchanges, the DP bucket waits, the
loss, norm and stop-flag reductions) runs inside `waiting()`; a step's own work is its wall time
minus the growth of `blocked_seconds()`.

Host-side time: exact over gloo, where collectives block the caller. NCCL calls return once
queued, so on GPUs this sees host-side stragglers (data loading, a contended or throttled host)
but not a slow device; DeepSpeed's own collectives are not wrapped either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Per thread: the checkpoint writer's agreement calls are not the training step's waits.
_local = threading.local()


def blocked_seconds() -> float:
    """Seconds this thread has spent in `waiting()` blocks so far (monotonic)."""
    return getattr(_local, "seconds", 0.0)


@contextmanager
def waiting() -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _local.seconds = blocked_seconds() + time.perf_counter() - start
