"""A pipeline step as each rank ran it, replayed as if every rank had a core of its own.

bench/parallel.py measures how long pipeline ranks wait on their receives. On a shared machine
with fewer free cores than ranks that wall-clock wait also holds the time the peer spent
descheduled, which no schedule can remove. So each rank also records the CPU time of every
operation it ran (`OpTimer`, fed by the executor's progress calls: thread CPU time, which
waiting and being descheduled do not advance), and `replay` runs every rank's real steps again
with those costs under the executor's rules: before each step the rank posts its transfers,
runs the step's W's, and waits until every partner has posted the matching transfer (NCCL's
rendezvous; transfer time itself left out, loopback copies of a few hundred KB). What it
returns is the time each rank would have idled on dedicated cores: the schedule's own bubble,
plus the imbalance between the stages' work.
"""

from __future__ import annotations

import re
import statistics
import time

_OP = re.compile(r"^(F|B|W) chunk (\d+) micro (\d+)$")


class OpTimer:
    """progress(label) callback of one rank: CPU seconds of each F, B and W (from its progress
    call to the next one), per step, and the wall seconds from the step's start to the end of
    its pipeline schedule (the trainer's "optimizer" progress call)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.ends: list[float] = []
        self._label, self._start, self._step_start = None, 0.0, 0.0

    def start_step(self) -> None:
        self.steps.append({})
        self._label, self._step_start = None, time.perf_counter()

    def __call__(self, label: str) -> None:
        now = time.thread_time()
        if self._label is not None and _OP.match(self._label):
            step = self.steps[-1]
            step[self._label] = step.get(self._label, 0.0) + now - self._start
        if label == "optimizer":
            self.ends.append(time.perf_counter() - self._step_start)
        self._label, self._start = label, now

    def costs(self) -> dict[str, float]:
        """Median CPU seconds per operation label over the recorded steps."""
        labels = set().union(*self.steps) if self.steps else set()
        return {label: statistics.median(s[label] for s in self.steps if label in s) for label in labels}


def _messages(topo, steps) -> tuple[list[list], list[list]]:
    """Per step of one rank: the messages it sends after the step (in the next step's group)
    and those it receives in the step's group, each as (kind, stage, micro)."""
    from pretrain.parallel.model_chunks import stage_index
    from pretrain.parallel.pipeline import chunk_neighbours

    neighbours = chunk_neighbours(topo)
    stage = [
        stage_index(pp=topo.pp, pp_rank=topo.pp_rank, chunk=c, v_shape=topo.v_shape) for c in range(len(neighbours))
    ]
    sends, receives, here = [], [], set()
    for step in steps:
        keys = [(op.kind[1], op.chunk, op.micro) for op in step if op.kind in ("RF", "RB")]
        for op in step:
            key = (op.kind, op.chunk, op.micro)
            source = neighbours[op.chunk][0 if op.kind == "F" else 1] if op.kind in ("F", "B") else None
            if source and key not in keys and key not in here:
                keys.append(key)
        here |= set(keys)
        receives.append([(kind, stage[chunk], micro) for kind, chunk, micro in keys])
        out = []
        for op in step:
            if op.kind in ("F", "B") and neighbours[op.chunk][1 if op.kind == "F" else 0]:
                target = stage[op.chunk] + (1 if op.kind == "F" else -1)
                out.append((op.kind, target, op.micro))
        sends.append(out)
    return sends, receives


def _label(op) -> str:
    return f"{op.kind} chunk {op.chunk} micro {op.micro}"  # as the executor's progress calls name it


def replay(topos: list, schedules: list[list], costs: list[dict[str, float]]) -> list[float]:
    """Seconds each pipeline rank idles in one step on dedicated cores (waiting on receives, and
    after its last operation until the last rank's ends): `topos` and `schedules`
    (make_schedule's steps) per pipeline rank, `costs` its OpTimer.costs()."""
    ranks = range(len(topos))
    plan = [_messages(topos[r], schedules[r]) for r in ranks]
    posted: dict[tuple[str, str, tuple], float] = {}  # ("send" | "recv", message) -> post time
    clock, index, wait = [0.0 for _ in ranks], [0 for _ in ranks], [0.0 for _ in ranks]
    while any(index[r] <= len(schedules[r]) for r in ranks):
        moved, known = False, len(posted)
        for r in ranks:
            k = index[r]
            if k > len(schedules[r]):
                continue
            sends = plan[r][0][k - 1] if k > 0 else []
            receives = plan[r][1][k] if k < len(schedules[r]) else []
            for m in sends:
                posted.setdefault(("send", m), clock[r])
            for m in receives:
                posted.setdefault(("recv", m), clock[r])
            partners = [("recv", m) for m in sends] + [("send", m) for m in receives]
            if any(p not in posted for p in partners):
                continue  # a partner has not reached its matching transfer yet
            step = schedules[r][k] if k < len(schedules[r]) else ()
            ready = clock[r] + sum(costs[r].get(_label(op), 0.0) for op in step if op.kind == "W")
            done = max([ready] + [posted[p] for p in partners])
            wait[r] += done - ready
            clock[r] = done + sum(costs[r].get(_label(op), 0.0) for op in step if op.kind in ("F", "B"))
            index[r], moved = k + 1, True
        if not moved and len(posted) == known:
            raise RuntimeError("replay stuck: the schedules' transfers do not match")
    return [w + max(clock) - c for w, c in zip(wait, clock)]
