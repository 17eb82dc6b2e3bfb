"""What a checkpoint holds of one rank, in the form its training strategy keeps it.

A training strategy (pretrain/strategy.py) hands the checkpoint code one of these; saving and
loading call its `take_shard` and `restore` and never ask which strategy it came from:

ReplicatedState    whole TP shards on every data-parallel replica (plain data parallelism; also
                   weights-only tools, with no optimizer): the DP ranks of a position split the
                   writing between them, and loading reads a position's shards.
PartitionedState   optimizer state partitioned over the DP ranks (ZeRO): each rank writes and
                   reads its own fragments of the fp32 masters and Adam moments.

Context-parallel ranks hold the same weights as data-parallel replicas do, and count as replicas
here (`topo.replicas`, `topo.replica_rank`): nothing in a checkpoint depends on the CP size, so
one saved at CP = 2 loads at CP = 1 like one saved at DP = 2 does.

`load_checkpoint` (here) and `save_checkpoint` (saver.py) are the one-call forms; their
`model=`/`optimizer=` stand for a ReplicatedState.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint.files import FileChecksum, model_file, optimizer_file, write_safetensors
from pretrain.checkpoint.restore import load_state, restore_partitioned, restore_replicated
from pretrain.config import RunConfig
from pretrain.models.sharding import full_shape, sharding
from pretrain.parallel.topology import Topology


@dataclass
class Shard:
    """What one writer puts in its files: tensors on the host, keyed by global name."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)  # "{name}/{key}"
    specs: dict[str, list[int] | None] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # full (unsharded) shapes
    # ZeRO: key -> [start, numel], the run of the flattened TP shard a 1-D tensor holds
    fragments: dict[str, list[int]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.weights, self.optimizer) for t in d.values())

    def write(self, directory: Path, *, tp: int, pp: int, part: int) -> dict[str, FileChecksum]:
        """Write this shard's files; returns file name -> its size and CRC-32."""
        fragments = {k: v for k, v in self.fragments.items() if k in self.weights}
        name = model_file(tp, pp, part)
        sums = {
            name: write_safetensors(directory / name, self.weights, shard_metadata(self.specs, self.shapes, fragments))
        }
        if self.optimizer:
            fragments = {k: v for k, v in self.fragments.items() if k in self.optimizer}
            name = optimizer_file(tp, pp, part)
            sums[name] = write_safetensors(
                directory / name, self.optimizer, {"fragments": json.dumps(fragments)} if fragments else None
            )
        return sums


def shard_metadata(specs: dict, shapes: dict, fragments: dict | None = None) -> dict[str, str]:
    """A weight file's metadata: how each tensor splits across TP ranks, its full shape, and for
    ZeRO fragments which run of the flattened TP shard the stored 1-D tensor is."""
    meta = {"format": "pretrain", "specs": json.dumps(specs), "shapes": json.dumps(shapes)}
    if fragments:
        meta["fragments"] = json.dumps(fragments)
    return meta


def assign_parts(sizes: dict[str, int], parts: int) -> dict[str, int]:
    """Which of `parts` writers writes each tensor: largest first, to the least loaded one.
    Deterministic, so every DP rank of a position computes the same split without talking."""
    load, owner = [0] * parts, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        part = min(range(parts), key=lambda i: (load[i], i))
        owner[name] = part
        load[part] += sizes[name]
    return owner


class HostBuffers:
    """Host copies of this rank's tensors, kept from one save to the next: copying into memory
    that is already mapped runs at memory bandwidth, while fresh allocations fault in every page
    first (measured here: 1.1 GB in 0.03-0.05 s instead of 0.21 s). A save starts only after the
    previous write finished, so the buffers are free again by then."""

    def __init__(self, *, copy: bool = True) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.copies = copy  # False for a synchronous save: training waits anyway, write the tensors as they are

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A host copy of t that training cannot change under us (it updates weights in place)."""
        t = t.detach()
        if not self.copies and t.device.type == "cpu":
            return t.contiguous()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = self.buffers[key] = torch.empty(
                t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda"
            )
        return buffer.copy_(t, non_blocking=t.device.type == "cuda")


def _spec(param) -> list[int] | None:
    """The TP split as meta.json stores it."""
    spec = sharding(param).tp
    return None if spec is None else [spec.dim, spec.parts]


def take_replicated_shard(
    chunks: list[torch.nn.Module], *, optimizer, topo: Topology, host: HostBuffers | None = None
) -> Shard:
    """Whole TP shards on every DP replica (weights, and the optimizer's state of them when
    given): this rank's part of its position's tensors, copied to the host (no communication)."""
    host = host or HostBuffers()
    params = saved_parameters(chunks)
    states = {n: optimizer.state.get(p, {}) for n, p in params.items()} if optimizer is not None else {}
    written = _written(params, topo)
    shard = Shard()
    for name, param in params.items():
        if name not in written:
            continue
        shard.weights[name] = host.copy(name, param)
        shard.specs[name] = _spec(param)
        shard.shapes[name] = list(full_shape(param, topo.tp))
        for key, value in states.get(name, {}).items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            shard.optimizer[f"{name}/{key}"] = host.copy(f"{name}/{key}", value)
    return shard


def saved_parameters(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """name -> the parameter a checkpoint stores under it. A name is held by one chunk, except the
    tied embedding's when a rank holds both of its copies (zb-v's rank 0: the first stage's
    chunk 0 and the last stage's chunk 1): the copies are equal (pretrain/parallel/tied.py), so
    the first chunk's is saved, once, as a rank holding only one copy saves it."""
    params: dict[str, torch.nn.Parameter] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            params.setdefault(name, p)
    return params


