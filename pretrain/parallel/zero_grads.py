"""When each gradient enters DeepSpeed's ZeRO reduce buckets: our hooks decide, not DeepSpeed's.

DeepSpeed's own per-parameter hooks (stage_1_and_2.py `create_gradient_handling_hooks`, stage3.py
`create_reduce_and_remove_grad_hooks`) hand every gradient to the reduce buckets as soon as it is
accumulated (stages 2 and 3), or never (stage 1, whose gradients DeepSpeed reduces all at once
after the last micro-batch). They know nothing of our model parallelism. `ZeroGradientRouter`
removes them and registers its own post-accumulate-grad hooks, which hand each parameter to
DeepSpeed's `reduce_ready_partitions_and_remove_grads` when its gradient is final for the data-
parallel reduction:

- Stage 1 accumulates whole gradients locally over the micro-batches; from the moment the
  schedule announces a chunk's last backward of the step (`start_last_backward`), each of its
  gradients goes on as it completes. DeepSpeed reduces a bucket as soon as it is full (on its
  reduction stream on a GPU), so only the last, partly filled bucket is left for after the
  backward pass (`finish`). Stages 2 and 3 hand every micro-batch's gradients on, as they did.
- Sequence-parallel replicas (norms, row-parallel biases) see only their sequence shard: their
  gradients are summed over the TP group first. They are held back in small buckets and summed
  with one flat all-reduce per bucket once all its members are ready, then handed on (stage 1:
  once per step, in the last micro-batch; stages 2 and 3: once per micro-batch), instead of one
  all-reduce per parameter per micro-batch. Every TP rank runs the same backward graph in the
  same order and holds the same bucket layout, so the all-reduces line up, and every rank of a
  DP group fills DeepSpeed's buckets in the same order.
- Tied embeddings under pipeline parallelism (stage 1 only: the config (ParallelConfig.validate) refuses ZeRO-2/3
  with them): the first and last stage's copies are summed after the backward passes (over the
  embedding group, or within pipeline rank 0 under zb-v), then reduced over DP in the final bucket.
"""

from __future__ import annotations

from torch import nn

from pretrain.models.sharding import sharding
from pretrain.parallel.comm import all_reduce_flat, group_size
from pretrain.parallel.tied import sum_tied_gradients, tied_copies
from pretrain.parallel.topology import Topology


