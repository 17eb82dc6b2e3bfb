"""The checkpoint directory's guards: one run at a time, no fresh start over existing checkpoints,
no overwriting of checkpoints a run did not resume from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint.files import CheckpointError, find_resume_checkpoint
from pretrain.checkpoint.guard import DirectoryLock, check_no_overwrite
from tests.test_faults import table_row

ROOT = Path(__file__).resolve().parents[1]
TAKE_LOCK = (
    "import sys, time; sys.path.insert(0, {root!r}); from pretrain.checkpoint.guard import DirectoryLock; "
    "DirectoryLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(float(sys.argv[2]))"
)


def _take_lock_in_another_process(path: Path, hold_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", TAKE_LOCK.format(root=str(ROOT)), str(path), str(hold_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    holder = _take_lock_in_another_process(tmp_path / "ck", 60)
    try:
        with pytest.raises(CheckpointError, match=rf"in use by another run \(host \S+, pid {holder.pid}, since"):
            DirectoryLock(tmp_path / "ck").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: no stale lock file blocks the next run.
    lock = DirectoryLock(tmp_path / "ck")
    lock.acquire()
    assert json.loads((tmp_path / "ck" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    again = DirectoryLock(tmp_path / "ck")
    again.acquire()  # released: the same process takes it again
    again.release()


def _complete(root: Path, step: int) -> Path:
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text("{}")
    return path


def test_missing_or_broken_latest_resumes_from_the_newest_complete_step(tmp_path):
    for step in (5, 10):
        _complete(tmp_path, step)
    (tmp_path / "step_15").mkdir()  # an interrupted save: no meta.json
    said = []
    assert find_resume_checkpoint(str(tmp_path), "auto", warn=said.append) == tmp_path / "step_10"
    assert "no 'latest' pointer" in said[0] and "step_10" in said[0]
    (tmp_path / "latest").write_text("step_99\n")  # names a checkpoint that is gone
    assert find_resume_checkpoint(str(tmp_path), "auto", warn=said.append) == tmp_path / "step_10"
    assert "unusable" in said[1]
    (tmp_path / "latest").write_bytes(b"\xff\xfe")  # garbage
    assert find_resume_checkpoint(str(tmp_path), "auto", warn=said.append) == tmp_path / "step_10"
    # A save that crashed after publishing step_10 but before moving `latest` to it.
    (tmp_path / "latest").write_text("step_5\n")
    assert find_resume_checkpoint(str(tmp_path), "auto", warn=said.append) == tmp_path / "step_10"
    assert "names step_5, but step_10 is newer and complete" in said[3]
    (tmp_path / "latest").write_text("step_10\n")
    assert find_resume_checkpoint(str(tmp_path), "auto", warn=said.append) == tmp_path / "step_10"
    assert len(said) == 4


def test_fresh_directories_start_from_scratch(tmp_path):
    assert find_resume_checkpoint(str(tmp_path / "new"), "auto") is None
    assert find_resume_checkpoint(str(tmp_path), "auto") is None
    (tmp_path / "latest").write_text("step_3\n")
    with pytest.raises(CheckpointError, match="unusable .* holds no complete checkpoint: delete it"):
        find_resume_checkpoint(str(tmp_path), "auto")


def test_a_run_never_overwrites_later_checkpoints(tmp_path):
    for step in (5, 10):
        _complete(tmp_path, step)
    check_no_overwrite(str(tmp_path), start_step=10)
    with pytest.raises(CheckpointError, match=r"holds step_10, newer than the checkpoint it resumes from \(step 5\)"):
        check_no_overwrite(str(tmp_path), start_step=5)
    with pytest.raises(CheckpointError, match=r"holds step_5, step_10, newer than step 0 \(no resume\)"):
        check_no_overwrite(str(tmp_path), start_step=0)
    check_no_overwrite("", start_step=0)  # no checkpoint.dir


# -- through the trainer: python -m pretrain.train as a user runs it --------------------------------

TINY = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.seq_length=32",
    "train.micro_batch_size=2",
    "train.log_interval=1",
    "train.eval_interval=0",
    "logging.tensorboard=false",
    "logging.peak_tflops=1",
    "checkpoint.interval=2",
    "checkpoint.async_save=false",
]


def train(data, tmp_path, *overrides, wait=True):
    command = [
        sys.executable,
        "-m",
        "pretrain.train",
        "configs/gpt_tiny.yaml",
        f"data.path={data['prefix']}",
        f"data.tokenizer={data['tokenizer']}",
        f"checkpoint.dir={tmp_path}/ckpt",
        f"logging.dir={tmp_path}/logs",
        *TINY,
        *overrides,
    ]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_trainer_resumes_without_latest_and_refuses_to_overwrite(stdlib_data, tmp_path):
    first = train(stdlib_data, tmp_path, "train.steps=4")
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "ckpt/latest").unlink()
    resumed = train(stdlib_data, tmp_path, "train.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "no 'latest' pointer; resuming from the newest complete checkpoint" in resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert (tmp_path / "ckpt/latest").read_text().strip() == "step_6"
    table_row(
        "a missing `latest`",
        "`latest` deleted beside step_2 and step_4",
        "at start",
        "resumed from step_4 with a warning, trained to step 6",
    )
    # Starting over (checkpoint.resume=none) would write step_2 .. step_6 over the saved ones.
    fresh = train(stdlib_data, tmp_path, "train.steps=6", "checkpoint.resume=none")
    assert fresh.returncode == 2 and "would overwrite them" in fresh.stderr, fresh.stderr[-2000:]
    assert "Traceback" not in fresh.stderr


def test_a_second_run_on_the_same_directory_is_refused(stdlib_data, tmp_path):
    holder = train(stdlib_data, tmp_path, "train.steps=100000", "checkpoint.interval=0", wait=False)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "ckpt/.lock").is_file() or not (tmp_path / "ckpt/.lock").read_text():
            assert holder.poll() is None and time.time() < deadline, holder.stdout.read()[-2000:]
            time.sleep(0.2)
        started = time.monotonic()
        second = train(stdlib_data, tmp_path, "train.steps=2")
        refused_after = time.monotonic() - started
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (host {os.uname().nodename}, pid {holder.pid}" in second.stderr
        assert holder.poll() is None  # the first run goes on
    finally:
        holder.kill()
        holder.wait()
    table_row(
        "a second run on the same checkpoint.dir",
        "the same command started while a run trains",
        f"{refused_after:.1f} s after its start (the lock, before any process group)",
        "second run refused with code 2 naming host and pid; the first one trains on",
    )
