"""Zero-bubble pipeline schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024):
ZB-H1 and ZB-V, as op lists for the executor in pretrain/parallel/pipeline.py.

Each backward is split in two: B, the gradient of the stage's input (the previous stage waits
for it), and W, the gradients of the weights (nobody waits for them; pretrain/models/
weight_grads.py). The W's go where 1F1B would leave the rank idle.

The schedules are computed, not drawn: `simulate` runs the executor for all ranks at once with
unit costs (F = B = W = 1) and records what each rank does. Whenever a rank is free it runs

1. a B whose gradient is there (the later stage first): B is on the critical path;
2. else an F whose input is there (the later stage first), if the rank holds fewer
   micro-batches than its limit (held: forward done, W not yet: the saved activations, and the
   inputs and output gradients a W keeps, live until then);
3. else its oldest pending W: W's fill the time the rank would otherwise wait.

How the executor moves data decides what the simulation must respect. Before each step a rank
posts one group of transfers (the sends of its previous step, the receives of this one), runs
the step's W's while they are in flight, then waits for the group; then it runs the step's F or
B. Under NCCL (pretrain/parallel/nccl_rules.py) a send completes only once its receiver has
posted the receive, and the k-th send between two ranks meets the k-th receive whatever it was
meant for. So a rank reads each neighbour's messages in the order they were sent, and it reads
every message as soon as it is between two F/B operations (the message waits in the rank's
inbox until its operation runs): a sender is never held up by a receiver that is busy with
other work, and no two ranks can each wait for the other to read. The receives are part of the
schedule (`("RF" | "RB", chunk, micro)`: receive the input of that F or B), so the executor
replays exactly the transfers the simulation made, and a schedule the simulation finishes runs
under NCCL's rules without deadlock (tests/test_nccl_rules.py checks it on real ranks too).

ZB-H1: one stage per rank; every rank holds at most p micro-batches, 1F1B's peak (that of its
first rank), and the backward chain runs through B's alone: the bubble shrinks from 1F1B's
(p-1)(F+B+W) to (p-1)(F+B-W) (the paper's ZB-H1; tests/test_zero_bubble.py checks the figure).
ZB-V: two stages per rank in V order, rank r holds stages r and 2p-1-r (rank 0 the embedding
and the loss), at most 2p half-size stages each: the same activation memory as 1F1B's first
rank, on every rank. The second half's warm-up overlaps the first's and the W's fill the rest.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

# (kind, chunk, micro): what pretrain/parallel/pipeline.py calls an Op.
RawOp = tuple[str, int, int]


def stage_owner(stage: int, *, pp: int, v_shape: bool) -> tuple[int, int]:
    """(pipeline rank, chunk on it) of a stage: stage s on rank s, or in V order rank r holding
    stages r (chunk 0) and 2p-1-r (chunk 1)."""
    if v_shape and stage >= pp:
        return 2 * pp - 1 - stage, 1
    return stage, 0


@dataclass
class _Rank:
    rank: int
    stages: list[int]  # this rank's stages, latest first (the priority order)
    limit: int
    order: deque | None = None  # a fixed F/B order (ZB-H1: 1F1B's), else rules 1 and 2 choose
    steps: list[tuple[RawOp, ...]] = field(default_factory=list)
    step: list[RawOp] = field(default_factory=list)  # receives and W's of the step being formed
    pending_w: deque = field(default_factory=deque)  # (stage, micro) whose B has run
    next_op: dict = field(default_factory=dict)  # (kind, stage) -> next micro-batch to run
    forwarded: dict = field(default_factory=dict)  # stage -> forwards finished
    inbox: set = field(default_factory=set)  # inputs here, received or handed over: (kind, stage, micro)
    held: int = 0  # micro-batches with the forward done and the W not yet
    peak: int = 0  # the most it held
    unmatched: int = 0  # sends of the last F/B whose receive is not posted yet
    committed: tuple | None = None  # (kind, stage, micro) this step will run
    running: tuple | None = None
    busy_until: int = 0
    finished: int = 0


class _Pipeline:
    """All ranks' state; `run` advances time until every operation has run."""

    def __init__(self, *, pp: int, micro_batches: int, v_shape: bool, forward_only: bool, orders=None) -> None:
        self.pp, self.micro, self.v_shape, self.forward_only = pp, micro_batches, v_shape, forward_only
        self.stages = 2 * pp if v_shape else pp
        self.kinds = "F" if forward_only else "BF"
        self.channels: dict[tuple[int, int], deque] = {}  # (sender, receiver) -> messages not yet read
        self.ranks = []
        for r in range(pp):
            held = sorted((s for s in range(self.stages) if self.owner(s)[0] == r), reverse=True)
            # In stages' worth of activations (module doc); evaluation keeps nothing.
            limit = len(held) * micro_batches if forward_only else len(held) * pp
            rank = _Rank(r, held, limit=limit, order=None if orders is None else deque(orders[r]))
            for s in held:
                rank.next_op[("F", s)] = rank.next_op[("B", s)] = rank.forwarded[s] = 0
            self.ranks.append(rank)

    def owner(self, stage: int) -> tuple[int, int]:
        return stage_owner(stage, pp=self.pp, v_shape=self.v_shape)

    def raw(self, kind: str, stage: int, micro: int) -> RawOp:
        return (kind, self.owner(stage)[1], micro)

    def _ready(self, rank: _Rank, kind: str, stage: int, micro: int) -> bool:
        if kind == "F" and stage == 0:
            return rank.held < rank.limit  # a new micro-batch: its data is always there
        if kind == "B" and stage == self.stages - 1:
            return rank.forwarded[stage] > micro  # the loss's backward follows its own forward
        return (kind, stage, micro) in rank.inbox and (kind == "B" or rank.held < rank.limit)

    def _read(self, rank: _Rank) -> None:
        """Receive every message sent to this rank so far, in each sender's order."""
        for (sender, receiver), channel in self.channels.items():
            while receiver == rank.rank and channel:
                kind, stage, micro = channel.popleft()
                rank.inbox.add((kind, stage, micro))
                rank.step.append(self.raw("R" + kind, stage, micro))
                self.ranks[sender].unmatched -= 1

    def _decide(self, rank: _Rank) -> None:
        """Rules 1 and 2 of the module doc, or the next F/B of a given order."""
        if rank.order is not None:
            choices = [rank.order[0]] if rank.order else []
        else:
            choices = [(k, s, rank.next_op[(k, s)]) for k in self.kinds for s in rank.stages]
        for kind, stage, micro in choices:
            if micro < self.micro and self._ready(rank, kind, stage, micro):
                rank.inbox.discard((kind, stage, micro))
                rank.next_op[(kind, stage)] += 1
                rank.committed = (kind, stage, micro)
                if rank.order is not None:
                    rank.order.popleft()
                return

    def _start(self, rank: _Rank, now: int) -> None:
        """Run the step's F or B once its sends are received, else a W (rule 3)."""
        if rank.committed is not None and rank.unmatched == 0:
            op, rank.committed = rank.committed, None
            rank.steps.append((*rank.step, self.raw(*op)))
            rank.step = []
            rank.held += op[0] == "F"
            rank.peak = max(rank.peak, rank.held)
        elif rank.pending_w:
            op = ("W", *rank.pending_w.popleft())
            rank.step.append(self.raw(*op))
        else:
            return
        rank.running, rank.busy_until = op, now + 1

    def _finish(self, rank: _Rank) -> None:
        """The operation ends: its output goes to the next (F) or previous (B) stage."""
        (kind, stage, micro), rank.running = rank.running, None
        rank.finished += 1
        if kind == "W" or (kind == "F" and self.forward_only):
            rank.held -= 1
        if kind == "W":
            return
        if kind == "F":
            rank.forwarded[stage] += 1
        else:
            rank.pending_w.append((stage, micro))
        target = stage + 1 if kind == "F" else stage - 1
        if not 0 <= target < self.stages:
            return
        receiver = self.owner(target)[0]
        if receiver == rank.rank:
            rank.inbox.add((kind, target, micro))
        else:
            self.channels.setdefault((rank.rank, receiver), deque()).append((kind, target, micro))
            rank.unmatched += 1

    def run(self) -> int:
        """Returns the time the last operation ends (the makespan, in unit operations)."""
        per_stage = 1 if self.forward_only else 3  # F, or F, B and W
        total = [len(rank.stages) * self.micro * per_stage for rank in self.ranks]
        now = 0
        while any(rank.finished < n for rank, n in zip(self.ranks, total)):
            for rank in self.ranks:
                if rank.running is not None and rank.busy_until == now:
                    self._finish(rank)
            # Between two F/B operations a rank has posted its step's transfers (a W runs
            # while they are in flight): it reads and decides then.
            between = [rank for rank in self.ranks if rank.running is None or rank.running[0] == "W"]
            for rank in between:
                self._read(rank)
            for rank in between:
                if rank.committed is None:
                    self._decide(rank)
            for rank in self.ranks:
                if rank.running is None:
                    self._start(rank, now)
            done = all(rank.finished == n for rank, n in zip(self.ranks, total))
            if not done and all(rank.running is None for rank in self.ranks):
                # Cannot happen under these rules (every message is read as soon as its receiver
                # is between operations); kept so that a change to them fails loudly.
                raise AssertionError(f"zero-bubble schedule stuck at time {now}: pp={self.pp} micro={self.micro}")
            now += 1
        for rank in self.ranks:
            if rank.step:
                rank.steps.append(tuple(rank.step))
        return now - 1


