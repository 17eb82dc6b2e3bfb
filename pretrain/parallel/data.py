"""Gradient synchronisation across the grid after the backward passes of one step.

- Data parallel: gradients are averaged over the DP group in buckets. Each bucket's all-reduce
  starts (asynchronously) as soon as the last gradient in it has been accumulated during the
  final micro-batch's backward, so communication overlaps the rest of the backward pass.
- Sequence parallel: replicated parameters that act on sequence shards (norms, row-parallel
  biases) hold partial gradients on each TP rank; they are summed over the TP group.
- Tied embeddings under pipeline parallelism: the first and the last stage each hold the
  embedding; their gradients are summed over the embedding group so both copies stay equal.

With a DP group of one, nothing is registered and `finish` only does the other two.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.parallel.comm import all_reduce, all_reduce_flat, group_size
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.pending = len(params)
        self.work = None
        self.buffer = None

    def reset(self) -> None:
        self.pending, self.work, self.buffer = len(self.params), None, None


class GradientSync:
    """Owns all gradient communication of one step for a rank's model chunks."""

    def __init__(self, chunks: list[nn.Module], topo: Topology, *, bucket_mb: float = 25.0) -> None:
        self.topo = topo
        self.params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
        self.dp_group = topo.dp_group if group_size(topo.dp_group) > 1 else None
        self.enabled = [False] * len(chunks)  # per chunk: during its last micro-batch's backward
        self.buckets: list[_Bucket] = []
        self.overlapped = 0  # buckets whose reduction started during backward (for tests, benches)
        self._bucket_of: dict[int, tuple[int, _Bucket]] = {}
        if self.dp_group is None:
            return
        limit = int(bucket_mb * 2**20)
        for index, chunk in enumerate(chunks):
            # A bucket never spans chunks (their last backwards happen at different times), and
            # is filled in reverse order: gradients arrive from the last layer back to the first.
            current, size = [], 0
            params = [p for p in chunk.parameters() if p.requires_grad]
            for p in reversed(params):
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= limit or p is params[0]:
                    bucket = _Bucket(current)
                    self.buckets.append(bucket)
                    self._bucket_of.update({id(q): (index, bucket) for q in current})
                    current, size = [], 0
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def enable(self, chunk: int) -> None:
        """Called right before chunk's last backward of the step: reduce as gradients complete."""
        self.enabled[chunk] = True

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        chunk, bucket = self._bucket_of[id(param)]
        if not self.enabled[chunk]:
            return
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)
            self.overlapped += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.buffer = torch.cat([g.reshape(-1) for g in grads])
        bucket.buffer.div_(self.topo.dp)  # sum of DP means / dp = mean over the global batch
        bucket.work = dist.all_reduce(bucket.buffer, group=self.dp_group, async_op=True)

    def finish(self) -> None:
        """Wait for the DP reductions, write averaged gradients back, then do SP and tied syncs."""
        for bucket in self.buckets:
            if bucket.work is None:  # a bucket whose hooks never all fired (unused parameters)
                self._launch(bucket)
            with waiting():
                bucket.work.wait()
            offset = 0
            for p in bucket.params:
                n = p.numel()
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(bucket.buffer[offset : offset + n].view_as(p))
                offset += n
            bucket.reset()
        self.enabled = [False] * len(self.enabled)
        if self.topo.sequence_parallel:
            partial = [p.grad for p in self.params if getattr(p, "sequence_parallel", False) and p.grad is not None]
            all_reduce_flat(partial, self.topo.tp_group)
        if self.topo.pp > 1:
            tied = [p.grad for p in self.params if getattr(p, "tied_embedding", False) and p.grad is not None]
            all_reduce_flat(tied, self.topo.embedding_group)


def reduce_loss(loss: torch.Tensor, topo: Topology) -> float:
    """Mean loss over the DP group, known on the last pipeline stage."""
    if group_size(topo.dp_group) > 1:
        loss = loss.detach().clone()
        all_reduce(loss, topo.dp_group)
        loss /= topo.dp
    return float(loss)


def shared_loss(losses: list[torch.Tensor], topo: Topology) -> float:
    """The step's loss (mean over micro-batches and the DP group) on every rank: the last
    pipeline stage computes it and the other stages receive it, so that every rank can judge
    the step (pretrain/faults/divergence.py) and reach the same verdict."""
    local = torch.stack(losses).mean().detach().float() if losses else torch.zeros((), device=topo.device)
    if losses and group_size(topo.dp_group) > 1:
        local = all_reduce(local.clone(), topo.dp_group) / topo.dp
    if topo.pp > 1:  # the other stages add zeros: the value arrives unchanged, NaN included
        local = all_reduce(local.clone(), topo.pp_group)
    return float(local)


def _counted_grads(params: list[nn.Parameter], topo: Topology) -> list[torch.Tensor]:
    """The gradients that make up the model's norm, each TP/PP shard once."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        replicated = getattr(p, "tp_spec", None) is None
        if replicated and topo.tp_rank != 0:
            continue  # the same tensor on every TP rank: count it once
        if getattr(p, "tied_embedding", False) and not topo.is_first_stage:
            continue  # the last stage's copy of the tied embedding
        grads.append(p.grad)
    return grads


def global_grad_norm(params: list[nn.Parameter], *, topo: Topology) -> float:
    """L2 norm of the gradients of the whole model, the same on every rank (DP replicas hold
    equal gradients)."""
    grads = _counted_grads(params, topo)
    squares = torch.zeros((), dtype=torch.float64, device=topo.device)
    if grads:
        squares += torch.nn.utils.get_total_norm(grads, foreach=True).double() ** 2
    if topo.world_size > 1:
        all_reduce(squares, topo.model_group)
    return float(squares.sqrt())


def clip_gradients(params: list[nn.Parameter], *, norm: float, max_norm: float) -> None:
    """Scale all gradients by the same factor so that their global norm is at most max_norm
    (0: no clipping)."""
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)


def grad_norm_and_clip(params: list[nn.Parameter], *, max_norm: float, topo: Topology) -> float:
    """Global gradient norm, then clip to max_norm; returns the norm before clipping."""
    norm = global_grad_norm(params, topo=topo)
    clip_gradients(params, norm=norm, max_norm=max_norm)
    return norm
