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

ROOT = Path(__file__).resolve().parents[1]
TAKE_LOCK = ("import sys, time; sys.path.insert(0, {root!r}); from pretrain.checkpoint.guard import DirectoryLock; "
             "DirectoryLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(float(sys.argv[2]))")


def _take_lock_in_another_process(path: Path, hold_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", TAKE_LOCK.format(root=str(ROOT)), str(path), str(hold_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    (tmp_path / "latest").write_text("step_5\n")  # a good pointer wins, even to an older step
    assert find_resume_checkpoint(str(tmp_path), "auto", warn=said.append) == tmp_path / "step_5"
    assert len(said) == 3


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
