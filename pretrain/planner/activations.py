"""What autograd keeps between a forward and its backward, counted on the real model code.

A formula for activation memory (Korthikanti et al.'s 34 s b h per layer) describes one
implementation; ours keeps different tensors (bench/RESULTS.md, "Activation bytes per layer":
28 + 4t, not 34). So the planner asks the model itself: it runs one forward of a 1- and a
2-block GPT at the real hidden size, sequence length, micro-batch, tensor-parallel width,
sequence parallelism, recompute mode and dtype on fake tensors (no memory, no FLOPs) and counts
the storages autograd saves, each once, parameters excluded. The difference of the two is one
block; what is left is the embedding's (first stage) or the output layer and loss's (last
stage, its [tokens, vocab / t] fp32 logits).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.config import RunConfig


@dataclass(frozen=True)
class ActivationProbe:
    """Bytes one micro-batch keeps for its backward."""

    per_block: int
    embedding: int
    """The first stage's own share (token ids, embedding output)."""
    head: int
    """The last stage's own share (final norm, output layer and loss: the logits buffer)."""
    backward_last: int
    """What a backward through the output layer and loss adds, at its highest, on top of what
    the micro-batch saved (the logits' gradient, the blocks' input gradients)."""
    backward_middle: int
    """The same through blocks alone (a stage without the output layer)."""
    per_chunk: int = 0
    """Kept once per micro-batch by every model chunk, whatever its layers: context parallelism's
    all-gather attention mask (local queries x the whole sequence's keys, shared by the layers)."""


class _Saved:
    """Storages saved for backward, each counted once by identity (fake tensors have no address)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.storages = exclude, {}

    def add(self, t) -> None:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage._cdata not in self.exclude:
                self.storages[storage._cdata] = storage.nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def probe_activations(config: RunConfig) -> ActivationProbe:
    """Per-micro-batch saved bytes of the config's model at its tensor-, context- and
    expert-parallel layout.

    Context parallelism: the real context-parallel model runs, over a fake CP group, on the full
    sequence's tokens and keeps this rank's seq_length / CP of them, so what its attention saves
    is the code's own: the all-gather's gathered K/V of the whole sequence per layer (not under
    recompute, which keeps the attention core's local inputs instead) and its one additive mask
    per forward (`per_chunk`), the ring's own block and log-sum-exp.

    Expert parallelism: the model is built with the rank's num_experts / EP experts. On fake
    tensors the MoE layer runs its own experts on its own rows instead of exchanging them
    (pretrain/models/moe.py): with equal load an EP rank receives as many token-expert rows as it
    sends, so the experts keep the same bytes; what differs is the fp32-weight run's per-micro-
    batch 16-bit copies of the expert weights (autocast), of the rank's experts only. Uneven
    routing puts more rows on some ranks than this counts."""
    p = config.parallel
    key = (
        repr(config.model),
        p.tensor,
        p.expert,
        p.context,
        p.context_attention if p.context > 1 else None,
        p.context > 1 and config.data.document_attention_mask,
        p.sequence_parallel and p.tensor > 1,
        config.train.micro_batch_size,
        config.compute_dtype,
        _weight_dtype(config),
    )
    if key not in _PROBES:  # --suggest asks again for every pipeline and ZeRO variant
        _PROBES[key] = _probe(config.model, Shape(*key[1:]))
    return _PROBES[key]


@dataclass(frozen=True)
class Shape:
    """What the probe's model is built and run at, besides the model config."""

    tp: int
    ep: int
    cp: int
    context_attention: str | None
    documents: bool
    """Pass document numbers (context parallelism's mask then has a row per sequence)."""
    sequence_parallel: bool
    micro_batch: int
    compute_dtype: torch.dtype
    weight_dtype: torch.dtype


_PROBES: dict[tuple, ActivationProbe] = {}


def _weight_dtype(config: RunConfig) -> torch.dtype:
    from pretrain.strategy import weight_dtype

    return weight_dtype(config)


def _probe(model, shape: Shape) -> ActivationProbe:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _fake_groups(shape.tp, shape.cp) as groups, FakeTensorMode(allow_non_fake_inputs=True):
        one = _one_pass(model, 1, groups, shape)
        two = _one_pass(model, 2, groups, shape)
        middle = _one_pass(model, 1, groups, shape, ends=False)
    per_block = two["blocks"] - one["blocks"]
    return ActivationProbe(
        per_block=per_block,
        embedding=one["embedding"],
        head=one["total"] - one["blocks"] - one["embedding"],
        backward_last=max(0, one["peak"] - one["total"]),
        backward_middle=max(0, middle["peak"] - middle["total"]),
        # what the blocks keep once whatever their number (context parallelism's mask)
        per_chunk=max(0, one["blocks"] - per_block),
    )


def _one_pass(model, blocks: int, groups, shape: Shape, ends: bool = True) -> dict:
    """One micro-batch's forward and backward through `blocks` blocks (with the embedding and the
    output layer and loss when `ends`): the bytes autograd saved after the embedding, after the
    blocks and in all, and the highest live memory besides weights and gradients."""
    import pretrain.models.gpt as gpt_module
    from pretrain.planner.live_memory import LiveMemory, categories_of

    gpt = _build(model, blocks, groups, shape, ends)
    params = list(gpt.parameters())
    saved = _Saved({p.untyped_storage()._cdata for p in params})
    real_checkpoint = gpt_module.checkpoint

    def checkpoint(fn, *inputs, **kwargs):  # non-reentrant checkpointing keeps its inputs for the recompute
        for t in inputs:
            saved.add(t)
        return real_checkpoint(fn, *inputs, **kwargs)

    held = lambda: categories_of({"weights": params, "gradients": [p.grad for p in params]})
    compute_dtype = shape.compute_dtype
    mixed = compute_dtype != torch.float32
    gpt_module.checkpoint = checkpoint
    try:
        with LiveMemory(categorize=held) as tracker:
            with (
                torch.autocast("cpu", dtype=compute_dtype if mixed else torch.bfloat16, enabled=mixed),
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t),
            ):
                out, embedding, after_blocks = _forward(gpt, model, shape, ends, saved)
            out.backward(None if ends else torch.ones_like(out))
    finally:
        gpt_module.checkpoint = real_checkpoint
    return {
        "embedding": embedding,
        "blocks": after_blocks - embedding,
        "total": saved.bytes,
        "peak": tracker.peak.activations,
    }


