"""Pipeline parallelism: stage layout, point-to-point transfers, and the 1F1B schedules.

A schedule is a plain list of operations for this rank, `Op("F"|"B", chunk, micro_batch)`,
computed up front; `run_schedule` executes it. Sends are asynchronous and receives block, so
any schedule whose operations respect data dependencies runs without deadlock. Every message
carries a tag naming (direction, virtual stage, micro-batch), so messages between one pair of
ranks never mix, even when interleaving sends activations and gradients the same way.

Virtual stages (interleaving): rank r holds chunks c = 0..V-1; chunk c of rank r is virtual
stage c * P + r and owns layers [v * L/(P V), (v + 1) * L/(P V)). Activations leave rank P-1's
chunk c for rank 0's chunk c+1.

Without pipeline parallelism, `forward_backward` is a plain gradient-accumulation loop: the
single-device path pays nothing for the pipeline machinery.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist

from pretrain.config import ModelConfig
from pretrain.models.gpt import GPT, Stage
from pretrain.models.layers import DenseLayers
from pretrain.parallel.tensor import TensorParallelLayers
from pretrain.parallel.topology import Topology


class Op(NamedTuple):
    kind: str  # "F" forward or "B" backward
    chunk: int
    micro: int


def stage_layout(*, num_layers: int, pp: int, vp: int, pp_rank: int, chunk: int) -> Stage:
    """The layers of chunk `chunk` on pipeline rank `pp_rank` (virtual stage chunk * pp + pp_rank)."""
    stages = pp * vp
    per_stage = num_layers // stages
    v = chunk * pp + pp_rank
    return Stage(layer_ids=range(v * per_stage, (v + 1) * per_stage), first=v == 0, last=v == stages - 1)


def build_model_chunks(config: ModelConfig, topo: Topology, *, init_seed: int) -> list[GPT]:
    """This rank's model: the whole GPT without pipelining, else one chunk per virtual stage.
    Built directly on the training device, initialised to the single-device weights' shards."""
    layers = TensorParallelLayers(topo) if topo.tp > 1 else DenseLayers()
    with torch.device(topo.device):
        if topo.pp == 1:
            return [GPT(config, layers=layers, init_seed=init_seed)]
        return [GPT(config, layers=layers, init_seed=init_seed,
                    stage=stage_layout(num_layers=config.num_layers, pp=topo.pp, vp=topo.virtual_stages,
                                       pp_rank=topo.pp_rank, chunk=c))
                for c in range(topo.virtual_stages)]


