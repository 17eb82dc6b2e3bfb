"""`python tests/fault_worker.py CONFIG [overrides]`: `python -m pretrain.train` with one fault
injected, described by the PRETRAIN_TEST_FAULT environment variable (JSON). Used by
tests/test_faults.py; the faults are what goes wrong at scale, made to happen on cue:

  {"kind": "scale_logits", "calls": [N, ...], "factor": F, "rank": R}
      the last stage's final-norm output times F during the N-th optimizer steps the run takes
      (counting from 1, re-run steps after a rollback counted again: the data is new) on rank R
      (null: every rank): F = NaN gives a NaN loss and NaN gradients, F = 30 a finite loss spike
  {"kind": "stuck_data", "step": S, "rank": R}
      rank R's data loader blocks forever when step S asks for its first batch
  {"kind": "slow_data", "seconds": T, "rank": R}
      rank R's data loader takes T seconds longer for every batch (a slow file system on one node)
  {"kind": "failing_save", "steps": [S, ...], "rank": R}
      rank R's write of the checkpoint of step S fails with "No space left on device"
  {"kind": "fp16_overflow"}
      every step's gradients overflow in fp16, whatever the loss scale
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain.strategy as strategy
import pretrain.train as train
import pretrain.trainer as trainer
from pretrain.data.loader import SampleLoader

FAULT = json.loads(os.environ.get("PRETRAIN_TEST_FAULT", "{}"))
RANK = int(os.environ.get("RANK", "0"))
STEP = [0, 0]  # the step the trainer is in, and how many steps it has taken (patched Trainer.step)


def targeted() -> bool:
    return FAULT.get("rank") is None or FAULT["rank"] == RANK


def track_steps() -> None:
    original = trainer.Trainer.step

    def step(self, step: int) -> dict:
        STEP[0], STEP[1] = step, STEP[1] + 1
        return original(self, step)

    trainer.Trainer.step = step


def scale_logits() -> None:
    original = train.build_model_chunks
    calls, factor = set(FAULT["calls"]), float(FAULT["factor"])

    def build(*args, **kwargs):
        chunks = original(*args, **kwargs)
        for chunk in chunks:
            if chunk.final_norm is not None:
                chunk.final_norm.register_forward_hook(
                    lambda module, inputs, out: out * factor if STEP[1] in calls and module.training else out
                )
        return chunks

    train.build_model_chunks = build


def stuck_data() -> None:
    original = SampleLoader.__next__

    def next_batch(self):
        if STEP[0] >= FAULT["step"] and threading.current_thread() is threading.main_thread():
            threading.Event().wait()  # like a read from a dead file system: never returns
        return original(self)

    SampleLoader.__next__ = next_batch


def slow_data() -> None:
    original = SampleLoader.__next__

    def next_batch(self):
        time.sleep(FAULT["seconds"])
        return original(self)

    SampleLoader.__next__ = next_batch


def failing_save() -> None:
    from pretrain.checkpoint.state import Shard

    original = Shard.write
    steps = set(FAULT["steps"])

    def write(self, directory: Path, **kwargs):
        if int(Path(directory).name.rsplit("_", 1)[1]) in steps:  # .tmp-step_S, written in the background
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return original(self, directory, **kwargs)

    Shard.write = write


def fp16_overflow() -> None:
    def always_overflow(params, *, scale, group=None):
        return True

    strategy.unscale_and_check = always_overflow


if __name__ == "__main__":
    track_steps()
    kind = FAULT.get("kind")
    if kind and targeted():
        {
            "scale_logits": scale_logits,
            "stuck_data": stuck_data,
            "slow_data": slow_data,
            "failing_save": failing_save,
            "fp16_overflow": fp16_overflow,
        }[kind]()
    sys.exit(train.main(sys.argv[1:]))
