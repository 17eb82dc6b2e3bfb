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
    """Per-micro-batch saved bytes of the config's model at its tensor-parallel layout.

    Context parallelism: a rank holds seq_length / CP tokens of every sequence, so the model is
    probed at that length; with parallel.context_attention=all_gather each block also keeps the
    gathered K/V of the whole sequence for its backward (the ring keeps only its own block)."""
    p = config.parallel
    model = config.model
    if p.context > 1:
        model = dataclasses.replace(
            model, seq_length=model.seq_length // p.context, max_position_embeddings=model.positions
        )
    key = (
        repr(model),
        p.tensor,
        p.sequence_parallel and p.tensor > 1,
        config.train.micro_batch_size,
        config.compute_dtype,
        _weight_dtype(config),
    )
    if key not in _PROBES:  # --suggest asks again for every pipeline and ZeRO variant
        _PROBES[key] = _probe(model, *key[1:])
    probe = _PROBES[key]
    if p.context > 1 and p.context_attention == "all_gather":
        m, b, width = config.model, config.train.micro_batch_size, config.compute_dtype.itemsize
        gathered = 2 * b * (m.kv_heads // p.tensor) * m.seq_length * m.head_dim * width
        rows = b if config.data.document_attention_mask else 1
        mask = rows * model.seq_length * m.seq_length * width  # additive, [b | 1, 1, s / cp, s]
        probe = dataclasses.replace(probe, per_block=probe.per_block + gathered, per_chunk=mask)
    return probe


_PROBES: dict[tuple, ActivationProbe] = {}


def _weight_dtype(config: RunConfig) -> torch.dtype:
    from pretrain.strategy import weight_dtype

    return weight_dtype(config)


def _probe(model, tp: int, sequence_parallel: bool, micro_batch: int, compute_dtype, weight_dtype) -> ActivationProbe:
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (tp, sequence_parallel, micro_batch, compute_dtype, weight_dtype)
    with _fake_tensor_parallel_group(tp) as group, FakeTensorMode(allow_non_fake_inputs=True):
        one = _one_pass(model, 1, group, *shape)
        two = _one_pass(model, 2, group, *shape)
        middle = _one_pass(model, 1, group, *shape, ends=False)
    per_block = two["blocks"] - one["blocks"]
    return ActivationProbe(
        per_block=per_block,
        embedding=one["embedding"],
        head=one["total"] - one["blocks"] - one["embedding"],
        backward_last=max(0, one["peak"] - one["total"]),
        backward_middle=max(0, middle["peak"] - middle["total"]),
    )


def _one_pass(model, blocks, group, tp, sequence_parallel, micro_batch, compute_dtype, weight_dtype, ends=True) -> dict:
    """One micro-batch's forward and backward through `blocks` blocks (with the embedding and the
    output layer and loss when `ends`): the bytes autograd saved after the embedding, after the
    blocks and in all, and the highest live memory besides weights and gradients."""
    import pretrain.models.gpt as gpt_module
    from pretrain.planner.live_memory import LiveMemory, categories_of

    gpt = _build(model, blocks, group, tp, sequence_parallel, weight_dtype, ends)
    params = list(gpt.parameters())
    saved = _Saved({p.untyped_storage()._cdata for p in params})
    real_checkpoint = gpt_module.checkpoint

    def checkpoint(fn, *inputs, **kwargs):  # non-reentrant checkpointing keeps its inputs for the recompute
        for t in inputs:
            saved.add(t)
        return real_checkpoint(fn, *inputs, **kwargs)

    held = lambda: categories_of({"weights": params, "gradients": [p.grad for p in params]})
    mixed = compute_dtype != torch.float32
    gpt_module.checkpoint = checkpoint
    try:
        with LiveMemory(categorize=held) as tracker:
            with (
                torch.autocast("cpu", dtype=compute_dtype if mixed else torch.bfloat16, enabled=mixed),
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t),
            ):
                out, embedding, after_blocks = _forward(gpt, model, micro_batch, tp, sequence_parallel, ends, saved)
            out.backward(None if ends else torch.ones_like(out))
    finally:
        gpt_module.checkpoint = real_checkpoint
    return {
        "embedding": embedding,
        "blocks": after_blocks - embedding,
        "total": saved.bytes,
        "peak": tracker.peak.activations,
    }


def _build(model, blocks, group, tp, sequence_parallel, weight_dtype, ends):
    from pretrain.models.build import build_gpt
    from pretrain.models.gpt import Stage
    from pretrain.models.layers import DenseLayers
    from pretrain.parallel.tensor import TensorParallelLayers
    from pretrain.parallel.topology import grid_position

    topo = dataclasses.replace(grid_position(tp=tp, sequence_parallel=sequence_parallel), tp_group=group)
    layers = TensorParallelLayers(topo) if tp > 1 else DenseLayers()
    config = dataclasses.replace(model, num_layers=blocks)
    return build_gpt(config, init_seed=1, dtype=weight_dtype, layers=layers, stage=Stage(range(blocks), ends, ends))


def _forward(gpt, model, micro_batch, tp, sequence_parallel, ends, saved):
    """(output, saved bytes after the embedding, after the blocks): a whole model's loss, or a
    middle stage's output from the hidden state it receives."""
    if not ends:
        seq = model.seq_length // (tp if sequence_parallel else 1)
        # As the pipeline hands it over: in the stage's own dtype (pretrain/parallel/pipeline.py).
        dtype = next(gpt.parameters()).dtype
        x = torch.zeros((micro_batch, seq, model.hidden_size), dtype=dtype, requires_grad=True)
        return gpt.run_blocks(x), 0, saved.bytes
    tokens = torch.zeros((micro_batch, model.seq_length), dtype=torch.long)
    saved.add(tokens)  # the micro-batch the first stage keeps until its backward
    x = gpt.embed_tokens(tokens)
    embedding = saved.bytes
    y = gpt.run_blocks(x)
    after_blocks = saved.bytes
    return gpt.head_loss(y, tokens), embedding, after_blocks


@contextlib.contextmanager
def _fake_tensor_parallel_group(tp: int):
    """A tensor-parallel group for the probe's collectives: torch's fake backend (every
    collective returns at once), unless this process already runs a process group."""
    if tp == 1:
        yield None
        return
    if dist.is_initialized():
        raise RuntimeError("the activation probe needs its own process group: run the planner in its own process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
