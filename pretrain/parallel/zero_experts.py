"""Expert parallelism under ZeRO-1/2: DeepSpeed's expert parameter groups, run over our groups.

DeepSpeed's stage-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py) keeps routed experts in
parameter groups of their own: a group marked `moe` is flattened and partitioned over the expert
data-parallel group registered under the group's `name` (`_configure_moe_settings`), its
gradients are reduced over that group while the others go over the data-parallel group
(`average_tensor`), and its gradient norm is summed over the whole data-parallel group, which
counts every expert's partition once (`get_grad_norm_direct`, then `_average_expert_grad_norms`
averages equal values). That is exactly what our plain data parallelism does (pretrain/parallel/
data.py): dense weights over the data x context ranks, experts over the ranks holding the same
experts, both divided by the number of replicas.

DeepSpeed takes three things from a model to do so, and `prepare_expert_groups` gives them:

- the expert parameters marked as its own MoE layers mark theirs (deepspeed/moe/experts.py):
  `allreduce = False` and `group_name`;
- the optimizer's groups split by `split_params_into_different_moe_groups_for_optimizer`: the
  engine splits only the optimizer it builds itself, and asserts that a client optimizer's are
  (`_configure_moe_settings`);
- `has_moe_layers`, which the engine sets only on finding a `deepspeed.moe.layer.MoE` module in
  the model (engine.py `_configure_distributed_model`). Our MoE layers are not DeepSpeed's, so
  the module handed to it holds, beside our chunks, `_ExpertGroups`: a MoE instance without
  parameters, never run. The engine then calls its `set_deepspeed_parallelism`, DeepSpeed's hook
  for a MoE layer to make its groups exist (DeepSpeed's own MoE creates them there), right before
  it reads the group dicts it hands the optimizer.

The groups are ours, not DeepSpeed's: `set_deepspeed_parallelism` registers the topology's EP
group and expert data-parallel group in deepspeed.utils.groups' dicts under the group name.
DeepSpeed offers no public call taking existing groups; its creators (`groups.
_create_expert_and_data_parallel`, `_create_expert_data_and_model_parallel`) compute rank lists
from DeepSpeed's own tp-dp-pp rank order, which context parallelism (our tp-cp-dp-pp) breaks,
and would create a second copy of every group. The dicts are the ones its getters return
(`groups._get_expert_data_parallel_group_dict()`), and we overwrite the entry on every engine
built, since one process may build several (tests) and a stale group would be reused.

ZeRO-3 is refused with expert parallelism at validation (pretrain/config/moe.py): engine.py
`_validate_zero3_moe_compatibility` raises for any `deepspeed.moe.layer.MoE` module under stage 3
and supports only its AutoEP layers, which replace known Hugging Face MoE modules with
DeepSpeed's own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from pretrain.models.sharding import sharding
from pretrain.parallel.bootstrap import group_timeout
from pretrain.parallel.topology import Topology


def group_name(topo: Topology) -> str:
    """DeepSpeed's name of the expert groups (its MoE layers' `ep_size_<ep>`; some of its helpers
    read the EP size back from it)."""
    return f"ep_size_{topo.ep}"


def prepare_expert_groups(
    chunks: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    topo: Topology,
    *,
    num_experts: int,
    timeout_minutes: float | None,
) -> nn.Module:
    """Mark the routed experts' parameters, split the optimizer's groups (in place) into dense and
    expert groups, and return the module to hand DeepSpeed: the chunks and the `_ExpertGroups`
    marker (see the module docstring)."""
    name = group_name(topo)
    for chunk in chunks:
        for param in chunk.parameters():
            if sharding(param).expert:
                param.allreduce, param.group_name = False, name  # deepspeed.moe.utils.is_moe_param
    # The split names the expert groups by group_name and wants a name on every group it splits.
    named = [{**group, "name": f"dense_{i}"} for i, group in enumerate(optimizer.param_groups)]
    optimizer.param_groups = split_params_into_different_moe_groups_for_optimizer(named)
    marker = _ExpertGroups(topo, num_experts=num_experts, expert_dp_group=_expert_dp_group(topo, timeout_minutes))
    return nn.ModuleList([*chunks, marker])


def _expert_dp_group(topo: Topology, timeout_minutes: float | None) -> dist.ProcessGroup:
    """The ranks holding this rank's experts. The topology has no group when that is this rank
    alone (EP = data x context, the same on every rank), and DeepSpeed needs one to partition
    over: one-rank groups, every rank's created by every rank in rank order, since new_group is
    collective (a non-member's call only counts; torch builds no backend for it)."""
    if topo.expert_dp_group is not None:
        return topo.expert_dp_group
    timeout = group_timeout(timeout_minutes)
    alone = [dist.new_group([rank], timeout=timeout) for rank in range(topo.world_size)]
    return alone[topo.rank]


class _ExpertGroups(DeepSpeedMoE):
    """What tells DeepSpeed's engine that the model has experts, and gives it our groups for them.
    Holds no parameters and never runs."""

    def __init__(self, topo: Topology, *, num_experts: int, expert_dp_group: dist.ProcessGroup) -> None:
        # Not DeepSpeedMoE.__init__: it would build DeepSpeed's own gate and experts.
        nn.Module.__init__(self)
        self.ep_size, self.expert_group_name = topo.ep, group_name(topo)
        self.num_experts = num_experts  # the engine only lists it (for its own checkpoints)
        self._groups = {"ep": topo.ep_group, "expert_dp": expert_dp_group}

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine before it hands the groups to the optimizer."""
        name = self.expert_group_name
        for group, ranks, which in (
            (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, "ep"),
            (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, "expert_dp"),
        ):
            group[name] = self._groups[which]
            ranks[name] = dist.get_process_group_ranks(self._groups[which])

    def forward(self, *args, **kwargs):
        raise RuntimeError("_ExpertGroups only marks the model for DeepSpeed; it has no forward")