def one_f_one_b(*, pp: int, pp_rank: int, micro_batches: int) -> list[Op]:
    """PipeDream-flush 1F1B: warm up with forwards, alternate one forward / one backward, drain."""
    warmup = min(pp - pp_rank - 1, micro_batches)
    ops = [Op("F", 0, m) for m in range(warmup)]
    for i in range(micro_batches - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    ops += [Op("B", 0, m) for m in range(micro_batches - warmup, micro_batches)]
    return ops


def interleaved_one_f_one_b(*, pp: int, pp_rank: int, vp: int, micro_batches: int) -> list[Op]:
    """Megatron's interleaved 1F1B: micro-batches go through the chunks in groups of P, which
    shrinks the pipeline bubble by V. Needs micro_batches % pp == 0."""
    assert micro_batches % pp == 0, (micro_batches, pp)
    total = micro_batches * vp

    def forward(k: int) -> Op:
        return Op("F", (k // pp) % vp, (k // (pp * vp)) * pp + k % pp)

    def backward(k: int) -> Op:
        return Op("B", vp - 1 - (k // pp) % vp, (k // (pp * vp)) * pp + k % pp)

    warmup = min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, total)
    ops = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [forward(warmup + i), backward(i)]
    ops += [backward(k) for k in range(total - warmup, total)]
    return ops


def make_schedule(topo: Topology, micro_batches: int, *, forward_only: bool = False) -> list[Op]:
    if forward_only:  # evaluation: each micro-batch through this rank's chunks in stage order
        return [Op("F", c, m) for m in range(micro_batches) for c in range(topo.virtual_stages)]
    if topo.virtual_stages > 1:
        return interleaved_one_f_one_b(pp=topo.pp, pp_rank=topo.pp_rank, vp=topo.virtual_stages,
                                       micro_batches=micro_batches)
    return one_f_one_b(pp=topo.pp, pp_rank=topo.pp_rank, micro_batches=micro_batches)


def _tag(kind: str, vstage: int, micro: int) -> int:
    return ((0 if kind == "F" else 1) * 4096 + vstage) * 65536 + micro


def _segments(batch: dict, device: torch.device):
    segments = batch.get("segments")
    return None if segments is None else segments.to(device)


def forward_backward(*, chunks: list, topo: Topology, batches: Iterator[dict], micro_batches: int,
                     autocast: Callable, hidden_shape: tuple[int, int, int],
                     on_last_backward: Callable[[int], None] = lambda chunk: None,
                     forward_only: bool = False) -> list[torch.Tensor]:
    """Run forward and backward over `micro_batches` micro-batches; gradients accumulate as the
    mean over them. Returns the detached micro-batch losses (on the last stage; [] elsewhere).

    `on_last_backward(chunk)` is called right before a chunk's final backward, so data-parallel
    gradient reduction can overlap it. `hidden_shape` is the activation shape a stage receives.
    `forward_only` (evaluation) runs the forwards alone; call it under torch.no_grad().
    """
    device = topo.device
    if topo.pp == 1:
        losses = []
        for m in range(micro_batches):
            batch = next(batches)
            if m == micro_batches - 1:
                on_last_backward(0)
            with autocast():
                loss = chunks[0](batch["tokens"].to(device), labels=batch["labels"].to(device),
                                 segments=_segments(batch, device))
            if not forward_only:
                (loss / micro_batches).backward()
            losses.append(loss.detach())
        return losses

    pp = topo.pp
    # Only the first and the last virtual stages read data; every rank advances the loader
    # the same way so that data positions stay equal across the pipeline.
    micro_data = [next(batches) for _ in range(micro_batches)]
    ops = make_schedule(topo, micro_batches, forward_only=forward_only)
    last_backward = {op.chunk: i for i, op in enumerate(ops) if op.kind == "B"}  # later ones win
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    losses: list[torch.Tensor] = []
    sends: list = []

    for index, op in enumerate(ops):
        chunk = chunks[op.chunk]
        vstage = op.chunk * pp + topo.pp_rank
        key = (op.chunk, op.micro)
        if op.kind == "F":
            if chunk.stage.first:
                x_in = None
                with autocast():
                    x = chunk.embed_tokens(micro_data[op.micro]["tokens"].to(device))
            else:
                x_in = torch.empty(hidden_shape, device=device)
                dist.recv(x_in, src=topo.pp_peer(-1), tag=_tag("F", vstage - 1, op.micro))
                x = x_in.requires_grad_(not forward_only)
            with autocast():
                # Every stage reads the micro-batch's document numbers: attention masks them.
                x = chunk.run_blocks(x, _segments(micro_data[op.micro], device))
                if chunk.stage.last:
                    labels = micro_data[op.micro]["labels"].to(device)
                    loss = chunk.head_loss(x, labels)
                    losses.append(loss.detach())
                    x = loss / micro_batches
            if not chunk.stage.last:
                sends.append(dist.isend(x.detach().float().contiguous(), dst=topo.pp_peer(1),
                                        tag=_tag("F", vstage, op.micro)))
            if not forward_only:
                inputs[key], outputs[key] = x_in, x
        else:
            if index == last_backward[op.chunk]:
                on_last_backward(op.chunk)
            x_in, out = inputs.pop(key), outputs.pop(key)
            if chunk.stage.last:
                out.backward()
            else:
                grad = torch.empty(hidden_shape, device=device)
                dist.recv(grad, src=topo.pp_peer(1), tag=_tag("B", vstage + 1, op.micro))
                torch.autograd.backward(out, grad.to(out.dtype))
            if x_in is not None:
                sends.append(dist.isend(x_in.grad.contiguous(), dst=topo.pp_peer(-1),
                                        tag=_tag("B", vstage, op.micro)))
    for work in sends:
        work.wait()
    return losses
