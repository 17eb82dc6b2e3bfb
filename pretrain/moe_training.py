"""What a training step does for the mixture-of-experts layers (model.moe), beside any strategy.

`with_experts(strategy, ...)` wraps the training strategy (plain data parallelism or ZeRO) the
trainer holds; everything but `step` is the wrapped strategy's own. It

- scales the auxiliary losses' gradient as the step scales the language-model loss: the
  schedule divides each micro-batch's loss by the micro-batches per step, and in fp16 the loss
  scaler multiplies it (the wrapped chunks' `scale`); a layer attaches its aux-loss gradient to
  its output, so it reaches the backward on whatever pipeline stage the layer is;
- after each optimizer step, sums every MoE layer's record (tokens per expert, drops, aux and z
  losses) over all ranks in one all-reduce: tensor-parallel ranks hold the same routing, so only
  TP rank 0 adds its record; data-parallel ranks and micro-batches add up; so do context-parallel
  ranks, each with its own tokens' counts and its aux and z values (whose mean over the CP ranks
  is the micro-batch's, pretrain/models/moe.py) and counting each micro-batch once, so the sums
  over the micro-batch count are still means; each pipeline stage fills its own layers' rows;
- moves the sigmoid routers' biases towards equal load with those global counts (DeepSeek-V3),
  unless the step was skipped, so every rank applies the same update;
- returns the figures with the step's record: `moe_loss` (the weighted aux + z losses the
  objective added, per micro-batch), `moe_aux_loss` and `moe_z_loss` (their raw values, mean
  over layers; the balance loss is 1.0 when balanced), `moe_imbalance` (the largest max/mean
  tokens per expert of any layer), `moe_dropped_tokens` (with a capacity) and `moe_layers`
  (per layer: tokens per expert, imbalance, aux and z loss, dropped).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.config import RunConfig
from pretrain.models.moe import MoE
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


def moe_layers(chunks) -> dict[int, MoE]:
    """The MoE layers of this rank's model chunks, by global block index."""
    return {int(i): block.mlp for chunk in chunks for i, block in chunk.blocks.items() if isinstance(block.mlp, MoE)}


def with_experts(strategy, config: RunConfig, topo: Topology, *, accumulation: int):
    """`strategy` itself for a dense model, else wrapped in ExpertBalancing."""
    if config.model.moe is None:
        return strategy
    return ExpertBalancing(strategy, config, topo, accumulation=accumulation)


class ExpertBalancing:
    def __init__(self, strategy, config: RunConfig, topo: Topology, *, accumulation: int) -> None:
        self.strategy, self.config, self.topo = strategy, config, topo
        self.moe = config.model.moe
        self.layers = moe_layers(strategy.chunks)
        self.layer_ids = self.moe.layer_ids(config.model.num_layers)
        loss_scale = getattr(strategy.chunks[0], "scale", None) or (lambda: 1.0)
        for layer in self.layers.values():
            layer.aux_grad_scale = lambda: float(loss_scale()) / accumulation

    def __getattr__(self, name: str):
        return getattr(self.strategy, name)

    def step(self, lr: float, **kwargs) -> dict:
        record = self.strategy.step(lr, **kwargs)
        totals = self._totals()
        for layer in self.layers.values():
            layer.load.reset()
        if totals is None:  # fake tensors (the planner's dry run): nothing to count
            return record
        if record["problem"] is None and not record.get("skipped"):
            self._update_biases(totals)
        return {**record, **expert_metrics(totals, self.layer_ids, self.config)}

    def _totals(self) -> torch.Tensor | None:
        """[MoE layers, E + 4] fp64 summed over all ranks (see ExpertLoad.as_row)."""
        device = self.topo.device
        rows = torch.zeros((len(self.layer_ids), self.moe.num_experts + 4), dtype=torch.float64, device=device)
        if self.topo.tp_rank == 0:
            for row, layer_id in enumerate(self.layer_ids):
                if layer_id in self.layers:
                    rows[row] = self.layers[layer_id].load.as_row(device)
        if self.topo.world_size > 1 and dist.is_initialized():
            with waiting():
                dist.all_reduce(rows)
        from torch._subclasses.fake_tensor import is_fake

        return None if is_fake(rows) else rows.cpu()

    @torch.no_grad()
    def _update_biases(self, totals: torch.Tensor) -> None:
        if self.moe.router != "sigmoid":
            return
        e = self.moe.num_experts
        for row, layer_id in enumerate(self.layer_ids):
            if layer_id in self.layers:
                tokens = totals[row, :e]
                bias = self.layers[layer_id].router.expert_bias
                step = self.moe.bias_update_rate * torch.sign(tokens.mean() - tokens)
                bias.add_(step.to(device=bias.device, dtype=bias.dtype))


def expert_metrics(totals: torch.Tensor, layer_ids: list[int], config: RunConfig) -> dict:
    """The step's MoE figures from the summed records (see the module docstring)."""
    moe = config.model.moe
    e = moe.num_experts
    layers = {}
    for row, layer_id in zip(totals.tolist(), layer_ids):
        tokens, (dropped, aux, z, micro) = row[:e], row[e:]
        micro = max(micro, 1.0)
        mean = sum(tokens) / e
        layers[str(layer_id)] = {
            "tokens_per_expert": [int(t) for t in tokens],
            "imbalance": max(tokens) / mean if mean else 0.0,
            "aux_loss": aux / micro,
            "z_loss": z / micro,
            "dropped_tokens": int(dropped),
        }
    values = list(layers.values())
    aux = sum(v["aux_loss"] for v in values)
    z = sum(v["z_loss"] for v in values)
    out = {
        "moe_loss": moe.aux_coeff * aux + moe.z_loss_coeff * z,
        "moe_aux_loss": aux / len(values),
        "moe_z_loss": z / len(values),
        "moe_imbalance": max(v["imbalance"] for v in values),
        "moe_layers": layers,
    }
    if moe.capacity_factor is not None:
        out["moe_dropped_tokens"] = sum(v["dropped_tokens"] for v in values)
    return out
