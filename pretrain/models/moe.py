"""The mixture-of-experts MLP (model.moe): a router, routed experts, optional shared experts.

Written as if it ran on one device, like the rest of the GPT: the router picks each token's
top_k experts (pretrain/models/moe_routing.py), the token-expert assignments are sorted by expert
and every expert's MLP runs on its rows, all experts as one grouped matmul where torch offers it
(`F.grouped_mm`) and one matmul per expert elsewhere; the outputs are summed back per token,
weighted by the router.

Every expert is an MLP of the layer factory's column/row layers, under its global index
(`mlp.experts.{e}.fc1.weight`, `...fc2.weight`): checkpoints key expert weights by expert, and
tensor parallelism splits each expert as it splits the dense MLP (fc1 by output rows, SwiGLU's
gate and up separately; fc2 by input columns). Only the weights are taken from those layers:
the experts' tokens enter the tensor-parallel region once for all experts (see _TensorRegion).
gpt2's experts have output biases: each is added to its expert's rows where the expert runs
(its EP rank), on TP rank 0 only, so the tensor-parallel sum counts it once (_OncePerTP).

Context parallelism (the factory's `context`): each rank routes its s/cp tokens of every sequence
itself; the load-balancing loss takes the tokens per expert of the whole micro-batch (one
all-reduce of E counts over the CP group) and the mean router probabilities of this rank's
tokens (see load_balancing_loss), the z-loss the mean over this rank's tokens: the mean over the
CP ranks of each value is the micro-batch's, and so is the average of their gradients. With a
capacity, every CP rank's choices are gathered and each expert is filled in the micro-batch's
token order (_keep_in_sequence_order), so the same assignments drop as on one device.

The auxiliary losses (load balancing, z-loss) are not added to the returned activations'
value: their gradient is attached to the layer's output (_AuxLossGrad), so it flows in the same
backward pass as the language-model loss wherever the layer sits in a pipeline, scaled as the
training step scales that loss (`aux_grad_scale`, set by pretrain/moe_training.py). The losses'
values, the load per expert and the dropped assignments are recorded in that backward, once per
micro-batch even when the block is recomputed (`load`, read and reset once per step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models import kernels
from pretrain.models.moe_routing import (
    Dispatch,
    combine,
    load_balancing_loss,
    plan_dispatch,
    route,
    within_capacity,
    z_loss,
)
from pretrain.models.sharding import mark


class ExpertLoad:
    """What the layer's backward passes recorded since the last reset: assignments per expert
    (before drops), assignments dropped, the summed raw aux and z losses, and micro-batches."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.tokens: torch.Tensor | None = None  # [E] int64
        self.dropped = self.aux = self.z = None  # 0-d tensors
        self.micro_batches = 0

    def add(self, *, tokens: torch.Tensor, dropped: torch.Tensor, aux: torch.Tensor, z: torch.Tensor) -> None:
        if self.tokens is None:
            self.tokens, self.dropped, self.aux, self.z = tokens.clone(), dropped.clone(), aux.clone(), z.clone()
        else:
            self.tokens += tokens
            self.dropped += dropped
            self.aux += aux
            self.z += z
        self.micro_batches += 1

    def as_row(self, device: torch.device) -> torch.Tensor:
        """[E + 4] fp64: tokens per expert, dropped, aux sum, z sum, micro-batches (zeros when
        nothing was recorded)."""
        row = torch.zeros(self.num_experts + 4, dtype=torch.float64, device=device)
        if self.tokens is not None:
            e = self.num_experts
            row[:e] = self.tokens
            row[e], row[e + 1], row[e + 2], row[e + 3] = self.dropped, self.aux, self.z, self.micro_batches
        return row


class _AuxLossGrad(torch.autograd.Function):
    """Identity on the layer's output whose backward also gives the auxiliary loss (a 0-d tensor,
    or None) the gradient `scale` and calls `on_backward` (the load record)."""

    @staticmethod
    def forward(ctx, out, aux_loss, scale, on_backward):
        ctx.scale, ctx.on_backward, ctx.has_loss = scale, on_backward, aux_loss is not None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.on_backward()
        loss_grad = torch.full((), ctx.scale, dtype=torch.float32, device=grad.device) if ctx.has_loss else None
        return grad, loss_grad, None, None


