"""Pipeline parallelism: point-to-point transfers, the 1F1B schedules and the executor of every
schedule (which stage holds which layers, and building this rank's chunks:
pretrain/parallel/model_chunks.py; the zero-bubble schedules: pretrain/parallel/zero_bubble.py).

A schedule is a plain list of operations for this rank, computed up front; `forward_backward`
executes it. `Op(kind, chunk, micro_batch)`: "F" forward, "B" backward, and under a zero-bubble
schedule "B" computes the input gradient only, "W" the deferred weight gradients of an earlier B
(pretrain/models/weight_grads.py), and "RF"/"RB" receive the input of a later F/B ahead of it.
Transfers follow NCCL's rules, not gloo's kinder ones (see `PipeLink` and
pretrain/parallel/nccl_rules.py): before each step the sends of the previous one and the
receives of this one go out as one batched group, the step's W's run while it is in flight, and
no message carries a tag, because NCCL matches the k-th send between two ranks with the k-th
receive whatever its tag. Every schedule here is checked against those rules on real ranks
(tests/test_nccl_rules.py).

Virtual stages (interleaving): rank r holds chunks c = 0..V-1, chunk c being virtual stage
c * P + r (model_chunks.stage_layout). Activations leave rank P-1's chunk c for rank 0's chunk c+1.
In V order (zb-v) chunk 1 of rank r is stage 2P-1-r: activations of chunk 1 flow from rank r+1
to rank r, and rank P-1 hands its chunk 0's output to its own chunk 1 without a transfer.

Without pipeline parallelism, `forward_backward` is a plain gradient-accumulation loop: the
single-device path pays nothing for the pipeline machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from pretrain.parallel import zero_bubble
from pretrain.parallel.model_chunks import stage_index
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


class Op(NamedTuple):
    kind: str  # "F", "B", "W", "RF" or "RB" (module doc)
    chunk: int
    micro: int


# A schedule is a list of steps; a step is the operations a rank runs back to back between two
# exchanges with its neighbours (see PipeLink). Which operations share a step is part of the
# schedule, as in Megatron: 1F1B exchanges around every operation; interleaved 1F1B pairs each
# steady-state forward with an independent backward, so one exchange carries both outputs and
# both next inputs, and the two directions between a pair of ranks never cross.
Step = tuple[Op, ...]


def one_f_one_b(*, pp: int, pp_rank: int, micro_batches: int) -> list[Step]:
    """PipeDream-flush 1F1B: warm up with forwards, alternate one forward / one backward, drain."""
    warmup = min(pp - pp_rank - 1, micro_batches)
    ops = [Op("F", 0, m) for m in range(warmup)]
    for i in range(micro_batches - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    ops += [Op("B", 0, m) for m in range(micro_batches - warmup, micro_batches)]
    return [(op,) for op in ops]


def interleaved_one_f_one_b(*, pp: int, pp_rank: int, vp: int, micro_batches: int) -> list[Step]:
    """Megatron's interleaved 1F1B: micro-batches go through the chunks in groups of P, which
    shrinks the pipeline bubble by V. Needs micro_batches % pp == 0. The warm-up is long enough
    that each steady-state backward is independent of the forward it is paired with."""
    assert micro_batches % pp == 0, (micro_batches, pp)
    total = micro_batches * vp

    def forward(k: int) -> Op:
        return Op("F", (k // pp) % vp, (k // (pp * vp)) * pp + k % pp)

    def backward(k: int) -> Op:
        return Op("B", vp - 1 - (k // pp) % vp, (k // (pp * vp)) * pp + k % pp)

    warmup = min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, total)
    steps: list[Step] = [(forward(k),) for k in range(warmup)]
    steps += [(forward(warmup + i), backward(i)) for i in range(total - warmup)]
    steps += [(backward(k),) for k in range(total - warmup, total)]
    return steps


def make_schedule(topo: Topology, micro_batches: int, *, forward_only: bool = False) -> list[Step]:
    """This rank's steps under topo.pipeline_schedule (None: 1F1B, or interleaved when
    virtual_stages > 1)."""
    where = {"pp": topo.pp, "pp_rank": topo.pp_rank, "micro_batches": micro_batches}
    if topo.v_shape:  # evaluation too: the forwards go down and back up the V
        return _ops(zero_bubble.zb_v(**where, forward_only=forward_only))
    if forward_only:  # evaluation: each micro-batch through this rank's chunks in stage order
        return [(Op("F", c, m),) for m in range(micro_batches) for c in range(topo.virtual_stages)]
    if topo.pipeline_schedule == "zb-h1":
        return _ops(zero_bubble.zb_h1(**where))
    if topo.virtual_stages > 1:
        return interleaved_one_f_one_b(**where, vp=topo.virtual_stages)
    return one_f_one_b(**where)


def _ops(steps: list[tuple]) -> list[Step]:
    return [tuple(Op(*op) for op in step) for step in steps]


def flatten(steps: list[Step]) -> list[Op]:
    return [op for step in steps for op in step]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device. On a GPU from pinned memory without blocking the host: the copy
    runs on the copy engine while the host goes on queueing kernels."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _segments(batch: dict, device: torch.device):
    segments = batch.get("segments")
    return None if segments is None else _to_device(segments, device)


class PipeLink:
    """This rank's point-to-point traffic with its pipeline neighbours, in NCCL-safe batches.

    NCCL runs all transfers between two ranks on one stream in issue order and completes a
    send only when the peer's receive runs, so a lone send posted ahead of a receive that the
    neighbour's own send waits behind deadlocks (gloo would run it). As Megatron's
    send_forward_recv_backward family does, the sends that one step of the schedule produced go
    out in one `batch_isend_irecv` group with the receives the next step needs, and the group is
    waited for before that step's F or B starts (tests/test_nccl_rules.py checks every schedule
    against these rules with pretrain/parallel/nccl_rules.py). Activations and gradients travel
    in the compute dtype (bf16 halves the bytes of fp32), and are turned back into the stage's
    own dtype on arrival.
    """

    def __init__(self, topo: Topology, *, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        self.topo, self.shape, self.dtype = topo, shape, dtype
        self.sends: list[dist.P2POp] = []

    def wire(self, x: torch.Tensor) -> torch.Tensor:
        """x as it travels: detached, in the compute dtype."""
        return x.detach().to(self.dtype).contiguous()

    def send(self, x: torch.Tensor, *, to: int) -> None:
        """Queue x for the pipeline rank `to` away (+1 or -1)."""
        self.sends.append(dist.P2POp(dist.isend, self.wire(x), self.topo.pp_peer(to)))

    def post(self, sources: list[int] = ()) -> Callable[[], list[torch.Tensor]]:
        """Post the queued sends together with one receive from each of `sources` (pipeline rank
        offsets, in order) as one group; returns the wait, which gives what was received."""
        buffers = [torch.empty(self.shape, dtype=self.dtype, device=self.topo.device) for _ in sources]
        ops = self.sends + [
            dist.P2POp(dist.irecv, buffer, self.topo.pp_peer(source)) for buffer, source in zip(buffers, sources)
        ]
        self.sends = []
        works = dist.batch_isend_irecv(ops) if ops else []

        def wait() -> list[torch.Tensor]:
            if works:
                with waiting():
                    for work in works:
                        work.wait()
            return buffers

        return wait

    def exchange(self, sources: list[int] = ()) -> list[torch.Tensor]:
        """post(sources), waited for at once."""
        return self.post(sources)()


def chunk_neighbours(topo: Topology) -> list[tuple[int | None, int | None]]:
    """Per chunk of this rank: where its input comes from and where its output goes, as
    pipeline rank offsets (+1, -1; 0: a chunk of this very rank, in V order) or None (the
    model's first or last stage: no neighbour)."""
    stages = topo.pp * topo.virtual_stages

    def offset(stage: int) -> int | None:
        if not 0 <= stage < stages:
            return None
        rank = zero_bubble.stage_owner(stage, pp=topo.pp, v_shape=True)[0] if topo.v_shape else stage % topo.pp
        if rank == topo.pp_rank:
            return 0
        return 1 if rank == (topo.pp_rank + 1) % topo.pp else -1

    neighbours = []
    for chunk in range(topo.virtual_stages):
        v = stage_index(pp=topo.pp, pp_rank=topo.pp_rank, chunk=chunk, v_shape=topo.v_shape)
        neighbours.append((offset(v - 1), offset(v + 1)))
    return neighbours


def forward_backward(
    *,
    chunks: list,
    topo: Topology,
    batches: Iterator[dict],
    micro_batches: int,
    autocast: Callable,
    hidden_shape: tuple[int, int, int],
    hidden_dtype: torch.dtype = torch.float32,
    on_last_backward: Callable[[int], None] = lambda chunk: None,
    forward_only: bool = False,
    progress: Callable[[str], None] = lambda operation: None,
) -> list[torch.Tensor]:
    """Run forward and backward over `micro_batches` micro-batches; gradients accumulate as the
    mean over them. Returns the detached micro-batch losses (on the last stage; [] elsewhere).

    `on_last_backward(chunk)` is called right before the chunk's last operation that adds to its
    gradients (its final B, or under a zero-bubble schedule its final W), so data-parallel
    gradient reduction can overlap it. `hidden_shape` is the activation shape a stage receives,
    `hidden_dtype` the dtype activations and their gradients travel in (the compute dtype).
    `forward_only` (evaluation) runs the forwards alone; call it under torch.no_grad().
    `progress(operation)` is called as each operation starts ("data", "F chunk 0 micro 3"), so a
    hang watchdog can tell that the rank advances and where it stopped.
    """
    if topo.pp == 1:
        return _single_stage(
            chunks[0],
            topo.device,
            batches,
            micro_batches,
            autocast=autocast,
            on_last_backward=on_last_backward,
            forward_only=forward_only,
            progress=progress,
        )
    # Only the first and the last virtual stages read data; every rank advances the loader
    # the same way so that data positions stay equal across the pipeline.
    progress("data")
    micro_data = [next(batches) for _ in range(micro_batches)]
    run = _StageRunner(
        chunks,
        micro_data,
        link=PipeLink(topo, shape=hidden_shape, dtype=hidden_dtype),
        neighbours=chunk_neighbours(topo),
        stages=[
            stage_index(pp=topo.pp, pp_rank=topo.pp_rank, chunk=c, v_shape=topo.v_shape)
            for c in range(topo.virtual_stages)
        ],
        autocast=autocast,
        device=topo.device,
        forward_only=forward_only,
    )
    _execute(make_schedule(topo, micro_batches, forward_only=forward_only), run, on_last_backward, progress)
    return run.losses


def _single_stage(
    chunk, device, batches, micro_batches, *, autocast, on_last_backward, forward_only, progress
) -> list[torch.Tensor]:
    """No pipeline: each micro-batch's forward and backward back to back, nothing to exchange."""
    losses = []
    for m in range(micro_batches):
        progress(f"data micro {m}")
        batch = next(batches)
        if m == micro_batches - 1:
            on_last_backward(0)
        progress(f"F micro {m}" if forward_only else f"F+B micro {m}")
        with autocast():
            loss = chunk(
                _to_device(batch["tokens"], device),
                labels=_to_device(batch["labels"], device),
                segments=_segments(batch, device),
            )
        if not forward_only:
            (loss / micro_batches).backward()
        losses.append(loss.detach())
    return losses


def _execute(steps: list[Step], run: _StageRunner, on_last_backward, progress) -> None:
    """Run a schedule's steps in order: post the step's transfers, run its W's while they are in
    flight, wait, run its F's and B's."""
    accumulates = "W" if run.store is not None else "B"  # where gradients are added to .grad
    final = {op.chunk: op for op in flatten(steps) if op.kind == accumulates}  # each chunk's last
    for step in steps:
        progress("exchange before " + ", ".join(f"{op.kind} chunk {op.chunk} micro {op.micro}" for op in step))
        wait = run.post(step)
        for op in step:
            if op.kind == "W":
                progress(f"W chunk {op.chunk} micro {op.micro}")
                if final.get(op.chunk) == op:
                    on_last_backward(op.chunk)
                run.weights(op)
        run.receive(wait)
        for op in step:
            if op.kind not in ("F", "B"):
                continue
            progress(f"{op.kind} chunk {op.chunk} micro {op.micro}")
            if op.kind == "F":
                run.forward(op)
            else:
                if final.get(op.chunk) == op:
                    on_last_backward(op.chunk)
                run.backward(op)
    progress("exchange of the last sends")
    run.link.exchange()  # the last step's sends
    assert run.store is None or run.store.pending() == 0, "a B's weight gradients were never run"


class _StageRunner:
    """Runs one rank's operations, keeping what a backward needs from its forward (the stage
    input and output) until then, and the inputs that arrived before their operation (inbox:
    ("F" | "B", chunk, micro) -> activation or gradient)."""

    def __init__(
        self,
        chunks: list,
        micro_data: list[dict],
        *,
        link: PipeLink,
        neighbours: list[tuple[int | None, int | None]],
        stages: list[int],
        autocast: Callable,
        device: torch.device,
        forward_only: bool,
    ) -> None:
        self.chunks, self.micro_data, self.link = chunks, micro_data, link
        self.neighbours, self.stages = neighbours, stages  # per chunk (chunk_neighbours, its stage)
        self.autocast, self.device, self.forward_only = autocast, device, forward_only
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.inbox: dict[tuple[str, int, int], torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []
        # The zero-bubble schedules' store of deferred weight gradients (model_chunks.py).
        self.store = None if forward_only else getattr(chunks[0].layers, "weight_grads", None)

    def _source(self, key: tuple[str, int, int]) -> int | None:
        """The pipeline rank offset an input comes from (0: this rank, None: no neighbour)."""
        kind, chunk, _ = key
        previous, following = self.neighbours[chunk]
        return previous if kind == "F" else following

    def post(self, step: Step) -> tuple[list, Callable]:
        """Post the previous step's sends and this step's receives: the inputs its R ops name,
        in their order, then those of its F's and B's not here yet."""
        keys = [(op.kind[1], op.chunk, op.micro) for op in step if op.kind in ("RF", "RB")]
        for op in step:
            key = (op.kind, op.chunk, op.micro)
            if op.kind in ("F", "B") and key not in keys and key not in self.inbox and self._source(key):
                keys.append(key)
        return keys, self.link.post([self._source(key) for key in keys])

    def receive(self, posted: tuple[list, Callable]) -> None:
        keys, wait = posted
        self.inbox.update(zip(keys, wait()))

    def _hand_on(self, x: torch.Tensor, *, to: int | None, kind: str, chunk: int, micro: int) -> None:
        """Send the output of op (kind, chunk, micro) to the neighbour `to` away, or (to == 0:
        the turn of the V) put it in this rank's inbox as it would have arrived."""
        if to == 0:
            target = self.stages.index(self.stages[chunk] + (1 if kind == "F" else -1))
            self.inbox[(kind, target, micro)] = self.link.wire(x).clone()
        elif to is not None:
            self.link.send(x, to=to)

    def forward(self, op: Op) -> None:
        """One forward of one chunk; hands its output on to the next stage."""
        chunk, data = self.chunks[op.chunk], self.micro_data[op.micro]
        x_in = None
        with self.autocast():
            if chunk.stage.first:
                x = chunk.embed_tokens(_to_device(data["tokens"], self.device))
            else:
                x_in = self.inbox.pop(("F", op.chunk, op.micro)).requires_grad_(not self.forward_only)
                # Back to the stage's own dtype (fp32 weights keep an fp32 residual stream).
                x = x_in.to(next(chunk.parameters()).dtype)
            # Every stage reads the micro-batch's document numbers: attention masks them.
            x = chunk.run_blocks(x, _segments(data, self.device))
            if chunk.stage.last:
                loss = chunk.head_loss(x, _to_device(data["labels"], self.device))
                self.losses.append(loss.detach())
                x = loss / len(self.micro_data)
        if not chunk.stage.last:
            self._hand_on(x, to=self.neighbours[op.chunk][1], kind="F", chunk=op.chunk, micro=op.micro)
        if not self.forward_only:
            self.saved[(op.chunk, op.micro)] = (x_in, x)

    def backward(self, op: Op) -> None:
        """One backward of one chunk (under a zero-bubble schedule: the input gradient; the
        weight gradients wait in the store for this op's W); hands the gradient of its input
        on to the previous stage."""
        x_in, out = self.saved.pop((op.chunk, op.micro))
        if self.chunks[op.chunk].stage.last:
            out.backward()
        else:
            torch.autograd.backward(out, self.inbox.pop(("B", op.chunk, op.micro)).to(out.dtype))
        if self.store is not None:
            self.store.seal((op.chunk, op.micro))
        if x_in is not None:
            self._hand_on(x_in.grad, to=self.neighbours[op.chunk][0], kind="B", chunk=op.chunk, micro=op.micro)

    def weights(self, op: Op) -> None:
        """The W of an earlier B: its weight gradients, added to .grad in one autograd pass
        (rooted as the chunk's backward passes are: loss scaling, ZeRO's hooks)."""
        if self.store is not None:
            chunk = self.chunks[op.chunk]
            self.store.run((op.chunk, op.micro), root=getattr(chunk, "weight_root", None))