def _one_f_one_b_order(*, pp: int, pp_rank: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """1F1B's F/B order on one rank as (kind, stage, micro): p - r - 1 forwards, then one
    forward and one backward in turn, then the remaining backwards (pipeline.one_f_one_b)."""
    warmup = min(pp - pp_rank - 1, micro_batches)
    order = [("F", pp_rank, m) for m in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [("F", pp_rank, warmup + i), ("B", pp_rank, i)]
    return order + [("B", pp_rank, m) for m in range(micro_batches - warmup, micro_batches)]


@functools.cache
def simulate(*, pp: int, micro_batches: int, v_shape: bool, forward_only: bool = False) -> list[list[tuple]]:
    """Every rank's steps: tuples of (kind, chunk, micro), kinds "RF"/"RB" (receive the input
    of that F/B), "W" (run during the step's transfers), then at most one "F" or "B"."""
    pipeline = _pipeline(pp=pp, micro_batches=micro_batches, v_shape=v_shape, forward_only=forward_only)
    pipeline.run()
    return [rank.steps for rank in pipeline.ranks]


def _pipeline(*, pp: int, micro_batches: int, v_shape: bool, forward_only: bool) -> _Pipeline:
    orders = None
    if not v_shape and not forward_only:  # ZB-H1 keeps 1F1B's order of F's and B's
        orders = [_one_f_one_b_order(pp=pp, pp_rank=r, micro_batches=micro_batches) for r in range(pp)]
    return _Pipeline(pp=pp, micro_batches=micro_batches, v_shape=v_shape, forward_only=forward_only, orders=orders)


def figures(*, pp: int, micro_batches: int, v_shape: bool) -> dict:
    """The simulation's own figures, in unit operations (F = B = W = 1; ZB-V's are half-stage
    operations): `makespan`, each rank's `peak` held micro-batches (ZB-V: half-stage ones) and
    `work` per rank (3 x micro-batches x stages per rank)."""
    pipeline = _pipeline(pp=pp, micro_batches=micro_batches, v_shape=v_shape, forward_only=False)
    makespan = pipeline.run()
    work = 3 * micro_batches * (2 if v_shape else 1)
    return {"makespan": makespan, "peak": [rank.peak for rank in pipeline.ranks], "work": work}


def zb_h1(*, pp: int, pp_rank: int, micro_batches: int) -> list[tuple[RawOp, ...]]:
    """ZB-H1 steps of one rank (module doc)."""
    return simulate(pp=pp, micro_batches=micro_batches, v_shape=False)[pp_rank]


def zb_v(*, pp: int, pp_rank: int, micro_batches: int, forward_only: bool = False) -> list[tuple[RawOp, ...]]:
    """ZB-V steps of one rank (module doc); chunk 0 is stage pp_rank, chunk 1 stage 2p-1-pp_rank.
    `forward_only`: evaluation, the forwards alone through the same V."""
    return simulate(pp=pp, micro_batches=micro_batches, v_shape=True, forward_only=forward_only)[pp_rank]