def _written(params: dict, topo: Topology) -> set[str]:
    """The names this rank writes. Data- and context-parallel ranks hold the same weights: they
    split the writing alike. Under expert parallelism the routed experts' weights (keyed by global
    expert index, so a checkpoint does not depend on the EP size) are split among the replicas
    holding the same experts: this rank is replica_rank // ep of replicas // ep of them (CP is 1
    with MoE), and the other weights among all replicas as without EP."""
    split = topo.ep > 1
    experts = {n: p.numel() for n, p in params.items() if split and sharding(p).expert}
    others = {n: p.numel() for n, p in params.items() if n not in experts}
    owner = assign_parts(others, topo.replicas)
    mine = {n for n, part in owner.items() if part == topo.replica_rank}
    if experts:
        owner = assign_parts(experts, topo.replicas // topo.ep)
        mine |= {n for n, part in owner.items() if part == topo.replica_rank // topo.ep}
    return mine


def take_partitioned_shard(
    chunks: list[torch.nn.Module], *, engine, topo: Topology, host: HostBuffers | None = None
) -> Shard:
    """Partitioned optimizer state (ZeRO): this rank's fragments, fp32 masters and Adam
    moments, as they lie in the engine's partitions (pretrain/parallel/zero_state.py)."""
    host = host or HostBuffers()
    shard = Shard()
    step = torch.tensor(engine.adam_step())
    # One fragment per name, the first chunk's where this rank has one. zb-v's rank 0 holds the
    # tied embedding twice (equal copies, pretrain/parallel/tied.py, at two places of the flat
    # buffer): a rank whose partition has a run of the second copy only writes that run, so that
    # resuming at this layout every rank finds its own runs in its own files. The first copy's
    # runs cover the tensor on their own; the second's may overlap them, with equal values.
    for chunk in chunks:
        for frag in engine.local_fragments(chunk):
            name = frag.name
            if name in shard.weights:
                continue  # the tied embedding's second copy, the first's run written
            shard.weights[name] = host.copy(name, frag.master)
            shard.fragments[name] = [frag.start, frag.numel]
            shard.specs[name] = _spec(frag.param)
            shard.shapes[name] = list(full_shape(frag.param, topo.tp, frag.shape))
            for key, value in frag.state.items():
                shard.optimizer[f"{name}/{key}"] = host.copy(f"{name}/{key}", value)
                shard.fragments[f"{name}/{key}"] = [frag.start, frag.numel]
            shard.optimizer[f"{name}/step"] = step
    return shard


def _chunks(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


class ReplicatedState:
    def __init__(self, model, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.chunks, self.optimizer = _chunks(model), optimizer

    @property
    def has_optimizer(self) -> bool:
        return self.optimizer is not None

    def take_shard(self, *, topo: Topology, host: HostBuffers) -> Shard:
        return take_replicated_shard(self.chunks, optimizer=self.optimizer, topo=topo, host=host)

    def restore(self, step_dir: Path, meta: dict, *, config: RunConfig, topo: Topology, with_state: bool) -> None:
        restore_replicated(
            step_dir, self.chunks, optimizer=self.optimizer, config=config, topo=topo, with_state=with_state
        )


class PartitionedState:
    """`engine`: what holds the partitions (pretrain/parallel/zero.py's ZeroEngine)."""

    has_optimizer = True

    def __init__(self, model, engine) -> None:
        self.chunks, self.engine = _chunks(model), engine

    def take_shard(self, *, topo: Topology, host: HostBuffers) -> Shard:
        return take_partitioned_shard(self.chunks, engine=self.engine, topo=topo, host=host)

    def restore(self, step_dir: Path, meta: dict, *, config: RunConfig, topo: Topology, with_state: bool) -> None:
        restore_partitioned(
            step_dir, meta, self.chunks, engine=self.engine, config=config, topo=topo, with_state=with_state
        )


def load_checkpoint(
    step_dir: str | Path, *, config: RunConfig, topo: Topology | None = None, state=None, model=None, optimizer=None
) -> dict:
    """Restore `state` (or the ReplicatedState of model and optimizer) from step_dir at any
    layout; returns its meta. Collective when the state is partitioned."""
    return load_state(step_dir, state or ReplicatedState(model, optimizer), config=config, topo=topo)