class _HeldBucket:
    """Sequence-parallel parameters whose gradients are summed over TP together."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.ready: list[nn.Parameter] = []


class ZeroGradientRouter:
    """Owns the gradient hooks of one rank's ZeRO optimizer (see the module docstring)."""

    def __init__(self, optimizer, *, stage: int, chunks: list[nn.Module], topo: Topology, bucket_elements: int) -> None:
        self.opt, self.stage, self.topo = optimizer, stage, topo
        for hook in optimizer._grad_acc_hooks:  # DeepSpeed's: ours decide when (module docstring)
            hook.remove()
        optimizer._grad_acc_hooks.clear()
        # Stages 1/2 name a parameter by its DeepSpeed parameter group; stage 3 by itself.
        self._group_index = {id(p): i for i, group in enumerate(getattr(optimizer, "bit16_groups", [])) for p in group}
        self.params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
        self._chunk_of: dict[int, int] = {}
        self._held_of: dict[int, _HeldBucket] = {}
        self.held: list[_HeldBucket] = []
        sum_sp = topo.sequence_parallel and group_size(topo.tp_group) > 1
        for index, chunk in enumerate(chunks):
            params = [p for p in chunk.parameters() if p.requires_grad]
            self._chunk_of.update({id(p): index for p in params})
            if sum_sp:
                # In the order gradients arrive (last layer first); never across chunks, whose
                # last backwards happen at different times.
                sp = [p for p in reversed(params) if sharding(p).sequence_parallel]
                self._bucket_held(sp, bucket_elements)
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        # Both copies on this rank (zb-v) or one, summed with the other end's (pretrain/parallel/tied.py).
        self.tied = {id(p) for p in tied_copies(self.params)} if topo.pp > 1 else set()
        self._reducing = [stage >= 2] * len(chunks)  # per chunk: hand gradients on as they complete
        self._handed: set[int] = set()  # stage 1: parameters handed on this step

    def _bucket_held(self, params: list[nn.Parameter], limit: int) -> None:
        current, size = [], 0
        for p in params:
            current.append(p)
            size += p.numel()
            if size >= limit or p is params[-1]:
                bucket = _HeldBucket(current)
                self.held.append(bucket)
                self._held_of.update({id(q): bucket for q in current})
                current, size = [], 0

    # -- the step's protocol (ZeroEngine calls these) ---------------------------------------------

    def start_last_backward(self, chunk: int) -> None:
        """The chunk's next backward is its last of the step: stage 1 starts reducing."""
        self._reducing[chunk] = True

    @property
    def reducing(self) -> bool:
        """Whether some chunk's gradients are being reduced (stage 1's accumulation boundary)."""
        return any(self._reducing)

    def end_backward(self) -> None:
        """After every backward pass, before DeepSpeed's epilogue (stages 2 and 3): sum and hand on
        the held gradients whose buckets did not complete (parameters unused in this pass)."""
        if self.stage >= 2:
            for bucket in self.held:
                if bucket.ready:
                    self._sum_and_hand_on(bucket.ready)
                    bucket.ready = []

    def finish(self) -> None:
        """Stage 1, after the step's backward passes: sum the tied embedding copies and hand them
        on, and everything still held (unused in the last micro-batch); DeepSpeed's epilogue
        (ZeroEngine) then reduces the last bucket."""
        tied = [p for p in self.params if id(p) in self.tied and self._grad(p) is not None]
        sum_tied_gradients([self._grad(p) for p in tied], self.topo)
        for p in tied:
            self._hand_on(p)
        left = [p for p in self.params if id(p) not in self._handed and self._grad(p) is not None]
        held = [p for p in left if id(p) in self._held_of]
        if held:  # the same on every TP rank: they ran the same graph
            self._sum_and_hand_on(held)
        for p in left:
            if id(p) not in self._held_of:
                self._hand_on(p)

    def reset(self) -> None:
        """After the optimizer step."""
        self._reducing = [self.stage >= 2] * len(self._reducing)
        self._handed.clear()
        for bucket in self.held:
            bucket.ready = []

    # -- hooks ------------------------------------------------------------------------------------

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        opt = self.opt
        if self.stage < 3:  # what DeepSpeed's own hook did first (process_gradients)
            opt.setup_buckets()
            if opt.use_grad_accum_attribute:
                opt._fill_param_grad_accum_attribute(param)
        if not self._reducing[self._chunk_of[id(param)]]:
            return  # stage 1 before the chunk's last backward: accumulate locally
        bucket = self._held_of.get(id(param))
        if bucket is not None:
            bucket.ready.append(param)
            if len(bucket.ready) == len(bucket.params):
                self._sum_and_hand_on(bucket.ready)
                bucket.ready = []
        elif id(param) not in self.tied:  # tied copies wait for finish()
            self._hand_on(param)

    def _grad(self, param: nn.Parameter):
        if self.stage < 3:
            return self.opt.get_gradient_for_reduction(param)  # .grad, or .grad_accum (fp32 accumulation)
        return param.grad

    def _sum_and_hand_on(self, params: list[nn.Parameter]) -> None:
        all_reduce_flat([self._grad(p) for p in params], self.topo.tp_group)
        for p in params:
            self._hand_on(p)

    def _hand_on(self, param: nn.Parameter) -> None:
        if self.stage < 3:
            # Stage 1 passes only with the accumulation boundary set (ZeroEngine sets it once a
            # chunk's last backward has been announced).
            self.opt.reduce_ready_partitions_and_remove_grads(param, self._group_index[id(param)])
        else:
            self.opt.reduce_ready_partitions_and_remove_grads(param)
        self._handed.add(id(param))
