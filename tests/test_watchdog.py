"""The hang watchdog (pretrain/faults/watchdog.py): the thread alone with a fake clock, and a real
2-rank gloo run where one rank is SIGSTOPped and the other's watchdog ends the job."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.faults.watchdog import Watchdog
from pretrain.stopping import EXIT_HANG
from tests.parallel_harness import free_port
from tests.test_faults import table_row
from tests.test_train_parallel import small

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_watchdog_fires_only_without_beats(tmp_path):
    clock, exits = FakeClock(), []
    with Watchdog(timeout_s=60, rank=3, log_dir=str(tmp_path), clock=clock, poll_s=0.01, exit=exits.append) as dog:
        for step in range(1, 4):  # beats every 50 fake seconds keep it quiet
            clock.now += 50
            dog.beat("F chunk 0 micro 1", step=step)
            time.sleep(0.05)
        assert exits == []
        clock.now += 61  # then nothing for longer than the timeout
        assert wait_for(lambda: exits, 5)
    assert exits == [EXIT_HANG]
    report = (tmp_path / "hangs/rank3.txt").read_text()
    assert "step 3" in report and "operation F chunk 0 micro 1" in report
    assert "--- thread MainThread" in report and "test_watchdog_fires_only_without_beats" in report


def test_watchdog_off_starts_no_thread(tmp_path):
    with Watchdog(timeout_s=0, rank=0, log_dir=str(tmp_path), exit=lambda code: None) as dog:
        assert dog._thread is None
        dog.beat("optimizer", step=1)


def test_sigstopped_rank_makes_its_peer_exit_with_hang_code(stdlib_data, tmp_path):
    hang_minutes = 0.1  # 6 s
    overrides = small(stdlib_data, tmp_path) + [
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "train.steps=100000",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        f"train.hang_timeout_minutes={hang_minutes}",
        "parallel.timeout_minutes=10",
        "train.log_interval=1",
    ]
    port, procs = free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pretrain.train", "configs/llama_tiny.yaml", *overrides],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        metrics = tmp_path / "logs/metrics.jsonl"
        assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 240), (
            tmp_path / "rank0.log"
        ).read_text()[-3000:]
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = procs[0].wait(timeout=60 * hang_minutes + 30)
        waited = time.monotonic() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
            p.wait()
    out = (tmp_path / "rank0.log").read_text()
    assert code == EXIT_HANG, out[-3000:]
    assert waited < 60 * hang_minutes + 30
    (line,) = [x for x in out.splitlines() if x.startswith("watchdog:")]
    assert "rank 0 on " in line and "hangs/rank0.txt" in line
    report = (tmp_path / "logs/hangs/rank0.txt").read_text()
    assert "operation " in report and "--- thread MainThread" in report
    assert "pretrain/train.py" in report  # the main thread's stack, down to where it blocked
    table_row(
        "a hung rank (SIGSTOP)",
        "kill -STOP of rank 1 after step 3",
        f"{waited:.1f} s (train.hang_timeout_minutes=0.1: 6 s)",
        f"stopped with code {EXIT_HANG}; stacks in logs/hangs/rank0.txt",
    )
