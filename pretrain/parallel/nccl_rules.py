"""NCCL's rules, as a model that CPU runs can be checked against.

gloo forgives what NCCL does not. A gloo send never waits for its receiver, and tags route
messages; NCCL (documented behaviour, ../shared/reference/FACTS.md) runs every send and receive
between two ranks on one stream in the order they were issued, ignores tags, and completes a
send only when the peer's matching receive runs. Two ranks that each post a send ahead of the
receive the other needs deadlock on NCCL and pass on gloo. Collectives must be issued by every
rank of a group in the same order with the same shapes.

So code is checked in two steps, on real gloo ranks:

1. `CommRecorder` records, in issue order, what this process really asks torch.distributed to
   do: every point-to-point operation (alone or in a `batch_isend_irecv` group), every
   collective, every wait on a request, and every `new_group`. Nested calls (a collective that
   torch builds from others) count once, at the outermost call; only the thread that started
   the recorder is recorded (the checkpoint writer's background thread talks over a gloo group
   of its own, which NCCL never carries).
2. `check_nccl_rules(traces)` replays every rank's trace together under NCCL's rules:
   - per pair of ranks one ordered stream, both directions, tags ignored: the k-th send from A
     to B meets the k-th receive on B from A, and must have the same size and dtype;
   - an operation (or a batched group, which progresses as one) starts only when everything
     issued before it on each of its streams has completed; a send completes only when its
     matching receive has started, and the other way round; nothing is buffered (stricter than
     NCCL's few-MB buffers, which 10 MB activations exceed anyway);
   - per process group one ordered stream of collectives: the k-th collective of a group is the
     same operation, dtype and size on every member;
   - a rank's host stops at a wait (a blocking call is a post and a wait) until the request has
     completed; posting never blocks;
   - every rank creates the same groups in the same order.
   It raises `NcclRuleViolation` with what each stuck rank waits for, or returns a summary.

The model is stricter than NCCL (no buffering, the host blocks at waits), so code that passes
it also runs there; the reverse is what the tests use it for.
"""

from __future__ import annotations

import collections
import functools
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@dataclass(frozen=True)
class Op:
    """One transfer of a posted unit. Point-to-point: kind "send"/"recv" with the global peer.
    Collective: kind "collective" with its name, reduce op and group."""

    kind: str
    nbytes: int
    dtype: str
    peer: int = -1
    name: str = ""
    group: str = ""  # the process group's name (equal on every rank that created it in order)
    ranks: tuple[int, ...] = ()  # global ranks of that group
    reduce: str = ""


@dataclass
class Event:
    """One thing a rank did: post a unit of ops, wait for one, create a group, or a marker."""

    kind: str  # "post" | "wait" | "new_group" | "mark"
    unit: int = -1
    ops: tuple[Op, ...] = ()
    label: str = ""
    ranks: tuple[int, ...] = ()  # new_group
    seconds: float = 0.0  # wall time inside the call (post) or the wait; benches sum it

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Event:
        ops = tuple(Op(**{**o, "ranks": tuple(o["ranks"])}) for o in d["ops"])
        return Event(
            kind=d["kind"],
            unit=d["unit"],
            ops=ops,
            label=d["label"],
            ranks=tuple(d["ranks"]),
            seconds=d.get("seconds", 0.0),
        )


class NcclRuleViolation(AssertionError):
    """What NCCL would do differently from gloo: a deadlock, or mismatched operations."""


# -- recording ------------------------------------------------------------------------------------

_P2P = ("isend", "irecv", "send", "recv", "batch_isend_irecv")
# Collectives whose arguments are (output(s), input(s)): what a rank contributes comes second.
_OUTPUT_FIRST = (
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
)
_COLLECTIVES = (
    "all_reduce",
    *_OUTPUT_FIRST,
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "all_reduce_coalesced",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
)


def _group_of(group) -> dist.ProcessGroup | None:
    return group if group is not None else c10d._get_default_group()


def _group_key(group) -> tuple[str, tuple[int, ...]]:
    pg = _group_of(group)
    return pg.group_name, tuple(dist.get_process_group_ranks(pg))


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _bytes_and_dtype(tensors: list[torch.Tensor]) -> tuple[int, str]:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return nbytes, str(tensors[0].dtype).replace("torch.", "") if tensors else ""


