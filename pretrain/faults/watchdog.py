"""A per-rank hang watchdog: a daemon thread that notices when training makes no progress.

A hung collective (a peer stopped, a lost node, NCCL without a timeout) or a stuck data read
cannot be interrupted from Python, and the job would sit idle until its time limit. The loop and
the pipeline executor call `beat(phase)` at every operation; when no beat arrives for
train.hang_timeout_minutes, the thread writes every thread's Python stack, the step and the
operation to `{logging.dir}/hangs/rank{R}.txt`, prints one line, and ends the process with
EXIT_HANG through os._exit (the only way out of a blocked C call; no cleanup runs).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from pretrain.stopping import EXIT_HANG


class Watchdog:
    """`with Watchdog(...) as dog:` then `dog.beat(phase, step=...)`; `timeout_s` None or <= 0
    disables it (beats then cost one attribute write)."""

    def __init__(
        self,
        *,
        timeout_s: float | None,
        rank: int,
        log_dir: str = "",
        clock: Callable[[], float] = time.monotonic,
        poll_s: float | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.rank, self.log_dir, self.clock, self.exit = rank, log_dir, clock, exit
        self.poll_s = poll_s if poll_s is not None else min(5.0, (self.timeout_s or 5.0) / 10)
        self.step, self.phase = 0, "start"
        self.last_beat = clock()
        self.fired: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout_s is not None:
            self.last_beat = self.clock()
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)

    def beat(self, phase: str, *, step: int | None = None) -> None:
        """Progress: the rank is starting `phase` (of `step`, when given)."""
        if step is not None:
            self.step = step
        self.phase = phase
        self.last_beat = self.clock()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = self.clock() - self.last_beat
            if idle > self.timeout_s:
                self.fire(idle)
                return

    def fire(self, idle: float) -> None:
        """Write the stacks, print one line, exit with EXIT_HANG."""
        host = socket.gethostname()
        where = f"step {self.step}, in {self.phase}"
        path = Path(self.log_dir or ".") / "hangs" / f"rank{self.rank}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.report(host=host, idle=idle))
        except OSError as e:  # the report is a courtesy; exiting is what matters
            path = Path(f"(not written: {e})")
        print(
            f"watchdog: rank {self.rank} on {host} made no progress for {idle:.0f} s at {where}; "
            f"stacks in {path}; exiting with code {EXIT_HANG}",
            file=sys.stderr,
            flush=True,
        )
        self.fired = path
        self.exit(EXIT_HANG)

    def report(self, *, host: str, idle: float) -> str:
        names = {t.ident: t.name for t in threading.enumerate()}
        lines = [
            f"rank {self.rank} on {host}, pid {os.getpid()}",
            f"no progress for {idle:.1f} s (train.hang_timeout_minutes = {self.timeout_s / 60:g})",
            f"step {self.step}",
            f"operation {self.phase}",
            "",
        ]
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue  # the watchdog itself
            lines.append(f"--- thread {names.get(ident, '?')} ({ident}) ---")
            lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
            lines.append("")
        return "\n".join(lines) + "\n"