class _OncePerTP(torch.autograd.Function):
    """An expert's output bias, added to its rows before the tensor-parallel sum: the bias on TP
    rank 0, zeros on the others, so the sum holds it once. Backward: the gradient unchanged on
    every rank, since each TP rank gets the whole output's gradient (the sum's backward hands it
    to every rank), so every rank computes the bias's full gradient, as for a replicated weight."""

    @staticmethod
    def forward(ctx, bias, include):
        return bias.view_as(bias) if include else torch.zeros_like(bias)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses
    the stride-0 gradient a .sum() produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _TensorRegion:
    """How the experts' tokens enter and leave the tensor-parallel region, once for all experts
    (Megatron's MoE with TP does the same). Identity on one device.

    Without sequence parallelism every TP rank holds all tokens: the router runs on each rank
    alike; the experts' input is entered with copy_to_tp (its gradient summed over TP); the
    routing weights too, because each rank's expert outputs are partial sums of the row-split fc2,
    so is each rank's gradient of the weights; the weighted partial outputs are summed by
    reduce_from_tp. Under sequence parallelism each rank holds a slice of the sequence: the router
    runs on the slice (its weight marked sequence_parallel: gradients summed over TP), its logits
    and the tokens are gathered along the sequence, and the output is reduce-scattered back; the
    gathers' backward sums partial gradients over the ranks, so the auxiliary losses, computed
    alike on every rank, pass 1/tp of their gradient (aux_scale)."""

    def __init__(self, layers) -> None:
        self.size = layers.tp_size
        self.sequence_parallel = layers.sequence_parallel and self.size > 1
        self.rank = layers.tp_rank
        self.group = getattr(layers, "group", None)
        self.aux_scale = 1.0 / self.size if self.sequence_parallel else 1.0
        if self.size > 1:
            from pretrain.parallel import comm  # the TP factory's collectives (only under TP)

            self.comm = comm

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s/tp, ...] -> [b, s, ...] under sequence parallelism; else x."""
        return self.comm.gather_sequence(x, self.group) if self.sequence_parallel else x

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated tensor the experts' partial sums depend on: its gradient is summed over TP."""
        return self.comm.copy_to_tp(x, self.group) if self.size > 1 and not self.sequence_parallel else x

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        """The experts' partial outputs [b, s, h] -> this rank's tokens' full output."""
        if self.size == 1:
            return y
        if self.sequence_parallel:
            return self.comm.scatter_sequence(y, self.group)
        return self.comm.reduce_from_tp(y, self.group)


