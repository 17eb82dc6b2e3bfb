"""Pipeline parallelism: point-to-point transfers and the 1F1B schedules (which stage holds which
layers, and building this rank's chunks: pretrain/parallel/model_chunks.py).

A schedule is a plain list of operations for this rank, `Op("F"|"B", chunk, micro_batch)`,
computed up front; `forward_backward` executes it. Transfers follow NCCL's rules, not gloo's
kinder ones (see `PipeLink` and pretrain/parallel/nccl_rules.py): before each operation the
sends of the previous one and the receive this one needs go out as one batched group, and no
message carries a tag, because NCCL matches the k-th send between two ranks with the k-th
receive whatever its tag. Every schedule here is checked against those rules on real ranks
(tests/test_nccl_rules.py).

Virtual stages (interleaving): rank r holds chunks c = 0..V-1, chunk c being virtual stage
c * P + r (model_chunks.stage_layout). Activations leave rank P-1's chunk c for rank 0's chunk c+1.

Without pipeline parallelism, `forward_backward` is a plain gradient-accumulation loop: the
single-device path pays nothing for the pipeline machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


class Op(NamedTuple):
    kind: str  # "F" forward or "B" backward
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
    if forward_only:  # evaluation: each micro-batch through this rank's chunks in stage order
        return [(Op("F", c, m),) for m in range(micro_batches) for c in range(topo.virtual_stages)]
    if topo.virtual_stages > 1:
        return interleaved_one_f_one_b(
            pp=topo.pp, pp_rank=topo.pp_rank, vp=topo.virtual_stages, micro_batches=micro_batches
        )
    return one_f_one_b(pp=topo.pp, pp_rank=topo.pp_rank, micro_batches=micro_batches)


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
    waited for before that step starts (tests/test_nccl_rules.py checks every schedule against
    these rules with pretrain/parallel/nccl_rules.py). Activations and gradients travel in the
    compute dtype (bf16 halves the bytes of fp32), and are turned back into the stage's own dtype
    on arrival.
    """

    def __init__(self, topo: Topology, *, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        self.topo, self.shape, self.dtype = topo, shape, dtype
        self.sends: list[dist.P2POp] = []

    def send(self, x: torch.Tensor, *, forward: bool) -> None:
        """Queue x for the next stage (an activation) or the previous one (a gradient)."""
        x = x.detach().to(self.dtype).contiguous()
        self.sends.append(dist.P2POp(dist.isend, x, self.topo.pp_peer(1 if forward else -1)))

    def exchange(self, receives: list[str | None] = ()) -> list[torch.Tensor | None]:
        """Post the queued sends together with the receives the next step needs ("F": an
        activation from the previous stage, "B": a gradient from the next one, None: nothing),
        as one group; wait for all; return what was received, in order."""
        ops, buffers = self.sends, []
        self.sends = []
        for kind in receives:
            buffer = None
            if kind is not None:
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.topo.device)
                ops = ops + [dist.P2POp(dist.irecv, buffer, self.topo.pp_peer(-1 if kind == "F" else 1))]
            buffers.append(buffer)
        if ops:
            with waiting():
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        return buffers


def _receives(op: Op, chunk) -> str | None:
    """What op needs from a neighbour first: "F" an activation, "B" a gradient, or nothing."""
    if op.kind == "F":
        return None if chunk.stage.first else "F"
    return None if chunk.stage.last else "B"


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

    `on_last_backward(chunk)` is called right before a chunk's final backward, so data-parallel
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


def _execute(steps: list[list[Op]], run: _StageRunner, on_last_backward, progress) -> None:
    """Run a schedule's steps in order, each after the exchange that brings what it needs."""
    final = {op.chunk: op for op in flatten(steps) if op.kind == "B"}  # each chunk's last backward
    for step in steps:
        progress("exchange before " + ", ".join(f"{op.kind} chunk {op.chunk} micro {op.micro}" for op in step))
        received = run.link.exchange([_receives(op, run.chunks[op.chunk]) for op in step])
        for op, data in zip(step, received):
            progress(f"{op.kind} chunk {op.chunk} micro {op.micro}")
            if op.kind == "F":
                run.forward(op, data)
            else:
                if final[op.chunk] == op:
                    on_last_backward(op.chunk)
                run.backward(op, data)
    progress("exchange of the last sends")
    run.link.exchange()  # the last step's sends


class _StageRunner:
    """Runs one rank's forward and backward operations, keeping what a backward needs from its
    forward (the stage input and output) until then."""

    def __init__(
        self,
        chunks: list,
        micro_data: list[dict],
        *,
        link: PipeLink,
        autocast: Callable,
        device: torch.device,
        forward_only: bool,
    ) -> None:
        self.chunks, self.micro_data, self.link = chunks, micro_data, link
        self.autocast, self.device, self.forward_only = autocast, device, forward_only
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.losses: list[torch.Tensor] = []

    def forward(self, op: Op, received: torch.Tensor | None) -> None:
        """One forward of one chunk; queues its output for the next stage."""
        chunk, data = self.chunks[op.chunk], self.micro_data[op.micro]
        x_in = None
        with self.autocast():
            if chunk.stage.first:
                x = chunk.embed_tokens(_to_device(data["tokens"], self.device))
            else:
                x_in = received.requires_grad_(not self.forward_only)
                # Back to the stage's own dtype (fp32 weights keep an fp32 residual stream).
                x = x_in.to(next(chunk.parameters()).dtype)
            # Every stage reads the micro-batch's document numbers: attention masks them.
            x = chunk.run_blocks(x, _segments(data, self.device))
            if chunk.stage.last:
                loss = chunk.head_loss(x, _to_device(data["labels"], self.device))
                self.losses.append(loss.detach())
                x = loss / len(self.micro_data)
        if not chunk.stage.last:
            self.link.send(x, forward=True)
        if not self.forward_only:
            self.saved[(op.chunk, op.micro)] = (x_in, x)

    def backward(self, op: Op, received: torch.Tensor | None) -> None:
        """One backward of one chunk; queues the gradient of its input for the previous stage."""
        x_in, out = self.saved.pop((op.chunk, op.micro))
        if self.chunks[op.chunk].stage.last:
            out.backward()
        else:
            torch.autograd.backward(out, received.to(out.dtype))
        if x_in is not None:
            self.link.send(x_in.grad, forward=False)
