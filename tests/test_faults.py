"""The fault-injection matrix: real gloo runs of 2 ranks with one fault each (injected by
tests/fault_worker.py, or by signals from here), checking that the fault is detected in bounded
time, that nothing saved is lost or overwritten, and that recoverable faults end with all steps
trained. Also covered elsewhere: a SIGSTOPped rank (tests/test_watchdog.py), a second run on the
same directory and a missing `latest` in real runs (tests/test_checkpoint_guard.py), a killed
task restarted inside its SLURM allocation (tests/test_slurm.py).

With PRETRAIN_FAULT_TABLE=FILE each test appends its row of the fault table (bench/faults.py
prints them for bench/RESULTS.md)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pretrain.stopping import EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, EXIT_HANG
from tests.parallel_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 30  # the bound: detected within the configured time + 30 s


def tiny(data, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data['prefix']}",
        f"data.tokenizer={data['tokenizer']}",
        "model.vocab_size=2000",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.seq_length=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.log_interval=1",
        "train.eval_interval=0",
        "schedule.warmup_steps=2",
        "logging.tensorboard=false",
        "logging.peak_tflops=1",
        "checkpoint.interval=5",
        "checkpoint.keep_last=0",
        "parallel.timeout_minutes=0.25",
        "train.hang_timeout_minutes=0.5",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        *extra,
    ]


@dataclass
class Run:
    procs: list[subprocess.Popen]
    logs: list[Path]
    started: float

    def wait(self, timeout: float) -> tuple[list[int], float]:
        """Every rank's exit code and the seconds until the last one exited (a rank still
        running at the timeout is killed, and the test fails on its code)."""
        end = self.started + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(-999)
        return codes, time.monotonic() - self.started

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def launch(run_dir: Path, overrides: list[str], *, fault: dict | None = None, ranks: int = 2, name: str = "run") -> Run:
    run_dir.mkdir(parents=True, exist_ok=True)
    port, procs, logs = free_port(), [], []
    for rank in range(ranks):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PRETRAIN_TEST_FAULT": json.dumps(fault or {}),
        }
        logs.append(run_dir / f"{name}.rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "tests/fault_worker.py", "configs/llama_tiny.yaml", *overrides],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return Run(procs, logs, time.monotonic())


def train(
    run_dir: Path, overrides: list[str], *, fault: dict | None = None, timeout: float = 300, name: str = "run"
) -> tuple[list[int], float, Run]:
    run = launch(run_dir, overrides, fault=fault, name=name)
    codes, seconds = run.wait(timeout)
    return codes, seconds, run


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs/metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_logged(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "loss" in r}


def wait_for_step(run: Run, run_dir: Path, step: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while max(steps_logged(run_dir), default=0) < step:
        assert time.monotonic() < end and all(p.poll() is None for p in run.procs), run.output()[-3000:]
        time.sleep(0.1)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "ckpt").glob("step_*") if (p / "meta.json").is_file())


def latest(run_dir: Path) -> str:
    return (run_dir / "ckpt/latest").read_text().strip()


def weights_finite(step_dir: Path) -> bool:
    return all(
        bool(t.isfinite().all()) for f in step_dir.glob("model_*.safetensors") for t in load_file(str(f)).values()
    )


def table_row(fault: str, injected: str, detected: str, outcome: str, lost: str = "none") -> None:
    path = os.environ.get("PRETRAIN_FAULT_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {"fault": fault, "injected": injected, "detected": detected, "outcome": outcome, "lost": lost}
                )
                + "\n"
            )


# -- dead and stuck ranks ----------------------------------------------------------------------


def test_sigkilled_rank_ends_the_job_within_the_timeout_and_a_rerun_resumes(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=100000")
    run = launch(tmp_path, overrides)
    try:
        wait_for_step(run, tmp_path, 7)
        while not (tmp_path / "ckpt/latest").exists():  # the first checkpoint, written in the background
            assert run.procs[0].poll() is None, run.output()[-3000:]
            time.sleep(0.1)
        os.kill(run.procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        code = run.procs[0].wait(timeout=0.25 * 60 + GRACE_S)
        detected = time.monotonic() - killed
    finally:
        run.kill()
    assert code not in (0, 2), run.output()[-3000:]
    saved = checkpoint_steps(tmp_path)
    assert saved and latest(tmp_path) == f"step_{saved[-1]}"
    codes, _, rerun = train(tmp_path, tiny(stdlib_data, tmp_path, f"train.steps={saved[-1] + 3}"), name="rerun")
    assert codes == [0, 0], rerun.output()[-3000:]
    assert f"at step {saved[-1]}" in rerun.output()
    assert set(checkpoint_steps(tmp_path)) >= set(saved)
    table_row(
        "a rank dies (SIGKILL)",
        "kill -9 of rank 1 once step_5 is published",
        f"{detected:.1f} s (peer's collective fails; parallel.timeout_minutes=0.25)",
        f"stopped with code {code}; rerun resumed from step_{saved[-1]} and finished",
    )


def test_rank_stuck_in_data_loading_is_reported_by_the_watchdog(stdlib_data, tmp_path):
    hang_s = 6
    overrides = tiny(
        stdlib_data,
        tmp_path,
        "train.steps=100000",
        f"train.hang_timeout_minutes={hang_s / 60}",
        "parallel.timeout_minutes=1",
    )
    codes, seconds, run = train(tmp_path, overrides, fault={"kind": "stuck_data", "step": 8, "rank": 1}, timeout=240)
    assert codes[1] == EXIT_HANG, run.output(1)[-3000:]
    assert codes[0] not in (0, 2), run.output(0)[-3000:]
    report = (tmp_path / "logs/hangs/rank1.txt").read_text()
    assert "step 8" in report and "next_batch" in report  # the stuck frame, in the data loader
    stuck_at = max(steps_logged(tmp_path))
    assert stuck_at == 7 and latest(tmp_path) == "step_5" and weights_finite(tmp_path / "ckpt/step_5")
    table_row(
        "a rank stuck in data loading",
        "rank 1's loader blocks forever at step 8",
        f"by the watchdog, {hang_s} s after the last progress (train.hang_timeout_minutes); the whole "
        f"2-rank job, start to exit: {seconds:.0f} s",
        f"stopped with code {EXIT_HANG} on rank 1, its stacks (stuck in the loader) in logs/hangs/rank1.txt",
    )


# -- bad steps, spikes, divergence --------------------------------------------------------------

PP2 = ["parallel.pipeline=2"]  # the loss lives on the last stage: the first must get the same verdict


def test_nan_in_one_batch_is_skipped_on_every_rank(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=10", *PP2)
    codes, _, run = train(tmp_path, overrides, fault={"kind": "scale_logits", "calls": [6], "factor": "nan", "rank": 1})
    assert codes == [0, 0], run.output(1)[-3000:]
    logged = steps_logged(tmp_path)
    assert logged[6]["bad_step"] == "loss is nan" and logged[6]["skipped_steps"] == 1
    assert all(math.isfinite(logged[s]["loss"]) for s in logged if s != 6)
    assert logged[10]["skipped_steps"] == 1 and "bad_step" not in logged[7]
    assert "step 6 skipped on every rank: loss is nan" in run.output(1)
    assert checkpoint_steps(tmp_path) == [5, 10] and weights_finite(tmp_path / "ckpt/step_10")
    table_row(
        "NaN in one batch",
        "last stage's activations times NaN in step 6 (PP=2)",
        "the same step, on both stages",
        "step skipped, counted (skipped_steps=1); all 10 steps trained",
    )


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_skips_a_nan_step_without_touching_its_state(stdlib_data, tmp_path, stage):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=8", "checkpoint.interval=4", f"parallel.zero_stage={stage}")
    codes, _, run = train(tmp_path, overrides, fault={"kind": "scale_logits", "calls": [5], "factor": "nan", "rank": 0})
    assert codes == [0, 0], run.output()[-3000:]
    logged = steps_logged(tmp_path)
    assert logged[5]["bad_step"] == "loss is nan"
    assert all(math.isfinite(logged[s]["loss"]) for s in (6, 7, 8)) and logged[8]["skipped_steps"] == 1
    assert weights_finite(tmp_path / "ckpt/step_8")


def test_loss_spike_is_skipped(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=12", "faults.spike_window=4", "faults.spike_sigmas=3", *PP2)
    codes, _, run = train(
        tmp_path, overrides, fault={"kind": "scale_logits", "calls": [10], "factor": 30, "rank": None}
    )
    assert codes == [0, 0], run.output(1)[-3000:]
    logged = steps_logged(tmp_path)
    assert logged[10]["bad_step"].startswith("loss spike: ") and math.isfinite(logged[10]["loss"])
    assert logged[12]["skipped_steps"] == 1 and "bad_step" not in logged[11]
    table_row(
        "a loss spike",
        "logits times 30 in step 10",
        "the same step (mean + 3 std of a 4-step window)",
        "step skipped; all 12 steps trained",
    )


def test_divergence_rolls_back_past_the_bad_data_and_finishes(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=12", "faults.max_bad_steps=3", *PP2)
    codes, seconds, run = train(
        tmp_path, overrides, fault={"kind": "scale_logits", "calls": [7, 8, 9], "factor": "nan", "rank": 1}
    )
    assert codes == [0, 0], run.output(1)[-3000:]
    (rollback,) = [r["rollback"] for r in records(tmp_path) if "rollback" in r]
    assert rollback["from_step"] == 9 and rollback["checkpoint"].endswith("step_5")
    assert rollback["skipped_samples"] == 4 * 8  # steps 6-9's batches are not replayed
    assert rollback["data_position"] == {"consumed_samples": 9 * 8}  # where the new step 6 reads
    logged = steps_logged(tmp_path)
    assert sorted(logged) == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in logged.values())
    meta = json.loads((tmp_path / "ckpt/step_12/meta.json").read_text())
    assert meta["train_state"]["consumed_samples"] == (12 + 4) * 8
    assert meta["train_state"]["guard"]["rollbacks"] == 1
    assert "rollback 1 of at most 3: loss is nan at step 9" in run.output(1)
    table_row(
        "divergence (3 bad steps in a row)",
        "NaN activations in steps 7-9",
        "step 9 (faults.max_bad_steps=3)",
        "rolled back to step_5, skipped the 32 samples read since, trained all 12 steps",
    )


def test_endless_divergence_stops_with_the_diverged_code(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=40", "faults.max_bad_steps=2", "faults.max_rollbacks=1", *PP2)
    codes, seconds, run = train(
        tmp_path, overrides, fault={"kind": "scale_logits", "calls": list(range(7, 41)), "factor": "nan", "rank": None}
    )
    assert codes == [EXIT_DIVERGED, EXIT_DIVERGED], run.output(1)[-3000:]
    assert "faults.max_rollbacks=1" in run.output(1) and "Traceback" not in run.output(1)
    assert latest(tmp_path) == "step_5" and weights_finite(tmp_path / "ckpt/step_5")
    table_row(
        "divergence that does not go away",
        "NaN activations from step 7 on",
        "step 8, then again after the rollback (max_bad_steps=2, max_rollbacks=1)",
        f"stopped with code {EXIT_DIVERGED}; step_5 kept as latest",
    )


def test_fp16_that_cannot_recover_stops(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=60", "train.precision=fp16")
    codes, seconds, run = train(tmp_path, overrides, fault={"kind": "fp16_overflow"})
    assert codes == [EXIT_DIVERGED, EXIT_DIVERGED], run.output()[-3000:]
    assert "loss scale is at its minimum" in run.output() or "already at its minimum" in run.output()
    table_row(
        "fp16 that cannot recover",
        "every step's gradients overflow",
        "after 18 overflowing steps: the scale fell from 2^16 to its minimum",
        f"stopped with code {EXIT_DIVERGED}; the checkpoints saved before it kept",
    )


# -- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model_tp0_pp0_part1.safetensors", "meta.json"])
def test_corrupted_newest_checkpoint_and_missing_latest_fall_back(stdlib_data, tmp_path, damaged):
    codes, _, run = train(tmp_path, tiny(stdlib_data, tmp_path, "train.steps=10"))
    assert codes == [0, 0], run.output()[-3000:]
    bad = tmp_path / "ckpt/step_10" / damaged
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF  # deep in the tensor data; in meta.json, its closing brace
    bad.write_bytes(bytes(data))
    (tmp_path / "ckpt/latest").unlink()
    codes, _, rerun = train(tmp_path, tiny(stdlib_data, tmp_path, "train.steps=12"), name="rerun")
    assert codes == [0, 0], rerun.output()[-3000:]
    out = rerun.output()
    assert "no 'latest' pointer" in out and f"step_10/{damaged}" in out and "at step 5" in out
    assert latest(tmp_path) == "step_12" and weights_finite(tmp_path / "ckpt/step_12")
    table_row(
        f"a corrupted newest checkpoint ({damaged}) and no `latest`",
        f"a byte flipped in step_10's {damaged}; `latest` deleted",
        "at start: "
        + (
            "checksum mismatch naming the file, on the rank reading it"
            if damaged != "meta.json"
            else "meta.json unreadable, before the process groups start"
        ),
        "resumed from step_5 with a warning, trained to step 12",
        "none (step_10 was already damaged)",
    )


def test_a_failed_save_is_reported_kept_and_retried(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=20")
    codes, _, run = train(tmp_path, overrides, fault={"kind": "failing_save", "steps": [10], "rank": 1})
    assert codes == [0, 0], run.output()[-3000:]
    out = run.output()
    assert "No space left on device" in out and "Traceback" not in out
    assert checkpoint_steps(tmp_path) == [5, 15, 20] and latest(tmp_path) == "step_20"
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))
    table_row(
        "a failed save (disk full)",
        "rank 1's write of step_10 raises ENOSPC",
        "at once, by the writer",
        "reported; step_5 stayed latest; step_15 saved; all 20 steps trained",
    )


def test_two_failed_saves_in_a_row_stop_the_run(stdlib_data, tmp_path):
    overrides = tiny(stdlib_data, tmp_path, "train.steps=40")
    codes, _, run = train(tmp_path, overrides, fault={"kind": "failing_save", "steps": [10, 15], "rank": 0})
    assert codes == [EXIT_CHECKPOINT_FAILED] * 2, run.output()[-3000:]
    assert checkpoint_steps(tmp_path) == [5] and latest(tmp_path) == "step_5"
    assert max(steps_logged(tmp_path)) < 40
    table_row(
        "two failed saves in a row",
        "rank 0's writes of step_10 and step_15 raise ENOSPC",
        "at the second failure",
        f"stopped with code {EXIT_CHECKPOINT_FAILED}; step_5 kept as latest",
    )


# -- stragglers ---------------------------------------------------------------------------------


def test_a_slow_rank_is_reported_as_a_straggler(stdlib_data, tmp_path):
    # 3 ranks: with 2 the median is the mean of the pair, and no rank can exceed it by 2x.
    overrides = tiny(
        stdlib_data,
        tmp_path,
        "train.steps=20",
        "train.log_interval=5",
        "checkpoint.interval=0",
        "train.global_batch_size=12",
    )
    run = launch(tmp_path, overrides, ranks=3, fault={"kind": "slow_data", "seconds": 0.1, "rank": 2})
    codes, _ = run.wait(300)
    assert codes == [0, 0, 0], run.output()[-3000:]
    reports = {r["step"]: r["stragglers"] for r in records(tmp_path) if "loss" in r and r["step"] % 5 == 0}
    assert sorted(reports) == [5, 10, 15, 20]
    assert all([s["rank"] for s in found] == [2] for found in reports.values()), reports
    ratios = [s["ratio"] for found in reports.values() for s in found]
    assert all(s["host"] == os.uname().nodename for found in reports.values() for s in found)
    assert "straggler: rank 2 on " in run.output()
    table_row(
        "a slow rank",
        "rank 2 of 3 (DP) reads every batch 0.1 s slower",
        f"at every log interval (5 steps): ratio {min(ratios):.1f}-{max(ratios):.1f}x the median",
        "reported (console, metrics `stragglers`), no other rank reported; all 20 steps trained",
    )