def grouped_mm_fits(x: torch.Tensor, widths: tuple[int, ...]) -> bool:
    """Whether F.grouped_mm runs here: torch has it, the device has a kernel for the dtype (CPU:
    any float; CUDA: bf16 on compute capability 8.0+) and every width keeps rows 16-byte aligned."""
    if not hasattr(F, "grouped_mm") or any(w % 8 for w in widths):
        return False
    if x.device.type == "cpu":
        return True
    return (
        x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def _is_fake(t: torch.Tensor) -> bool:
    """Fake tensors (the planner's probe): no values, so no data-dependent sizes."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


class MoE(nn.Module):
    """hidden [b, s(/tp), h] -> [b, s(/tp), h], in place of the block's MLP."""

    def __init__(self, config: ModelConfig, layers) -> None:
        super().__init__()
        from pretrain.models.gpt import MLP  # gpt.py imports this module

        moe = self.moe = config.moe
        self.swiglu = config.flavour == "llama"
        self.region = _TensorRegion(layers)
        self.router = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        if self.region.sequence_parallel:
            mark(self.router.weight, sequence_parallel=True)
        if moe.router == "sigmoid":  # steered after each step (pretrain/moe_training.py), never by gradient
            self.router.expert_bias = nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)
        expert_config = dataclasses.replace(config, ffn_hidden_size=moe.expert_ffn(config), moe=None)
        # Expert parallelism (pretrain/parallel/expert.py): this rank holds a block of the experts,
        # still under their global indices; None: all of them.
        self.ep = getattr(layers, "expert_parallel", None)
        held = self.ep.local_experts(moe.num_experts) if self.ep is not None else range(moe.num_experts)
        self.experts = nn.ModuleDict({str(e): MLP(expert_config, layers) for e in held})
        for param in self.experts.parameters():
            mark(param, expert=True)
        for expert in self.experts.values():
            if expert.fc2.bias is not None:  # full gradient on every TP rank (_OncePerTP): no TP sum
                mark(expert.fc2.bias, sequence_parallel=False)
        # Context parallelism: the micro-batch's tokens per expert are summed over its group.
        self.context = getattr(layers, "context", None)
        self.shared = None
        if moe.shared_experts:
            self.shared = MLP(dataclasses.replace(config, ffn_hidden_size=moe.shared_ffn(config), moe=None), layers)
        self.shared_gate = None
        if moe.shared_expert_gate:
            self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)
            if self.region.sequence_parallel:
                mark(self.shared_gate.weight, sequence_parallel=True)
        self.load = ExpertLoad(moe.num_experts)
        # The gradient the auxiliary losses get per unit of loss: 1/micro-batches (x the fp16 loss
        # scale) in training, set by pretrain/moe_training.py; 1 when the model is used directly.
        self.aux_grad_scale: Callable[[], float] = lambda: 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s_local, h = x.shape
        region = self.region
        logits = region.gather(self._router_logits(x))  # [b, s, E] fp32
        tokens = region.gather(x)  # [b, s, h]
        s = tokens.shape[1]
        routing = route(logits.reshape(b * s, -1), self.moe, bias=getattr(self.router, "expert_bias", None))
        fake = _is_fake(x)
        cp = 1 if self.context is None else self.context.size
        capacity = None if fake else self.moe.capacity(b * s * cp)  # of the whole micro-batch
        keep = None
        if capacity is not None and cp > 1:
            keep = self._keep_in_sequence_order(routing.experts.view(b, s, -1), capacity)
        dispatch = plan_dispatch(routing.experts, self.moe.num_experts, capacity=capacity, keep=keep)
        rows = self._run_experts(region.enter(tokens).reshape(b * s, h), dispatch, fake=fake)
        y = combine(rows, region.enter(routing.weights), dispatch, tokens=b * s)  # [T, h], partial under TP
        out = region.leave(y.view(b, s, h).to(x.dtype))
        if self.shared is not None:
            out = out + self._shared(x)
        if self.training and torch.is_grad_enabled():
            out = self._attach_aux(out, routing, dispatch)
        return out

    def _keep_in_sequence_order(self, experts: torch.Tensor, capacity: int) -> torch.Tensor:
        """Context parallelism: experts [b, s/cp, k] of this rank's tokens -> [b * s/cp * k] bool,
        which of its assignments are within capacity, first come first served in the whole
        micro-batch's token order (as on one device), from every CP rank's choices."""
        whole = self.context.whole(experts)  # [b, s, k]
        keep = within_capacity(whole.flatten(0, 1), self.moe.num_experts, capacity=capacity)
        return self.context.local(keep.view(whole.shape)).reshape(-1)

    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, h] -> [b, s, E] in fp32, outside autocast: the top-k choice and the softmax
        should not depend on bf16 rounding of the logits."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.shared_gate is not None:
            with torch.autocast(x.device.type, enabled=False):
                gate = torch.sigmoid(F.linear(x.float(), self.shared_gate.weight.float()))
            out = out * gate.to(out.dtype)
        return out

    def _attach_aux(self, out: torch.Tensor, routing, dispatch: Dispatch) -> torch.Tensor:
        counts, counted = dispatch.received, None
        if self.context is not None:  # the whole micro-batch's assignments per expert
            from pretrain.parallel import comm

            counts = comm.all_reduce(counts.clone(), self.context.group)
            counted = routing.experts.shape[0] * self.context.size
        aux = load_balancing_loss(routing, counts, counted_tokens=counted)
        z = z_loss(routing.logits)
        loss = None
        if self.moe.aux_coeff or self.moe.z_loss_coeff:
            loss = self.moe.aux_coeff * aux + self.moe.z_loss_coeff * z
        record = dict(tokens=dispatch.received, dropped=dispatch.dropped, aux=aux.detach(), z=z.detach())
        scale = self.aux_grad_scale() * self.region.aux_scale
        return _AuxLossGrad.apply(out, loss, scale, lambda: self.load.add(**record))

    # ---------------------------------------------------------------------------------------------
    # The experts: rows [N, h] in dispatch order -> [N, h] (partial under TP; fc2's bias on TP rank 0)

    def _run_experts(self, x: torch.Tensor, dispatch: Dispatch, *, fake: bool) -> torch.Tensor:
        rows = x[dispatch.tokens]  # [N, h]
        if self.ep is None or fake:
            return self._compute(rows, dispatch.counts, fake=fake)
        # Expert parallelism: [N, h] -> this rank's experts' rows from the whole EP group [M, h]
        # -> their outputs [M, h] -> [N, h] back here, in dispatch order.
        local_rows, counts, exchange = self.ep.dispatch(rows, dispatch.counts)
        return self.ep.combine(self._compute(local_rows, counts, fake=False), exchange)

    def _compute(self, rows: torch.Tensor, counts: torch.Tensor, *, fake: bool) -> torch.Tensor:
        """rows [N, h] sorted by this rank's experts, counts [experts held] -> outputs [N, h]."""
        experts = list(self.experts.values())
        widths = (rows.shape[1], experts[0].fc1.weight.shape[0], experts[0].fc2.weight.shape[1])
        grouped = self.moe.grouped_mm if self.moe.grouped_mm is not None else rows.device.type == "cuda"
        if grouped and not fake and grouped_mm_fits(rows, widths):
            return self._grouped(rows, counts, experts)
        if fake:  # no values to count: the planner sees every expert equally loaded
            n, e = rows.shape[0], len(experts)
            sizes = [n // e + (i < n % e) for i in range(e)]
        else:
            sizes = counts.tolist()
        return self._looped(rows, sizes, experts)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        # SwiGLU: [..., 2f/tp] = [gate; up] of this rank -> [..., f/tp]
        return kernels.swiglu(h) if self.swiglu else F.gelu(h, approximate="tanh")

    def _looped(self, rows: torch.Tensor, sizes: list[int], experts: list[nn.Module]) -> torch.Tensor:
        outputs = []
        # An expert without tokens runs too (on zero rows): every weight then gets a gradient
        # (zeros) in every micro-batch on every rank, as hook-driven reductions (DeepSpeed's ZeRO
        # buckets) need to issue the same collectives everywhere.
        for expert, part in zip(experts, rows.split(sizes)):
            # The weights only: under TP the layers' own forward would communicate.
            h = F.linear(part, expert.fc1.weight, expert.fc1.bias)
            outputs.append(F.linear(self._activation(h), expert.fc2.weight, self._output_bias(expert)))
        return torch.cat(outputs)

    def _output_bias(self, expert: nn.Module) -> torch.Tensor | None:
        """fc2's bias as this TP rank adds it to the expert's partial outputs (see _OncePerTP)."""
        bias = expert.fc2.bias
        if bias is None or self.region.size == 1:
            return bias
        return _OncePerTP.apply(bias, self.region.rank == 0)

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor, experts: list[nn.Module]) -> torch.Tensor:
        dtype = (
            torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) else rows.dtype
        )
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        w1 = torch.stack([e.fc1.weight for e in experts]).to(dtype)  # [E, parts f/tp, h]
        w2 = torch.stack([e.fc2.weight for e in experts]).to(dtype)  # [E, h, f/tp]
        h = F.grouped_mm(rows.to(dtype), w1.transpose(1, 2), offs=offsets)
        row_experts = None
        if experts[0].fc1.bias is not None:
            row_experts = torch.repeat_interleave(torch.arange(len(experts), device=rows.device), counts)
            h = h + torch.stack([e.fc1.bias for e in experts]).to(dtype)[row_experts]
        h = self._activation(_ContiguousGrad.apply(h))
        out = _ContiguousGrad.apply(F.grouped_mm(h, w2.transpose(1, 2), offs=offsets))
        if row_experts is not None:  # gpt2: fc1 and fc2 both have biases
            out = out + torch.stack([self._output_bias(e) for e in experts]).to(dtype)[row_experts]
        return out
