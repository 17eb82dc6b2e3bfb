"""Gradient synchronisation across the grid after the backward passes of one step.

- Data parallel: gradients are averaged over the DP group in buckets (over the data x context
  ranks under context parallelism: each CP rank's loss is its share of the sequence's mean,
  scaled so that the mean over the CP ranks is the sequence's loss, see
  pretrain/parallel/context.py, so its gradients average like a DP replica's). Each bucket's all-reduce
  starts (asynchronously) as soon as the last gradient in it has been accumulated during the
  final micro-batch's backward, so communication overlaps the rest of the backward pass.
- Sequence parallel: replicated parameters that act on sequence shards (norms, row-parallel
  biases) hold partial gradients on each TP rank; they are summed over the TP group.
- Expert parallelism: the routed experts' gradients are averaged in buckets of their own over
  the ranks that hold the same experts (Topology.expert_dp_group), not the whole DP group.
- Tied embeddings under pipeline parallelism: the first and the last stage each hold the
  embedding; their gradients are summed (over the embedding group, or within pipeline rank 0
  under zb-v, which holds both stages: pretrain/parallel/tied.py) so both copies stay equal.

Gradients live in persistent flat buffers, one per bucket, allocated once (Megatron's contiguous
grad buffer, torch DDP's gradient_as_bucket_view): each parameter's `.grad` is a view into its
bucket's buffer, autograd accumulates into it in place (AccumulateGrad adds to an existing
`.grad` when grad mode is off, as it is during backward), the DP all-reduce runs on the buffer
itself, and `GradientSync.zero_grad` zeroes it between steps. So there is no second copy of the
gradients and no allocation of them per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.models.sharding import sharding
from pretrain.parallel.comm import all_reduce, all_reduce_flat, group_size
from pretrain.parallel.tied import sum_tied_gradients, tied_copies
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


class _Bucket:
    """Parameters of one chunk, in the order their gradients arrive, whose `.grad`s are views
    into one flat buffer: [sum of numels], in the parameters' dtype, on their device."""

    def __init__(self, params: list[nn.Parameter], *, group=None, reduce: bool = True) -> None:
        self.params = params
        # Where its average runs: the data x context group, or for experts under expert
        # parallelism the ranks holding the same experts (reduce=False: this rank alone).
        self.group, self.reduce = group, reduce
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            # AccumulateGrad keeps a `.grad` only while its strides match the parameter's.
            assert p.is_contiguous(), "gradient buffers need contiguous parameters"
            view = self.buffer[offset : offset + p.numel()].view_as(p)
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
            self.views.append(view)
            offset += p.numel()
        self.pending = len(params)
        self.work = None

    def attached(self) -> bool:
        """Whether every parameter's `.grad` is still its view (nothing replaced or dropped it)."""
        return all(p.grad is not None and _same_memory(p.grad, v) for p, v in zip(self.params, self.views))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b start at the same element of the same storage: what equal data pointers
    say, asked of the storage instead, because fake tensors (the planner's dry run) have no data
    pointers (all 0, and reading them warns)."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata and a.storage_offset() == b.storage_offset()


class GradientSync:
    """Owns all gradient communication of one step for a rank's model chunks, and the buffers
    the gradients live in.

    Buckets are built for every DP size, DP=1 included: one way gradients are held, no
    per-step allocation anywhere, and `.grad` is never None, so the optimizer, clipping and
    the fp16 unscale see the same tensors every step whatever the layout (a parameter that got
    no gradient in a step has a zero one, as the DP reduction has always given it). With a DP
    group of one, no hooks are registered and `finish` only does the SP and tied syncs.
    """

    def __init__(self, chunks: list[nn.Module], topo: Topology, *, bucket_mb: float = 25.0) -> None:
        self.topo = topo
        self.params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
        self.dp_group = topo.dp_cp_group if group_size(topo.dp_cp_group) > 1 else None
        # Expert parallelism: experts' gradients are averaged over the ranks holding the same
        # experts (None: this rank is the only one), in buckets of their own.
        self.split_experts = topo.ep > 1
        expert_group = topo.expert_dp_group if group_size(topo.expert_dp_group) > 1 else None
        self.enabled = [False] * len(chunks)  # per chunk: during its last micro-batch's backward
        self.buckets: list[_Bucket] = []
        self.overlapped = 0  # buckets whose reduction started during backward (for tests, benches)
        self._bucket_of: dict[int, tuple[int, _Bucket]] = {}
        limit = int(bucket_mb * 2**20)
        for index, chunk in enumerate(chunks):
            # A bucket never spans chunks (their last backwards happen at different times), and
            # is filled in reverse order: gradients arrive from the last layer back to the first.
            # One dtype and device per buffer: a change of either closes the bucket.
            current, size = [], 0
            params = [p for p in chunk.parameters() if p.requires_grad]
            order = params[::-1]
            for i, p in enumerate(order):
                current.append(p)
                size += p.numel() * p.element_size()
                last = i == len(order) - 1
                if last or size >= limit or self._kind(order[i + 1]) != self._kind(p):
                    expert = self.split_experts and sharding(p).expert
                    group = expert_group if expert else self.dp_group
                    bucket = _Bucket(current, group=group, reduce=group is not None)
                    self.buckets.append(bucket)
                    self._bucket_of.update({id(q): (index, bucket) for q in current})
                    current, size = [], 0
            if self.dp_group is not None:
                for p in params:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _kind(self, p: nn.Parameter) -> tuple:
        """What a bucket's parameters share: dtype, device, and (under EP) expert or not."""
        return p.dtype, p.device, self.split_experts and sharding(p).expert

    def enable(self, chunk: int) -> None:
        """Called right before chunk's last backward of the step: reduce as gradients complete."""
        self.enabled[chunk] = True

    def zero_grad(self) -> None:
        """Zero every gradient in place (one fill per bucket), keeping the views; replaces
        `optimizer.zero_grad(set_to_none=True)`, which would detach `.grad` from the buffers."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            if not bucket.attached():  # someone set `.grad` (to None, say): attach the views again
                for p, view in zip(bucket.params, bucket.views):
                    p.grad = view

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        chunk, bucket = self._bucket_of[id(param)]
        if not self.enabled[chunk]:
            return
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)
            self.overlapped += 1

    def _launch(self, bucket: _Bucket) -> None:
        # In place on the gradients themselves; a parameter that got no gradient this step
        # contributes its zeros (zero_grad left them there).
        # An expert's gradient on an EP rank already sums the EP group's tokens' contributions
        # (the all-to-all's backward brought them): summed over the ranks holding the same
        # experts, it is a sum over all replicas too, so the divisor is the same.
        bucket.buffer.div_(self.topo.replicas)  # sum of the replicas' means / their count = the global mean
        bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True) if bucket.reduce else _DONE

    def finish(self) -> None:
        """Wait for the DP reductions (the averaged gradients are then in place), then do the SP
        and tied syncs."""
        if self.dp_group is not None:
            for bucket in self.buckets:
                # A gradient outside its buffer would be silently left out of the reduction.
                assert bucket.attached(), "a .grad was replaced: call GradientSync.zero_grad, not the optimizer's"
                if bucket.work is None:  # a bucket whose hooks never all fired (unused parameters)
                    self._launch(bucket)
                with waiting():
                    bucket.work.wait()
                bucket.pending, bucket.work = len(bucket.params), None
        self.enabled = [False] * len(self.enabled)
        if self.topo.sequence_parallel:
            partial = [p.grad for p in self.params if sharding(p).sequence_parallel and p.grad is not None]
            all_reduce_flat(partial, self.topo.tp_group)
        if self.topo.pp > 1:
            sum_tied_gradients([p.grad for p in tied_copies(self.params) if p.grad is not None], self.topo)


def reduce_loss(loss: torch.Tensor, topo: Topology) -> float:
    """Mean loss over the data x context group, known on the last pipeline stage."""
    if group_size(topo.dp_cp_group) > 1:
        loss = loss.detach().clone()
        all_reduce(loss, topo.dp_cp_group)
        loss /= topo.replicas
    return float(loss)


def shared_loss(losses: list[torch.Tensor], topo: Topology) -> float:
    """The step's loss (mean over micro-batches and the data x context group) on every rank: the
    last pipeline stage computes it and the other stages receive it, so that every rank can judge
    the step (pretrain/faults/divergence.py) and reach the same verdict."""
    local = torch.stack(losses).mean().detach().float() if losses else torch.zeros((), device=topo.device)
    if losses and group_size(topo.dp_cp_group) > 1:
        local = all_reduce(local.clone(), topo.dp_cp_group) / topo.replicas
    if topo.pp > 1:  # the other stages add zeros: the value arrives unchanged, NaN included
        local = all_reduce(local.clone(), topo.pp_group)
    return float(local)


class _Done:
    """The finished work of a bucket with nothing to reduce (an expert bucket whose experts no
    other rank holds)."""

    def wait(self) -> bool:
        return True


_DONE = _Done()


def _counted_grads(params: list[nn.Parameter], topo: Topology, *, experts: bool | None = None) -> list[torch.Tensor]:
    """The gradients that make up the model's norm, each TP/PP shard once (experts=True/False:
    only the routed experts' / only the others')."""
    grads = []
    for p in params:
        if p.grad is None or (experts is not None and sharding(p).expert != experts):
            continue
        replicated = sharding(p).tp is None
        if replicated and topo.tp_rank != 0:
            continue  # the same tensor on every TP rank: count it once
        if sharding(p).tied_output_copy:
            continue  # the last stage's copy of the tied embedding
        grads.append(p.grad)
    return grads


def global_grad_norm(params: list[nn.Parameter], *, topo: Topology) -> float:
    """L2 norm of the gradients of the whole model, the same on every rank (DP and CP replicas
    hold equal gradients once reduced)."""
    squares = _squares(_counted_grads(params, topo, experts=False if topo.ep > 1 else None), topo)
    if topo.ep > 1:  # each EP rank holds other experts: their squares summed over the EP group
        squares += all_reduce(_squares(_counted_grads(params, topo, experts=True), topo), topo.ep_group)
    if topo.world_size > 1:
        all_reduce(squares, topo.model_group)
    return float(squares.sqrt())


def _squares(grads: list[torch.Tensor], topo: Topology) -> torch.Tensor:
    """The sum of squares of `grads`, fp64, 0-d."""
    squares = torch.zeros((), dtype=torch.float64, device=topo.device)
    if grads:
        squares += torch.nn.utils.get_total_norm(grads, foreach=True).double() ** 2
    return squares


def clip_gradients(params: list[nn.Parameter], *, norm: float, max_norm: float) -> None:
    """Scale all gradients by the same factor so that their global norm is at most max_norm
    (0: no clipping)."""
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