class _Request:
    """A torch.distributed request whose wait() is recorded against the unit it belongs to."""

    def __init__(self, work, recorder: CommRecorder, unit: int) -> None:
        self._work, self._recorder, self._unit = work, recorder, unit

    def wait(self, *args, **kwargs):
        event = Event("wait", unit=self._unit)
        self._recorder._record(event)
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs) if self._work is not None else True
        finally:
            event.seconds = time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommRecorder:
    """Record this process's communication while the context is open (see the module doc).

    `events` is the trace; `mark(label)` inserts a marker (benches use them to tell phases of a
    step apart). Nothing about the calls changes: they run on the real backend as before."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.rank = -1
        self._units = 0
        self._local = threading.local()
        self._thread: int | None = None
        self._saved: list[tuple[object, str, object]] = []

    # -- context --------------------------------------------------------------------------------

    def __enter__(self) -> CommRecorder:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._thread = threading.get_ident()
        for name in _P2P + _COLLECTIVES + ("new_group",):
            original = getattr(c10d, name, None)
            if original is None:
                continue
            wrapper = self._wrap(name, original)
            for module in (dist, c10d):  # torch calls its own functions through c10d's globals
                if hasattr(module, name):
                    self._saved.append((module, name, getattr(module, name)))
                    setattr(module, name, wrapper)
        self._patch_deepspeed()
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _patch_deepspeed(self) -> None:
        """DeepSpeed's comm backend keeps the all-gather / reduce-scatter functions it picked at
        start; record those too."""
        import sys

        comm = sys.modules.get("deepspeed.comm.comm")
        backend = getattr(comm, "cdb", None) if comm is not None else None
        for attr in ("all_gather_function", "reduce_scatter_function"):
            original = getattr(backend, attr, None)
            if original is not None and hasattr(original, "__name__"):
                self._saved.append((backend, attr, original))
                setattr(backend, attr, self._wrap(original.__name__, original))

    def mark(self, label: str) -> None:
        self.events.append(Event("mark", label=label))

    def clear(self) -> None:
        """Forget what was recorded so far (benches: one step at a time). Requests still in flight
        record their waits as usual."""
        self.events.clear()

    # -- wrappers -------------------------------------------------------------------------------

    def _record(self, event: Event) -> None:
        if threading.get_ident() == self._thread:
            self.events.append(event)

    def _new_unit(self) -> int:
        self._units += 1
        return self._units

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            local = self._local
            if getattr(local, "depth", 0) or threading.get_ident() != self._thread:
                return original(*args, **kwargs)  # inside another recorded call, or another thread
            local.depth = 1
            try:
                return self._call(name, original, args, kwargs)
            finally:
                local.depth = 0

        wrapper.__pretrain_recorded__ = original
        return wrapper

    def _call(self, name: str, original, args, kwargs):
        if name == "new_group":
            group = original(*args, **kwargs)
            ranks = kwargs.get("ranks", args[0] if args else None)
            self._record(Event("new_group", ranks=tuple(sorted(ranks)) if ranks else ()))
            return group
        if name == "batch_isend_irecv":
            ops = tuple(self._p2p_op("send" if p.op.__name__ == "isend" else "recv", p.tensor, p.peer) for p in args[0])
        elif name in ("isend", "irecv", "send", "recv"):
            ops = (self._p2p_op("send" if name in ("isend", "send") else "recv", *_p2p_args(name, args, kwargs)),)
        else:
            ops = (self._collective_op(name, args, kwargs),)
        post = Event("post", unit=self._new_unit(), ops=ops)
        self._record(post)
        start = time.perf_counter()
        try:
            result = original(*args, **kwargs)
        finally:
            post.seconds = time.perf_counter() - start
        if name == "batch_isend_irecv":
            return [_Request(w, self, post.unit) for w in result]
        if name in ("isend", "irecv") or (kwargs.get("async_op") and result is not None):
            return _Request(result, self, post.unit)
        self._record(Event("wait", unit=post.unit))  # a blocking call: posted and waited for at once
        return result

    @staticmethod
    def _p2p_op(kind: str, tensor: torch.Tensor, peer: int | None) -> Op:
        if peer is None:
            raise NcclRuleViolation("a receive from any source: NCCL has none; name the peer")
        nbytes, dtype = _bytes_and_dtype([tensor])
        return Op(kind=kind, nbytes=nbytes, dtype=dtype, peer=int(peer))

    @staticmethod
    def _collective_op(name: str, args, kwargs) -> Op:
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        key, ranks = _group_key(group)
        # The data each rank contributes: the input tensor(s), after the outputs where a
        # function takes both (all_gather(outputs, input), reduce_scatter(output, inputs)).
        tensors = [t for a in list(args) + list(kwargs.values()) for t in _tensors(a)]
        if name in _OUTPUT_FIRST:
            tensors = tensors[1:] if len(tensors) > 1 else tensors
            if name == "all_gather":
                tensors = tensors[-1:]
        nbytes, dtype = _bytes_and_dtype(tensors)
        if name in ("all_to_all", "all_to_all_single"):
            nbytes = -1  # uneven splits are legal: only the order and dtype must agree
        reduce = kwargs.get("op", next((a for a in args if isinstance(a, dist.ReduceOp.RedOpType)), None))
        return Op(
            kind="collective",
            name=name.lstrip("_"),
            nbytes=nbytes,
            dtype=dtype,
            group=key,
            ranks=ranks,
            reduce="" if reduce is None else str(reduce).rsplit(".", 1)[-1],
        )


def _p2p_args(name: str, args, kwargs) -> tuple[torch.Tensor, int | None]:
    tensor = kwargs.get("tensor", args[0] if args else None)
    key = "dst" if name in ("isend", "send") else "src"
    peer = kwargs.get(key, args[1] if len(args) > 1 else None)
    group, group_peer = kwargs.get("group"), kwargs.get(f"group_{key}")
    if peer is None and group_peer is not None:
        peer = dist.get_global_rank(_group_of(group), group_peer)
    return tensor, peer


# -- checking -------------------------------------------------------------------------------------


@dataclass
class _Unit:
    rank: int
    unit: int
    ops: tuple[Op, ...]
    streams: list[tuple] = field(default_factory=list)
    partners: list[tuple] = field(default_factory=list)  # per op: the partner op's (rank, unit)
    done: bool = False


def _stream(rank: int, op: Op) -> tuple:
    if op.kind == "collective":
        return ("group", rank, op.group)
    return ("pair", rank, min(rank, op.peer), max(rank, op.peer))


def _describe(op: Op) -> str:
    if op.kind == "collective":
        return f"{op.name}({op.dtype}, {op.nbytes} B) on group {op.group} {list(op.ranks)}"
    arrow = "->" if op.kind == "send" else "<-"
    return f"{op.kind} {arrow} rank {op.peer} ({op.dtype}, {op.nbytes} B)"


def _match(traces: dict[int, list[Event]]) -> dict[tuple[int, int], _Unit]:
    """Every posted unit, each op linked to its partner under NCCL's in-order matching; raises
    on sizes, dtypes or collective sequences that differ between partners."""
    units: dict[tuple[int, int], _Unit] = {}
    sends: dict[tuple[int, int], list] = collections.defaultdict(list)  # (src, dst) -> [(unit, index)]
    recvs: dict[tuple[int, int], list] = collections.defaultdict(list)
    colls: dict[tuple[str, int], list] = collections.defaultdict(list)  # (group, rank) -> [(unit, index)]
    for rank, events in traces.items():
        for e in events:
            if e.kind != "post":
                continue
            u = units[(rank, e.unit)] = _Unit(rank, e.unit, e.ops, partners=[None] * len(e.ops))
            u.streams = sorted({_stream(rank, op) for op in e.ops})
            for i, op in enumerate(e.ops):
                if op.kind == "send":
                    sends[(rank, op.peer)].append((u, i))
                elif op.kind == "recv":
                    recvs[(op.peer, rank)].append((u, i))
                else:
                    colls[(op.group, rank)].append((u, i))
    for pair in set(sends) | set(recvs):
        for k, (s, r) in enumerate(zip(sends[pair], recvs[pair])):
            (su, si), (ru, ri) = s, r
            a, b = su.ops[si], ru.ops[ri]
            if (a.nbytes, a.dtype) != (b.nbytes, b.dtype):
                raise NcclRuleViolation(
                    f"send #{k + 1} from rank {pair[0]} to rank {pair[1]} ({a.dtype}, "
                    f"{a.nbytes} B) meets a receive of {b.dtype}, {b.nbytes} B: NCCL matches "
                    "in order and ignores tags"
                )
            su.partners[si], ru.partners[ri] = ((ru.rank, ru.unit),), ((su.rank, su.unit),)
    groups: dict[str, tuple[int, ...]] = {}
    for (group, _), entries in colls.items():
        groups[group] = entries[0][0].ops[entries[0][1]].ranks
    for group, ranks in groups.items():
        sequences = {r: colls.get((group, r), []) for r in ranks if r in traces}
        length = max(len(s) for s in sequences.values())
        for k in range(length):
            calls = {r: s[k] for r, s in sequences.items() if k < len(s)}
            shapes = {(u.ops[i].name, u.ops[i].dtype, u.ops[i].nbytes, u.ops[i].reduce) for u, i in calls.values()}
            if len(shapes) > 1:
                seen = "; ".join(f"rank {r}: {_describe(u.ops[i])}" for r, (u, i) in sorted(calls.items()))
                raise NcclRuleViolation(
                    f"collective #{k + 1} on group {group} {list(ranks)} differs between "
                    f"ranks ({seen}): every rank must issue the same collectives in order"
                )
            members = tuple((u.rank, u.unit) for u, _ in calls.values())
            for u, i in calls.values():
                u.partners[i] = members if len(calls) == len(sequences) else None
    return units


def check_nccl_rules(traces: dict[int, list[Event]]) -> dict:
    """Replay every rank's trace under NCCL's rules (see the module doc). Returns counts of
    what ran; raises NcclRuleViolation on a deadlock, a mismatch, or a transfer never matched."""
    _check_groups(traces)
    units = _match(traces)
    queues: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    pos = {r: 0 for r in traces}
    posted: set[tuple[int, int]] = set()

    def head_of_all(u: _Unit) -> bool:
        return all(queues[s] and queues[s][0] is u for s in u.streams)

    def active(key: tuple[int, int]) -> bool:
        return key in posted and not units[key].done and head_of_all(units[key])

    while True:
        moved = False
        for rank, events in traces.items():  # hosts run until a wait on something unfinished
            while pos[rank] < len(events):
                e = events[pos[rank]]
                if e.kind == "post":
                    u = units[(rank, e.unit)]
                    posted.add((rank, e.unit))
                    for s in u.streams:
                        queues[s].append(u)
                elif e.kind == "wait" and not units[(rank, e.unit)].done:
                    break
                pos[rank] += 1
                moved = True
        heads = {id(q[0]): q[0] for q in queues.values() if q}.values()  # only a head can start
        ready = [
            u
            for u in heads
            if active((u.rank, u.unit))
            and all(
                # A partner that already completed was running when this op matched it.
                p is not None and all(q == (u.rank, u.unit) or units[q].done or active(q) for q in p)
                for p in u.partners
            )
        ]
        for u in ready:
            u.done = True
            for s in u.streams:
                queues[s].popleft()
        if ready:
            moved = True
        if all(pos[r] == len(traces[r]) for r in traces) and all(u.done for u in units.values()):
            break
        if not moved:
            raise NcclRuleViolation(_stuck(traces, pos, units, posted, active))
    return {
        "units": len(units),
        "p2p": sum(op.kind != "collective" for u in units.values() for op in u.ops) // 2,
        "collectives": sum(op.kind == "collective" for u in units.values() for op in u.ops),
    }


def _check_groups(traces: dict[int, list[Event]]) -> None:
    created = {r: [e.ranks for e in events if e.kind == "new_group"] for r, events in traces.items()}
    first = next(iter(created.values()), [])
    for rank, groups in created.items():
        if groups != first:
            raise NcclRuleViolation(
                f"rank {rank} creates process groups {groups[:6]}... in another order than "
                f"rank {next(iter(created))} ({first[:6]}...): every rank must call new_group "
                "for every group, in the same order"
            )


def _stuck(traces, pos, units, posted, active) -> str:
    lines = [
        "deadlock under NCCL's rules (sends complete only when the matching receive runs; "
        "per rank pair one ordered stream):"
    ]
    for rank, events in traces.items():
        if pos[rank] < len(events):
            e = events[pos[rank]]
            u = units[(rank, e.unit)]
            state = "started" if active((rank, e.unit)) else "queued behind earlier operations"
            lines.append(f"  rank {rank} waits for [{'; '.join(_describe(op) for op in u.ops)}] ({state})")
    pending = [u for key, u in units.items() if key in posted and not u.done]
    if pending and len(lines) == 1:
        lines.append("  never matched: " + "; ".join(f"rank {u.rank}: {_describe(u.ops[0])}" for u in pending[:4]))
    return "\n".join(lines)


# -- traces across processes ------------------------------------------------------------------------


def dump_trace(events: Iterable[Event]) -> str:
    return json.dumps([e.to_dict() for e in events])


def load_trace(text: str) -> list[Event]:
    return [Event.from_dict(d) for d in json.loads(text)]
