"""Zero-bubble pipeline schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024):
ZB-H1 and ZB-V, as op lists for the executor in pretrain/parallel/pipeline.py.

Each backward is split in two: B, the gradient of the stage's input (the previous stage waits
for it), and W, the gradients of the weights (nobody waits for them; pretrain/models/
weight_grads.py). The W's go where 1F1B would leave the rank idle.

The schedules are computed, not drawn: `simulate` runs the executor for all ranks at once with
the costs F : B : W = 4 : 4 : 3 (`COSTS`: a layer's input gradient costs about what its forward
does, attention's backward included, and its weight gradient is the weight half of the linears'
backward alone; measured on CPU here: 30 : 31 : 22 ms for a 4-layer stage) and records what each
rank does. The W's are placed where that simulation waits, so the assumed W matters: placed for
W = F, they overrun real, shorter waits and the bubble comes back (bench/RESULTS.md, "Zero-bubble
pipeline", has the sensitivity). Whenever a rank is free it starts, of the operations whose input
is there:

1. ZB-H1: the next F or B in 1F1B's order. ZB-V: an F of its later stage (the V's way back up to
   the loss), else a B (the later stage first: B's are the critical path), else an F of its first
   stage (new work);
2. an F only while the rank holds fewer micro-batches than its limit (held: forward done, W not
   yet; the saved activations, and the inputs and output gradients a W keeps, live until then);
3. else its oldest pending W, if it ends before the next F or B could start (as far as the
   simulation knows: what its neighbours are running), so W's fill waits without delaying the
   critical path.

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

ZB-H1: one stage per rank in 1F1B's order of F's and B's (so 1F1B's transfers); every rank holds
at most p micro-batches, 1F1B's peak (that of its first rank), and the backward chain runs
through B's alone: the bubble shrinks from 1F1B's (p-1)(F+B+W) to (p-1)(F+B-W) (the paper's
ZB-H1; tests/test_zero_bubble.py checks the figure at 2-8 stages).
ZB-V: two stages per rank in V order, rank r holds stages r and 2p-1-r (rank 0 the embedding
and the loss), at most 2p half-size stages each: the same activation memory as 1F1B's first
rank, on every rank. The second half's warm-up overlaps the first's and the W's fill the rest:
below ZB-H1's bubble at every size tested (2-8 stages, p to 4p micro-batches).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

# (kind, chunk, micro): what pretrain/parallel/pipeline.py calls an Op.
RawOp = tuple[str, int, int]
# The simulation's operation costs, in ticks (module doc).
COSTS = {"F": 4, "B": 4, "W": 3}


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

    def __init__(
        self, *, pp: int, micro_batches: int, v_shape: bool, forward_only: bool, orders=None, costs=None
    ) -> None:
        self.pp, self.micro, self.v_shape, self.forward_only = pp, micro_batches, v_shape, forward_only
        self.costs = costs or COSTS
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

    def _choices(self, rank: _Rank) -> list[tuple[str, int, int]]:
        """The operations the rank would run next, in order of preference: the next of a fixed
        order (ZB-H1: 1F1B's), else rules 1-3 of the module doc."""
        if rank.order is not None:
            return [rank.order[0]] if rank.order else []
        late, early = rank.stages[0], rank.stages[-1]
        preference = [("F", late), ("B", late), ("B", early), ("F", early)]
        return [(kind, stage, rank.next_op[(kind, stage)]) for kind, stage in preference if kind in self.kinds]

    def _decide(self, rank: _Rank) -> None:
        for kind, stage, micro in self._choices(rank):
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
        elif rank.pending_w and now + self.costs["W"] <= self._can_go_on(rank, now):
            op = ("W", *rank.pending_w.popleft())
            rank.step.append(self.raw(*op))
        else:
            return
        rank.running, rank.busy_until = op, now + self.costs[op[0]]

    def _can_go_on(self, rank: _Rank, now: int) -> float:
        """The earliest the rank's next F or B could start, as far as the simulation can tell: a
        W that would overrun it delays the critical path instead of filling a wait (rule 4)."""
        if rank.committed is not None:
            if rank.order is None:
                return float("inf")
            # its sends are read once their receivers are between two F/B operations
            receivers = [self.ranks[r] for (s, r), channel in self.channels.items() if s == rank.rank and channel]
            return max([now] + [r.busy_until for r in receivers if r.running is not None and r.running[0] != "W"])
        return min([self._input_at(rank, *op, now) for op in self._choices(rank)], default=float("inf"))

    def _input_at(self, rank: _Rank, kind: str, stage: int, micro: int, now: int) -> float:
        """The earliest op's input can be here (inf: unknown, or the memory limit holds it)."""
        if micro >= self.micro or (kind, stage, micro) in rank.inbox:
            return float("inf")  # no such op; or its input is here and the limit holds it: W's make room
        if self._ready(rank, kind, stage, micro):
            return now
        source = stage - 1 if kind == "F" else stage + 1
        if not 0 <= source < self.stages or self.owner(source)[0] == rank.rank:
            return float("inf")
        producer = self.ranks[self.owner(source)[0]]
        if producer.running == (kind, source, micro):
            return producer.busy_until
        return now + self.costs[kind]  # not started yet: at least its own duration away

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
        """Returns the time the last operation ends (the makespan, in COSTS' ticks)."""
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
                # Not seen with these rules (2-12 stages x 1-64 micro-batches tried); fails loudly
                # if a change to them leaves a rank waiting for good (say, at its memory limit
                # with no W left to run).
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
    """The simulation's own figures, in COSTS' ticks (ZB-V's operations are half-stage ones):
    `makespan`, each rank's `peak` held micro-batches (ZB-V: half-stage ones) and `work` per
    rank (micro-batches x stages per rank x (F + B + W))."""
    pipeline = _pipeline(pp=pp, micro_batches=micro_batches, v_shape=v_shape, forward_only=False)
    makespan = pipeline.run()
    work = sum(COSTS.values()) * micro_batches * (2 if v_shape else 1)
    return {"makespan": makespan, "peak": [rank.peak for rank in pipeline.ranks], "work": work}


def zb_h1(*, pp: int, pp_rank: int, micro_batches: int) -> list[tuple[RawOp, ...]]:
    """ZB-H1 steps of one rank (module doc)."""
    return simulate(pp=pp, micro_batches=micro_batches, v_shape=False)[pp_rank]


def zb_v(*, pp: int, pp_rank: int, micro_batches: int, forward_only: bool = False) -> list[tuple[RawOp, ...]]:
    """ZB-V steps of one rank (module doc); chunk 0 is stage pp_rank, chunk 1 stage 2p-1-pp_rank.
    `forward_only`: evaluation, the forwards alone through the same V."""
    return simulate(pp=pp, micro_batches=micro_batches, v_shape=True, forward_only=forward_only)[pp_rank]
