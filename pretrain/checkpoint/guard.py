"""Keeping a checkpoint directory safe from the runs that use it.

- One run at a time: `DirectoryLock` holds an exclusive `flock` on `{checkpoint.dir}/.lock` for
  the whole run, with the holder (host, pid, SLURM job) written in the file, so a second run on
  the same directory is refused naming the first. The kernel drops the lock when the holding
  process dies, so a killed or requeued run never leaves a stale lock behind (a pid file would).
- Which checkpoint a run starts from: `latest`, or, when `latest` is missing or unreadable
  while complete `step_N/` directories exist, the newest of them, with a warning
  (files.find_resume_checkpoint); never "start from scratch" over existing checkpoints.
- A run never overwrites a checkpoint it did not resume from: `check_no_overwrite` refuses a
  start whose saves could land on an existing, newer `step_N/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pretrain.checkpoint.files import CheckpointError, complete_steps

LOCK_FILE = ".lock"


class DirectoryLock:
    """An exclusive lock on a checkpoint directory for as long as this object holds it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CheckpointError naming the run that holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CheckpointError(
                f"checkpoint.dir {self.root} is in use by another run ({_describe(holder)}); "
                "wait for it to finish or stop it, or give this run another "
                "checkpoint.dir"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@contextlib.contextmanager
def run_lock(root: str, *, rank: int) -> Iterator[None]:
    """The lock of a training run on its checkpoint directory, held by rank 0 (before any
    process group: a refused run stops at once with exit code 2, and the launcher ends its other
    ranks) and released when the run ends."""
    if not root or rank != 0:
        yield
        return
    lock = DirectoryLock(root)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        job = f", SLURM job {h['job']}" if h.get("job") else ""
        return f"host {h['host']}, pid {h['pid']}{job}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def check_no_overwrite(root: str | Path, *, start_step: int) -> None:
    """Refuse a run starting at `start_step` when the directory holds complete checkpoints of
    later steps: its saves would replace them with a different run's weights."""
    if not root:
        return
    later = [path.name for step, path in complete_steps(Path(root)) if step > start_step]
    if later:
        start = f"the checkpoint it resumes from (step {start_step})" if start_step else "step 0 (no resume)"
        raise CheckpointError(
            f"checkpoint.dir {root} holds {', '.join(later[:4])}{' ...' if len(later) > 4 else ''}, "
            f"newer than {start}: this run would overwrite them. Resume from the newest "
            "(checkpoint.resume=auto), move those directories away, or use another "
            "checkpoint.dir"
        )
