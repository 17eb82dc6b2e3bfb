"""One rank of a run of any size, simulated in this process: a fake process group of the real
world size and fake tensors, so the real model, schedule and strategy run at full size without
allocating anything or computing anything (dry_run.py).

- torch's fake process group backend: every collective returns at once and leaves its tensors
  as they are, so one process can be rank 93 of 128 with every group the grid creates.
- FakeTensorMode: tensors carry shape, dtype, device and storage size but no data, so the 13B
  model and its logits cost nothing but Python time.
- Values a fake tensor cannot have: `.item()` (the loss, the gradient norm, DeepSpeed's overflow
  flag) is answered here (`_ScalarAnswers`); ZeRO-3's check that all ranks agree on the module
  order has no other rank to ask and is skipped (`_no_cross_rank_checks`).
- DeepSpeed casts the module it is handed (`module.to(device)`, `.bfloat16()`); the weights are
  already built in that dtype on that device (ZeroEngine.weight_dtype), so each cast returns the
  parameter itself, but torch's Module._apply still swaps a fake parameter for itself, which
  fails on the weak references fake tensors carry. `_casts_in_place` makes a cast that changes
  nothing do nothing.
- Where the framework allocates otherwise on CPU than on a GPU, the GPU's way (`gpu_allocations`):
  the simulated device is the CPU, but the rank simulated is a GPU's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from pretrain.config import RunConfig


@contextlib.contextmanager
def fake_process_group(*, rank: int, world_size: int) -> Iterator[None]:
    """This process as `rank` of `world_size` over torch's fake backend (its peers exist only
    in what the collectives return: their inputs, unchanged)."""
    # Importing it registers the "fake" backend; torch keeps it under testing.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _ScalarAnswers(TorchDispatchMode):
    """`.item()` of a fake tensor: its constant when fake mode kept one (small tensors made from
    Python numbers), else zero (False for a bool): a finite loss and gradient norm, no overflow
    flag raised (ours and DeepSpeed's are counts or 0/1 numbers), so the step is taken and the
    optimizer state allocated as in a healthy run. A bool check of "all finite" would hear no:
    the dry run asks none (the weights check before a save is not part of the snapshot)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            constant = getattr(args[0], "constant", None)
            if constant is not None:
                return constant.item()
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


def _apply_in_place(module: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """Module._apply for casts that change nothing: parameters are kept, buffers assigned."""
    if recurse:
        for child in module.children():
            _apply_in_place(child, fn)
    for name, param in module._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            converted = fn(param)
        if converted is not param:
            raise NotImplementedError(
                f"the dry run expects the weights built in the dtype and on the device the strategy "
                f"uses, but {type(module).__name__}.{name} ({param.dtype}, {param.device}) was converted "
                f"to {converted.dtype}, {converted.device}"
            )
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = fn(buffer)
    return module


@contextlib.contextmanager
def _casts_in_place() -> Iterator[None]:
    original = nn.Module._apply
    nn.Module._apply = _apply_in_place
    try:
        yield
    finally:
        nn.Module._apply = original


@contextlib.contextmanager
def _no_cross_rank_checks() -> Iterator[None]:
    """ZeRO-3 checks before each forward that every rank traces the same modules, by
    broadcasting rank 0's list; over a fake process group a broadcast delivers this rank's own
    values, so the check compares a rank with itself at best (and fails on any rank but 0, whose
    placeholder values arrive unchanged). There is no other rank to disagree: skip it."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    original = coordinator.assert_ints_same_as_other_ranks
    coordinator.assert_ints_same_as_other_ranks = lambda ints: None
    try:
        yield
    finally:
        coordinator.assert_ints_same_as_other_ranks = original


@contextlib.contextmanager
def fake_tensors(*, deepspeed: bool = False) -> Iterator[FakeTensorMode]:
    """Every tensor made inside is fake; `.item()` answered; no-op casts do nothing.
    `deepspeed`: a ZeRO run (DeepSpeed's cross-rank checks are skipped)."""
    with contextlib.ExitStack() as stack:
        # Reading a fake tensor's data pointer only warns (DeepSpeed checks alignment with it).
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r".*data pointer of FakeTensor.*")
        if deepspeed:
            stack.enter_context(_no_cross_rank_checks())
        mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(_ScalarAnswers())
        stack.enter_context(_casts_in_place())
        yield mode


@contextlib.contextmanager
def gpu_allocations() -> Iterator[None]:
    """Allocate as a GPU rank does where the framework allocates otherwise on CPU: the fused
    loss's [tokens, vocab] fp32 logits buffer is kept from step to step on CPU only
    (pretrain/models/loss.py ScratchBuffer: glibc would unmap and fault it in again every step),
    while a GPU takes it from the caching allocator per micro-batch and frees it after the
    backward. Counted as kept, it would add a whole logits buffer (1 GB for llama_1b) to what a
    simulated GPU holds between steps. Real CPU runs measured for comparison use it too."""
    from pretrain.models.loss import ScratchBuffer

    original = ScratchBuffer.take
    ScratchBuffer.take = lambda self, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)
    try:
        yield
    finally:
        ScratchBuffer.take = original


def synthetic_batches(config: RunConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of the shape and dtype the data loader yields (tokens, labels and,
    with document masking, segments: LongTensor [micro_batch_size, seq_length]), random ids.

    Host tensors, as the loader's are: made outside every dispatch mode, so they are real (a few
    KB each, so that measured runs get an honest loss too) and not counted as device memory.
    That matters under a pipeline, whose executor fetches all of a step's micro-batches first:
    on a GPU they wait in host memory, and only the copy a forward makes is on the device."""
    shape = (config.train.micro_batch_size, config.model.seq_length)
    while True:
        with _disable_current_modes():
            tokens = torch.randint(0, config.model.vocab_size, shape)
            batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1)}
            if config.data.document_attention_mask:
                batch["segments"] = torch.zeros(shape, dtype=torch.long)
        yield batch