def _build(model, blocks: int, groups, shape: Shape, ends: bool):
    from pretrain.models.build import build_gpt
    from pretrain.models.gpt import Stage
    from pretrain.models.layers import DenseLayers
    from pretrain.parallel.context import ContextParallel
    from pretrain.parallel.expert import ExpertParallel
    from pretrain.parallel.tensor import TensorParallelLayers
    from pretrain.parallel.topology import grid_position

    topo = grid_position(
        tp=shape.tp,
        cp=shape.cp,
        dp=shape.ep,
        ep=shape.ep,
        sequence_parallel=shape.sequence_parallel,
        context_attention=shape.context_attention or "all_gather",
    )
    topo = dataclasses.replace(topo, tp_group=groups[0], cp_group=groups[1])
    layers = TensorParallelLayers(topo) if shape.tp > 1 else DenseLayers(context=ContextParallel.of(topo))
    layers.expert_parallel = ExpertParallel.of(topo)  # the rank's experts (no group: fake runs local)
    config = dataclasses.replace(model, num_layers=blocks)
    return build_gpt(
        config, init_seed=1, dtype=shape.weight_dtype, layers=layers, stage=Stage(range(blocks), ends, ends)
    )


def _forward(gpt, model, shape: Shape, ends: bool, saved):
    """(output, saved bytes after the embedding, after the blocks): a whole model's loss, or a
    middle stage's output from the hidden state it receives (this rank's s / CP (/ TP under
    sequence parallelism) tokens)."""
    b = shape.micro_batch
    segments = torch.zeros((b, model.seq_length), dtype=torch.long) if shape.documents else None
    if not ends:
        seq = model.seq_length // shape.cp // (shape.tp if shape.sequence_parallel else 1)
        # As the pipeline hands it over: in the stage's own dtype (pretrain/parallel/pipeline.py).
        dtype = next(gpt.parameters()).dtype
        x = torch.zeros((b, seq, model.hidden_size), dtype=dtype, requires_grad=True)
        return gpt.run_blocks(x, segments), 0, saved.bytes
    tokens = torch.zeros((b, model.seq_length), dtype=torch.long)
    saved.add(tokens)  # the micro-batch the first stage keeps until its backward
    x = gpt.embed_tokens(tokens)
    embedding = saved.bytes
    y = gpt.run_blocks(x, segments)
    after_blocks = saved.bytes
    return gpt.head_loss(y, tokens), embedding, after_blocks


@contextlib.contextmanager
def _fake_groups(tp: int, cp: int):
    """(TP group, CP group) for the probe's collectives, rank 0 of a tp x cp grid over torch's
    fake backend (every collective returns at once, its outputs of the right shape), unless this
    process already runs a process group; None for a size of 1."""
    if tp * cp == 1:
        yield None, None
        return
    if dist.is_initialized():
        raise RuntimeError("the activation probe needs its own process group: run the planner in its own process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * cp)
    try:
        tp_group = dist.new_group(list(range(tp))) if tp > 1 else None
        cp_group = dist.new_group([i * tp for i in range(cp)]) if cp > 1 else None
        yield tp_group, cp_group
    finally:
        dist.destroy_process_group()
