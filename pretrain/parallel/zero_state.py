"""A ZeRO rank's own share of the training state, for checkpoints: what it writes, and where what
it reads goes, with nothing gathered over the data-parallel group.

Each rank holds, per parameter, a contiguous run of the parameter's flattened elements (the
parameter being this rank's tensor-parallel shard): the fp32 master weights and the two Adam
moments of elements [start, start + numel). A checkpoint stores exactly that run with its
offset, so any layout can put the parameter back together (pretrain/checkpoint/reader.py).

- ZeRO-1/2 flatten a parameter group and cut the flat tensor into one partition per DP rank,
  so a parameter may straddle two partitions. Under expert parallelism the routed experts'
  groups are cut over the ranks holding the same experts instead (pretrain/parallel/
  zero_experts.py); their names carry the global expert index, so the runs a rank saves or
  reads do not depend on the EP size either. DeepSpeed links each parameter to its slice of
  this rank's partition, if it has one: `param._hp_mapping`, a tensor_fragment whose
  `lp_fragment_address` is (start, numel) within the parameter and whose hp fragment and
  optimizer-state fragments are views of the flat fp32 partition and of the Adam state.
- ZeRO-3 partitions every parameter on its own: rank r holds elements [r*p, (r+1)*p) of the
  parameter flattened and zero-padded to a multiple of the DP size, p = param.partition_numel();
  its fp32 copy is a slice of the flat fp32 partition (the padding is not saved).

The Fragment tensors are views of DeepSpeed's buffers: saving writes them (or host copies of
them) as they are, loading copies into them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")

# read(name, key, start, numel) -> 1-D tensor: elements [start, start + numel) of the flattened
# TP shard of parameter `name` (key None) or of its optimizer state `key`.
Reader = Callable[[str, str | None, int, int], torch.Tensor]


@dataclass
class Fragment:
    """This rank's run of one parameter: elements [start, start + numel) of the flattened TP shard."""

    name: str
    param: nn.Parameter
    shape: list[int]  # the TP shard's shape (ZeRO-3: what the partitioned parameter stands for)
    start: int
    numel: int
    master: torch.Tensor  # fp32 [numel], a view of DeepSpeed's flat partition
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # exp_avg, exp_avg_sq: fp32 [numel] views


def local_fragments(optimizer, stage: int, chunk: nn.Module, *, with_state: bool) -> list[Fragment]:
    """This rank's fragments of chunk's parameters (parameters with none here are left out).
    with_state: include the Adam moments (call ensure_adam_state first)."""
    fragments = []
    for name, param in chunk.named_parameters():
        if stage < 3:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None or mapping.lp_fragment_address.numel == 0:
                continue  # wholly in another rank's partition
            address = mapping.lp_fragment_address
            state = {k: mapping.get_optim_state_fragment(k) for k in ADAM_KEYS} if with_state else {}
            fragments.append(
                Fragment(name, param, list(param.shape), address.start, address.numel, mapping.get_hp_fragment(), state)
            )
        else:
            size = param.partition_numel()
            start = optimizer._get_param_partition_rank(param) * size
            numel = min(size, param.ds_numel - start)
            if numel <= 0:
                continue  # this rank's partition is padding only

            def part(key=None, param=param, numel=numel):
                # DeepSpeed's own accessor of a parameter's fp32 partition (its public
                # get_local_fp32_param would copy an offloaded partition to the GPU).
                flat, _ = optimizer._get_fp32_opt_state_partition(
                    param, release_swap_buffers=False, optim_state_key=key
                )
                return flat.narrow(0, 0, numel)

            state = {k: part(k) for k in ADAM_KEYS} if with_state else {}
            fragments.append(Fragment(name, param, list(param.ds_shape), start, numel, part(), state))
    return fragments


def fp32_partitions(optimizer, stage: int) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group."""
    return optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups


def ensure_adam_state(optimizer, stage: int) -> None:
    """Adam state for every flat fp32 partition, and DeepSpeed's per-parameter views of it.
    torch's AdamW creates its state at the first step (a checkpoint may be saved or loaded
    before one), and DeepSpeed 0.19.8 links each parameter to its slice of the state once,
    right after stepping the first parameter group only, so the parameters of the other
    groups (ours: those without weight decay) are left unlinked: link them all again."""
    for flat in fp32_partitions(optimizer, stage):
        state = optimizer.optimizer.state[flat]
        if not state:  # what AdamW's first step would create
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    if stage < 3:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(optimizer) -> float:
    """The step count of the Adam moments (one per run: every partition steps together)."""
    for s in optimizer.optimizer.state.values():
        if "step" in s:
            return float(s["step"])
    return 0.0


def set_adam_step(optimizer, step: float) -> None:
    for s in optimizer.optimizer.state.values():
        if "step" in s:
            s["step"] = torch.tensor(step) if torch.is_tensor(s["step"]) else step


def load_local_state(optimizer, stage: int, chunks: list[nn.Module], *, read: Reader, step: float | None) -> None:
    """Set this rank's fp32 masters (and, when `step` is given, its Adam moments and step) from
    `read`, then derive the module's weights from the masters the way an optimizer step does:
    stages 1/2 copy each rank's partition into the 16-bit flat buffer and all-gather it over
    the group it is partitioned over (DP; an expert group's expert data-parallel ranks), so
    every rank holds whole 16-bit weights; stage 3 re-partitions its own weights."""
    if step is not None:
        ensure_adam_state(optimizer, stage)
    with torch.no_grad():
        for chunk in chunks:
            for frag in local_fragments(optimizer, stage, chunk, with_state=step is not None):
                frag.master.copy_(read(frag.name, None, frag.start, frag.numel))
                for key, view in frag.state.items():
                    view.copy_(read(frag.name, key, frag.start, frag.numel))
    if step is not None:
        set_adam_step(optimizer, step)
    if stage < 3:
        optimizer.update_lp_params()
    else:
        for group in range(len(optimizer.fp16_partitioned_groups_flat)):
            optimizer._reassign_or_swap_out_partitioned_parameters(group)  # masters -> module partitions
        optimizer.checkpoint_event_epilogue()  # re-gather the persistent (small, unpartitioned) weights


def share_bytes(optimizer, stage: int, chunks: list[nn.Module]) -> int:
    """Bytes of this rank's fragments (fp32 masters + both Adam moments): what a checkpoint of
    this rank holds."""
    numel = sum(f.numel for chunk in chunks for f in local_fragments(optimizer, stage, chunk, with_state=False))
    return numel * 4 * (1 + len(ADAM_KEYS))
