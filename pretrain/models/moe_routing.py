"""Routing for the mixture-of-experts layer as pure functions over tensors: which experts each
token goes to and with what weight, the router's auxiliary losses, and the dispatch plan that
orders the token-expert assignments by expert (capacity drops included).

Shapes: T tokens (batch x sequence, flattened), E experts, k = top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config.moe import MoEConfig


@dataclass
class Routing:
    """One micro-batch's routing decision."""

    experts: torch.Tensor
    """[T, k] int64: the experts each token goes to."""
    weights: torch.Tensor
    """[T, k] fp32: their weights in the token's output (differentiable)."""
    balance_probs: torch.Tensor
    """[T, E] fp32: the router's probabilities P the load-balancing loss averages (softmax, or
    the sigmoid scores normalised over experts)."""
    logits: torch.Tensor
    """[T, E] fp32: the router logits (the z-loss's input)."""


def route(logits: torch.Tensor, moe: MoEConfig, *, bias: torch.Tensor | None = None) -> Routing:
    """Top-k routing of fp32 logits [T, E]. Softmax: the k largest probabilities (Mixtral's
    order of operations). Sigmoid: the k largest of score + bias chosen, weighted by the plain
    scores (DeepSeek-V3: the bias steers the load without entering the output)."""
    if moe.router == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, moe.top_k, dim=-1)
        balance = probs
    else:
        scores = torch.sigmoid(logits)
        choice = scores if bias is None else scores + bias
        experts = torch.topk(choice, moe.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        balance = scores / scores.sum(dim=-1, keepdim=True)
    if moe.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(experts=experts, weights=weights, balance_probs=balance, logits=logits)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: the token-expert assignments each expert received (a fixed-size result, so
    it also runs on fake tensors, where bincount's size would depend on the data)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(routing: Routing, counts: torch.Tensor, *, counted_tokens: int | None = None) -> torch.Tensor:
    """Switch/GShard: E x sum_e f_e P_e, f_e = counts_e / (T k) (not differentiable), P_e the mean
    router probability of e. 1.0 at perfect balance (f = P = 1/E); E when one expert takes all.
    Megatron's normalisation (Hugging Face's load_balancing_loss_func is k times this).

    `counted_tokens`: the tokens `counts` were taken over, when more than the routing's own (under
    context parallelism, the whole micro-batch's; default T). P_e stays the mean over the routing's
    own tokens: each of n ranks holding T/n of the micro-batch's tokens gets a value whose mean
    over the ranks is the micro-batch's loss, and whose gradient per token is n times the
    micro-batch loss's, which the average of gradients over those ranks divides back."""
    tokens, num_experts = routing.balance_probs.shape
    fraction = counts.to(torch.float32) / ((counted_tokens or tokens) * routing.experts.shape[1])
    return num_experts * (fraction * routing.balance_probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class Dispatch:
    """The token-expert assignments that run, grouped by expert.

    `order` [N] indexes the flattened [T * k] assignments (token t's slot j is t * k + j): expert
    0's first, in token order, then expert 1's, ...; `tokens` [N] = order // k, the token each
    row reads; `counts` [E] the rows per expert (after capacity drops); `dropped` the number of
    assignments over capacity (a 0-d tensor)."""

    order: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    received: torch.Tensor
    """[E] assignments each expert was chosen for, before any drop (the load metrics)."""


def plan_dispatch(
    experts: torch.Tensor, num_experts: int, *, capacity: int | None, keep: torch.Tensor | None = None
) -> Dispatch:
    """Sort the assignments by expert (stable: token order within an expert) and, with a
    capacity, drop each expert's assignments past it. `keep` [T * k] bool: which assignments run,
    decided elsewhere (under context parallelism, over the whole micro-batch: within_capacity);
    default within_capacity of these assignments."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    received = expert_counts(experts, num_experts)
    dropped = torch.zeros((), dtype=torch.long, device=flat.device)
    counts = received
    if keep is None and capacity is not None and capacity < flat.numel():
        keep = within_capacity(experts, num_experts, capacity=capacity)
    if keep is not None:
        order = order[keep[order]]
        counts = expert_counts(flat[order], num_experts)
        dropped = (received - counts).sum()
    return Dispatch(order=order, tokens=order // k, counts=counts, dropped=dropped, received=received)


def within_capacity(experts: torch.Tensor, num_experts: int, *, capacity: int) -> torch.Tensor:
    """experts [T, k] -> [T * k] bool: whether each assignment is among its expert's first
    `capacity` in the flattened order (token t's slot j is t * k + j)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    received = expert_counts(experts, num_experts)
    starts = torch.cumsum(received, 0) - received
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return position < capacity


def combine(rows: torch.Tensor, weights: torch.Tensor, dispatch: Dispatch, *, tokens: int) -> torch.Tensor:
    """rows [N, h] (the experts' outputs in dispatch order) -> [T, h]: each token's weighted sum
    over its slots. Dropped slots add nothing. No atomic adds (index_copy into the [T, k, h]
    slots, then a sum over k), so the result does not depend on thread timing."""
    k = weights.shape[1]
    weighted = rows * weights.reshape(-1)[dispatch.order].unsqueeze(1).to(rows.dtype)
    slots = rows.new_zeros((tokens * k, rows.shape[1])).index_copy(0, dispatch.order, weighted)
    return slots.view(tokens, k, -1).sum(dim=1)
